package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/netmap"
)

// logRecorder is a slog.Handler that keeps every record's message and
// attributes as one line, for asserting log lines.
type logRecorder struct {
	mu    *sync.Mutex
	lines *[]string
	attrs []slog.Attr
}

func newLogRecorder() logRecorder { return logRecorder{mu: new(sync.Mutex), lines: new([]string)} }

func (r logRecorder) Enabled(context.Context, slog.Level) bool { return true }

func (r logRecorder) Handle(_ context.Context, rec slog.Record) error {
	var b strings.Builder
	b.WriteString(rec.Level.String() + " " + rec.Message)
	for _, a := range r.attrs {
		fmt.Fprintf(&b, " %s=%v", a.Key, a.Value)
	}
	rec.Attrs(func(a slog.Attr) bool { fmt.Fprintf(&b, " %s=%v", a.Key, a.Value); return true })
	r.mu.Lock()
	*r.lines = append(*r.lines, b.String())
	r.mu.Unlock()
	return nil
}

func (r logRecorder) WithAttrs(as []slog.Attr) slog.Handler {
	r.attrs = append(r.attrs[:len(r.attrs):len(r.attrs)], as...)
	return r
}

func (r logRecorder) WithGroup(string) slog.Handler { return r }

// find returns the first line containing every one of subs, or "".
func (r logRecorder) find(subs ...string) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, l := range *r.lines {
		ok := true
		for _, s := range subs {
			ok = ok && strings.Contains(l, s)
		}
		if ok {
			return l
		}
	}
	return ""
}

// TestDefaultPortTakenFallsBack: two agents in one process, both on the
// default port (as two `meshd daemon`s without --port on one host), both
// come up and reach each other; whichever did not get DefaultPort says in
// its log that it took a random port instead.
func TestDefaultPortTakenFallsBack(t *testing.T) {
	m := newTestMesh(t)
	type node struct {
		a   *Agent
		log logRecorder
	}
	var nodes []node
	for _, name := range []string{"first", "second"} {
		rec := newLogRecorder()
		a, err := New(Options{StateDir: filepath.Join(t.TempDir(), name), TUN: TUNUserspace, LoopbackOnly: true,
			Port: AutoPort, EndpointInterval: time.Second, Logger: slog.New(rec)})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- a.Run(ctx) }()
		t.Cleanup(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("%s Run: %v", name, err)
			}
			a.Close()
		})
		if _, err := a.Up(context.Background(), localapi.UpRequest{AuthKey: m.key, Coordinator: m.url, Hostname: name}); err != nil {
			t.Fatalf("%s up: %v", name, err)
		}
		waitStatus(t, a, name+" running", func(st *localapi.Status) bool { return st.BackendState == localapi.StateRunning })
		nodes = append(nodes, node{a, rec})
	}
	ports := map[uint16]bool{}
	fellBack := 0
	for i, n := range nodes {
		n.a.mu.Lock()
		port := n.a.eng.port
		n.a.mu.Unlock()
		if ports[port] {
			t.Fatalf("both agents on UDP port %d", port)
		}
		ports[port] = true
		if port == DefaultPort {
			continue
		}
		// Another process may hold DefaultPort too; then both fall back.
		fellBack++
		if l := n.log.find("WARN", "random port", fmt.Sprintf("default_port=%d", DefaultPort), fmt.Sprintf("port=%d", port)); l == "" {
			t.Errorf("agent %d listens on %d, not %d, without the log line saying why", i, port, DefaultPort)
		}
	}
	if fellBack == 0 {
		t.Fatal("two agents on the default port, and none fell back")
	}
	echoThrough(t, nodes[0].a, nodes[1].a, "second", 7000, "over the fallback port")
	echoThrough(t, nodes[1].a, nodes[0].a, "first", 7001, "and back")
}

// TestEnginePortTaken: a taken port the user asked for is an error naming
// it; the default port taken falls back to a random one with a log line.
func TestEnginePortTaken(t *testing.T) {
	// Hold a port on the wildcard address, where WireGuard binds.
	held, err := net.ListenPacket("udp4", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	heldPort := held.LocalAddr().(*net.UDPAddr).Port
	// And DefaultPort, unless another process holds it already: taken
	// either way.
	if dp, err := net.ListenPacket("udp4", fmt.Sprintf(":%d", DefaultPort)); err == nil {
		defer dp.Close()
	}
	tests := []struct {
		name     string
		port     int
		wantErr  string // "": comes up
		wantLog  string
		wantPort func(uint16) bool
	}{
		{"explicit port taken", heldPort, fmt.Sprintf("UDP port %d is already in use", heldPort), "", nil},
		{"explicit default port taken", DefaultPort, fmt.Sprintf("UDP port %d is already in use", DefaultPort), "", nil},
		{"default port taken", AutoPort, "", "random port", func(p uint16) bool { return p != 0 && p != DefaultPort }},
		{"random port", 0, "", "", func(p uint16) bool { return p != 0 && p != DefaultPort }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec := newLogRecorder()
			e, err := newEngine(engineConfig{
				tunName: TUNUserspace, mtu: 1280, port: tt.port, nodeKey: netmap.NewNodePrivate(),
				addrs: pfx("100.64.0.9/32"), log: slog.New(rec),
				localAddrs: func() ([]netip.Prefix, error) { return pfx("127.0.0.1/8"), nil },
			})
			if tt.wantErr != "" {
				if err == nil {
					e.close()
					t.Fatalf("engine came up on port %d; want an error saying %q", e.port, tt.wantErr)
				}
				if !strings.Contains(err.Error(), tt.wantErr) || !strings.Contains(err.Error(), "--port") {
					t.Fatalf("error %q; want it to say %q and what to pass", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer e.close()
			if !tt.wantPort(e.port) {
				t.Fatalf("engine on port %d", e.port)
			}
			line := rec.find("random port", fmt.Sprintf("port=%d", e.port))
			if (line != "") != (tt.wantLog != "") {
				t.Fatalf("fallback log line %q; want one: %v", line, tt.wantLog != "")
			}
		})
	}
}
