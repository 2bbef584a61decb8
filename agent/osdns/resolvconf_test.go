package osdns

import (
	"bytes"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"meshd.dev/meshd/netmap"
)

func addrs(ss ...string) []netip.Addr {
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, netip.MustParseAddr(s))
	}
	return out
}

func TestParseResolvConf(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want resolvConf
	}{
		{"empty", "", resolvConf{}},
		{"typical", "nameserver 192.0.2.1\nnameserver 2001:db8::1\nsearch lan example.com\noptions edns0 trust-ad\n",
			resolvConf{Nameservers: addrs("192.0.2.1", "2001:db8::1"), Search: []string{"lan", "example.com"}, Options: []string{"edns0", "trust-ad"}}},
		{"comments and blank lines", "# generated\n; also a comment\n\n   \nnameserver 192.0.2.1 # trailing words ignored\n",
			resolvConf{Nameservers: addrs("192.0.2.1")}},
		{"tabs and CRLF", "nameserver\t192.0.2.1\r\nsearch\ta\tb\r\n",
			resolvConf{Nameservers: addrs("192.0.2.1"), Search: []string{"a", "b"}}},
		{"last search or domain wins", "search a b\ndomain c\n", resolvConf{Search: []string{"c"}}},
		{"search after domain", "domain c\nsearch a b\n", resolvConf{Search: []string{"a", "b"}}},
		{"search stops at a comment", "search a #b c\n", resolvConf{Search: []string{"a"}}},
		{"options accumulate", "options ndots:2\noptions rotate\n", resolvConf{Options: []string{"ndots:2", "rotate"}}},
		{"bad addresses skipped", "nameserver\nnameserver not-an-ip\nnameserver 0.0.0.0\nnameserver ::\nnameserver 192.0.2.9\n",
			resolvConf{Nameservers: addrs("192.0.2.9")}},
		{"zone kept, v4-mapped unmapped", "nameserver fe80::1%eth0\nnameserver ::ffff:192.0.2.3\n",
			resolvConf{Nameservers: addrs("fe80::1%eth0", "192.0.2.3")}},
		{"more than three nameservers all read", "nameserver 192.0.2.1\nnameserver 192.0.2.2\nnameserver 192.0.2.3\nnameserver 192.0.2.4\n",
			resolvConf{Nameservers: addrs("192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4")}},
		{"unknown keywords and indented comments", "sortlist 130.155.160.0\n  # indented\nlookup file bind\n", resolvConf{}},
		{"keyword must start the line", " nameserver 192.0.2.1\n", resolvConf{Nameservers: addrs("192.0.2.1")}},
		{"no final newline", "nameserver 192.0.2.1", resolvConf{Nameservers: addrs("192.0.2.1")}},
		{"control characters dropped", "search a\x01b ok\n", resolvConf{Search: []string{"ok"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := parseResolvConf([]byte(tt.in))
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("parse(%q)\n got %+v\nwant %+v", tt.in, got, tt.want)
			}
		})
	}
}

func TestRenderResolvConf(t *testing.T) {
	mesh := Config{
		Nameservers:   []netip.Addr{netmap.ResolverIPv4, netmap.ResolverIPv6},
		SearchDomains: []string{"meshd.internal", "corp.example"},
		MatchDomains:  []string{"meshd.internal", "corp.example"},
	}
	tests := []struct {
		name string
		cfg  Config
		orig string
		want string // after the header
	}{
		{"no original", mesh, "",
			"nameserver 100.100.100.100\nnameserver fd5e:5a1e:d::53\nsearch meshd.internal corp.example\n"},
		{"host search and options kept, host servers not", mesh,
			"nameserver 192.0.2.1\nsearch lan Corp.Example.\noptions edns0 ndots:2\n",
			"nameserver 100.100.100.100\nnameserver fd5e:5a1e:d::53\nsearch meshd.internal corp.example lan\noptions edns0 ndots:2\n"},
		{"no search domains at all", Config{Nameservers: addrs("100.100.100.100")}, "nameserver 192.0.2.1\n",
			"nameserver 100.100.100.100\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := renderResolvConf(tt.cfg, parseResolvConf([]byte(tt.orig)))
			if !bytes.HasPrefix(got, []byte(header)) {
				t.Fatalf("no header:\n%s", got)
			}
			if body := string(got[len(header):]); body != tt.want {
				t.Errorf("body\n%s\nwant\n%s", body, tt.want)
			}
			// What meshd writes reads back as what it means.
			back := parseResolvConf(got)
			if !reflect.DeepEqual(back.Nameservers, tt.cfg.Nameservers) {
				t.Errorf("nameservers read back %v, want %v", back.Nameservers, tt.cfg.Nameservers)
			}
		})
	}
}

func TestConfigValidate(t *testing.T) {
	good := Config{Nameservers: addrs("100.100.100.100"), SearchDomains: []string{"meshd.internal"}, MatchDomains: []string{"corp.example."}}
	tests := []struct {
		name    string
		mutate  func(*Config)
		wantErr string
	}{
		{"good", func(*Config) {}, ""},
		{"no nameservers", func(c *Config) { c.Nameservers = nil }, "no nameservers"},
		{"four nameservers", func(c *Config) { c.Nameservers = addrs("1.1.1.1", "1.1.1.2", "1.1.1.3", "1.1.1.4") }, "at most 3"},
		{"zero address", func(c *Config) { c.Nameservers = []netip.Addr{{}} }, "unicast"},
		{"zoned address", func(c *Config) { c.Nameservers = addrs("fe80::1%eth0") }, "zone"},
		{"newline in a search domain", func(c *Config) { c.SearchDomains = []string{"a\nnameserver 6.6.6.6"} }, "lowercase"},
		{"space in a match domain", func(c *Config) { c.MatchDomains = []string{"a b"} }, "lowercase"},
		{"empty domain", func(c *Config) { c.SearchDomains = []string{""} }, "empty"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := good
			tt.mutate(&c)
			err := c.Validate()
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Validate = %v, want an error containing %q", err, tt.wantErr)
			}
		})
	}
}

// FuzzParseResolvConf: any file parses without panicking, every value
// read can be written back on one line, and meshd's rendering of it
// parses back to the same search list and options.
func FuzzParseResolvConf(f *testing.F) {
	f.Fuzz(func(t *testing.T, b []byte) {
		rc := parseResolvConf(b)
		for _, s := range append(append([]string(nil), rc.Search...), rc.Options...) {
			if s == "" || s[0] == '#' || s[0] == ';' || strings.ContainsFunc(s, func(r rune) bool { return r < 0x21 || r == 0x7f }) {
				t.Fatalf("token %q cannot be written back", s)
			}
		}
		for _, a := range rc.Nameservers {
			if !a.IsValid() || a.IsUnspecified() || a.Is4In6() {
				t.Fatalf("nameserver %v", a)
			}
		}
		cfg := Config{Nameservers: addrs("100.100.100.100")}
		back := parseResolvConf(renderResolvConf(cfg, rc))
		if !reflect.DeepEqual(back.Nameservers, cfg.Nameservers) || !reflect.DeepEqual(back.Options, rc.Options) {
			t.Fatalf("render/parse: got %+v from %+v", back, rc)
		}
		if len(back.Search) > len(rc.Search) {
			t.Fatalf("search grew: %v from %v", back.Search, rc.Search)
		}
	})
}
