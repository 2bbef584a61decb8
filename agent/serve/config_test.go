package serve

import (
	"errors"
	"net"
	"net/netip"
	"net/url"
	"strings"
	"testing"
)

func TestNewEntry(t *testing.T) {
	tests := []struct {
		name   string
		proto  Proto
		port   uint16
		to     string
		want   string // normalised target
		errSub string // non-empty: the error must contain it
	}{
		{"bare port", HTTP, 80, "3000", "http://127.0.0.1:3000", ""},
		{"url", HTTP, 80, "http://127.0.0.1:3000", "http://127.0.0.1:3000", ""},
		{"url with path", HTTP, 80, "http://127.0.0.1:3000/app/", "http://127.0.0.1:3000/app/", ""},
		{"localhost any case", HTTP, 80, "http://LocalHost:3000", "http://localhost:3000", ""},
		{"host:port means http", HTTP, 80, "localhost:3000", "http://localhost:3000", ""},
		{"ipv6 loopback", HTTP, 80, "http://[::1]:3000", "http://[::1]:3000", ""},
		{"ipv6 loopback no port", HTTP, 80, "http://[::1]", "http://[::1]", ""},
		{"other 127/8", HTTPS, 443, "http://127.0.0.2:3000", "http://127.0.0.2:3000", ""},
		{"mapped loopback", HTTP, 80, "http://[::ffff:127.0.0.1]:3000", "http://127.0.0.1:3000", ""},
		{"https backend", HTTP, 80, "https://localhost:8443", "https://localhost:8443", ""},
		{"default port", HTTP, 80, "http://localhost", "http://localhost", ""},
		{"tcp bare port", TCP, 2222, "22", "127.0.0.1:22", ""},
		{"tcp addr", TCP, 2222, "127.0.0.1:22", "127.0.0.1:22", ""},
		{"tcp scheme", TCP, 2222, "tcp://localhost:22", "localhost:22", ""},
		{"tcp ipv6", TCP, 2222, "[::1]:22", "[::1]:22", ""},

		{"remote host", HTTP, 80, "http://10.0.0.5:3000", "", "only proxies to this machine"},
		{"remote name", HTTP, 80, "http://example.com", "", "only proxies to this machine"},
		{"metadata service", HTTP, 80, "http://169.254.169.254/latest", "", "only proxies to this machine"},
		{"localhost lookalike", HTTP, 80, "http://localhost.evil.com:80", "", "only proxies to this machine"},
		{"unspecified", HTTP, 80, "http://0.0.0.0:3000", "", "only proxies to this machine"},
		{"zone", HTTP, 80, "http://[::1%25lo]:3000", "", "only proxies to this machine"},
		{"tcp remote", TCP, 2222, "10.0.0.5:22", "", "only proxies to this machine"},
		{"tcp name", TCP, 2222, "db.internal:5432", "", "only proxies to this machine"},
		{"scheme", HTTP, 80, "ftp://127.0.0.1/", "", "http:// or https://"},
		{"unix", HTTP, 80, "unix:/run/app.sock", "", "only proxies to this machine"},
		{"credentials", HTTP, 80, "http://u:p@127.0.0.1:3000", "", "credentials"},
		{"query", HTTP, 80, "http://127.0.0.1:3000/?a=b", "", "query"},
		{"fragment", HTTP, 80, "http://127.0.0.1:3000/#x", "", "fragment"},
		{"bad port", HTTP, 80, "http://127.0.0.1:70000", "", "port"},
		{"zero target port", HTTP, 80, "http://127.0.0.1:0", "", "port"},
		{"empty port", HTTP, 80, "http://127.0.0.1:", "", "port"},
		{"empty", HTTP, 80, "", "", "no target"},
		{"tcp empty", TCP, 80, "", "", "no target"},
		{"tcp no port", TCP, 2222, "127.0.0.1", "", "HOST:PORT"},
		{"tcp port 0", TCP, 2222, "127.0.0.1:0", "", "port"},
		{"tailnet port 0", HTTP, 0, "3000", "", "tailnet port 0"},
		{"bad proto", "udp", 53, "53", "", "http, https or tcp"},
		{"signed port", HTTP, 80, "+3000", "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e, err := NewEntry(tt.proto, tt.port, tt.to)
			if tt.want == "" {
				if err == nil {
					t.Fatalf("NewEntry(%s, %d, %q) = %v, want an error", tt.proto, tt.port, tt.to, e)
				}
				if !strings.Contains(err.Error(), tt.errSub) {
					t.Fatalf("error %q lacks %q", err, tt.errSub)
				}
				return
			}
			if err != nil {
				t.Fatalf("NewEntry(%s, %d, %q): %v", tt.proto, tt.port, tt.to, err)
			}
			if want := (Entry{Proto: tt.proto, Port: tt.port, Target: tt.want}); e != want {
				t.Fatalf("got %+v, want %+v", e, want)
			}
		})
	}
}

func TestConfigValidate(t *testing.T) {
	ok := Entry{HTTP, 80, "http://127.0.0.1:3000"}
	tests := []struct {
		name string
		cfg  Config
		err  string
	}{
		{"empty", Config{}, ""},
		{"two ports", Config{Entries: []Entry{ok, {TCP, 22, "127.0.0.1:22"}}}, ""},
		{"port twice", Config{Entries: []Entry{ok, {TCP, 80, "127.0.0.1:22"}}}, "appears twice"},
		{"not normal", Config{Entries: []Entry{{HTTP, 80, "3000"}}}, "normal form"},
		{"remote", Config{Entries: []Entry{{HTTP, 80, "http://10.1.1.1"}}}, "only proxies"},
		{"proto", Config{Entries: []Entry{{"gopher", 70, "127.0.0.1:70"}}}, "protocol"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.cfg.Validate()
			if (err == nil) != (tt.err == "") || err != nil && !strings.Contains(err.Error(), tt.err) {
				t.Fatalf("Validate: %v, want %q", err, tt.err)
			}
		})
	}
}

// FuzzNewEntry: whatever a user types, NewEntry either refuses it or
// makes an entry in normal form whose target is on loopback.
func FuzzNewEntry(f *testing.F) {
	for _, s := range []string{"3000", "http://127.0.0.1:3000/app", "localhost:80", "http://[::1]", "tcp://localhost:22",
		"http://10.0.0.1", "http://u@127.0.0.1", "http://127.0.0.1:3000/?q", "http://[::ffff:127.0.0.1]:1", "http://127.0.0.1:+80"} {
		f.Add("http", uint16(80), s)
		f.Add("tcp", uint16(22), s)
	}
	f.Fuzz(func(t *testing.T, proto string, port uint16, to string) {
		e, err := NewEntry(Proto(proto), port, to)
		if err != nil {
			return
		}
		if again, err := NewEntry(e.Proto, e.Port, e.Target); err != nil || again != e {
			t.Fatalf("%q -> %+v is not stable: %+v, %v", to, e, again, err)
		}
		host := e.Target
		if e.Proto != TCP {
			u, err := url.Parse(e.Target)
			if err != nil {
				t.Fatalf("target %q: %v", e.Target, err)
			}
			host = u.Host
		}
		h, _, err := net.SplitHostPort(host)
		if err != nil {
			h = strings.Trim(host, "[]")
		}
		if ip, err := netip.ParseAddr(h); h != "localhost" && (err != nil || !ip.IsLoopback()) {
			t.Fatalf("%q -> target %q on a non-loopback host %q", to, e.Target, h)
		}
	})
}

func TestErrorsWrap(t *testing.T) {
	// ErrUnchanged is how callers (and the CLI's exit status) tell a no-op.
	s := New(Options{}, Config{})
	err := s.Reset(func(Config) error { t.Fatal("saved an unchanged config"); return nil })
	if !errors.Is(err, ErrUnchanged) {
		t.Fatalf("Reset of nothing: %v", err)
	}
}
