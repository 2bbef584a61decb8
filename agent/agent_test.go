package agent

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/control"
	"meshd.dev/meshd/control/controlclient/controltest"
	"meshd.dev/meshd/netmap"
)

// testMesh is the coordinator of a test's agents: the real one on
// loopback (srv), or the in-memory fake (fake) for tests of the agent alone.
type testMesh struct {
	t    *testing.T
	srv  *control.Server
	fake *controltest.Coordinator
	url  string
	key  string
}

// newFakeMesh runs the in-memory coordinator: no TLS, HTTP or SQLite, so a
// test of the agent depends on nothing else.
func newFakeMesh(t *testing.T) *testMesh {
	const key = "mskey-controltest"
	return &testMesh{t: t, fake: controltest.New(controltest.Options{AuthKey: key, Tags: []string{"tag:test"}}),
		url: "https://controltest.invalid", key: key}
}

// options are an agent's options in state dir dir, talking to m.
func (m *testMesh) options(dir string) Options {
	o := Options{StateDir: dir, TUN: TUNUserspace, LoopbackOnly: true, EndpointInterval: time.Second, Logger: slog.New(slog.DiscardHandler)}
	if m.fake != nil {
		o.NewControlClient = func(c ControlConfig) (ControlClient, error) { return m.fake.Client(c.MachineKey), nil }
	}
	return o
}

func newTestMesh(t *testing.T) *testMesh {
	t.Helper()
	return newTestMeshWith(t, control.ServerOptions{})
}

// newTestMeshWith runs the coordinator with opts (its state dir and logger
// filled in).
func newTestMeshWith(t *testing.T, opts control.ServerOptions) *testMesh {
	t.Helper()
	ctx := context.Background()
	opts.StateDir, opts.Logger = t.TempDir(), slog.New(slog.DiscardHandler)
	srv, err := control.NewServer(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	key, _, err := srv.CreateAuthKey(ctx, control.AuthKeyOptions{Reusable: true, Tags: []string{"tag:test"}, Preauthorized: true})
	if err != nil {
		t.Fatal(err)
	}
	return &testMesh{t: t, srv: srv, url: "https://" + ln.Addr().String(), key: key}
}

// join starts an agent and brings it up.
func (m *testMesh) join(name string) *Agent {
	m.t.Helper()
	a := m.start(name, nil)
	if _, err := a.Up(context.Background(), localapi.UpRequest{AuthKey: m.key, Coordinator: m.url, Hostname: name}); err != nil {
		m.t.Fatalf("%s up: %v", name, err)
	}
	return a
}

// start runs an agent (options changed by mod, if set) until the test
// ends, without bringing it up.
func (m *testMesh) start(name string, mod func(*Options)) *Agent {
	m.t.Helper()
	opts := m.options(filepath.Join(m.t.TempDir(), name))
	if mod != nil {
		mod(&opts)
	}
	a, err := New(opts)
	if err != nil {
		m.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	m.t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			m.t.Errorf("%s Run: %v", name, err)
		}
		a.Close()
	})
	return a
}

func waitStatus(t *testing.T, a *Agent, what string, cond func(*localapi.Status) bool) *localapi.Status {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		st, err := a.Status(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if cond(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s: %+v", what, st)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func peerNamed(st *localapi.Status, name string) *localapi.Peer {
	for i := range st.Peers {
		if st.Peers[i].Hostname == name {
			return &st.Peers[i]
		}
	}
	return nil
}

// TestMapChangesKeepSessions checks that map updates reach the WireGuard
// device as minimal changes: a peer joining does not reset the session
// with an existing one, and a deleted peer is removed from the device.
func TestMapChangesKeepSessions(t *testing.T) {
	m := newFakeMesh(t)
	a := m.join("a")
	b := m.join("b")
	waitStatus(t, a, "a to see b", func(st *localapi.Status) bool { return peerNamed(st, "b") != nil })

	// Traffic a -> b so that a session exists.
	echoThrough(t, a, b, "b", 7000, "ping")
	before := waitStatus(t, a, "a handshake with b", func(st *localapi.Status) bool {
		p := peerNamed(st, "b")
		return p != nil && p.Path == "direct" && p.LastHandshake != nil
	})
	hs := *peerNamed(before, "b").LastHandshake

	// A third node joins: a's map changes, its session with b must not.
	m.join("c")
	after := waitStatus(t, a, "a to see c", func(st *localapi.Status) bool { return peerNamed(st, "c") != nil })
	pb := peerNamed(after, "b")
	if pb.LastHandshake == nil || !pb.LastHandshake.Equal(hs) || pb.RxBytes < peerNamed(before, "b").RxBytes {
		t.Fatalf("session with b was reset by c joining: before %v, after %+v", hs, pb)
	}
	// b had traffic, c none: only b is in a's WireGuard device.
	if pc := peerNamed(after, "c"); !pb.Active || pc.Active || pc.LastHandshake != nil {
		t.Fatalf("active: b %v (want true), c %v with handshake %v (want false, none)", pb.Active, pc.Active, pc.LastHandshake)
	}

	// c is deleted by the admin: it leaves a's map and a's WireGuard device.
	if err := m.fake.Delete("c"); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, a, "c to be removed", func(st *localapi.Status) bool { return peerNamed(st, "c") == nil })
	a.mu.Lock()
	eng := a.eng
	a.mu.Unlock()
	stats, err := eng.stats()
	if err != nil {
		t.Fatal(err)
	}
	pk, err := netmap.ParseNodePublic(peerNamed(after, "c").NodeKey)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := stats.Peers[pk]; ok {
		t.Fatal("deleted peer c is still configured on a's WireGuard device")
	}
	if len(stats.Peers) != 1 {
		t.Fatalf("a's device has %d peers, want 1 (b)", len(stats.Peers))
	}
}

// TestUpErrors checks up's refusals leave the node unregistered and give
// actionable errors.
func TestUpErrors(t *testing.T) {
	m := newTestMesh(t)
	a, err := New(Options{StateDir: t.TempDir(), TUN: TUNUserspace, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	ctx := context.Background()
	for _, tc := range []struct {
		req  localapi.UpRequest
		want string
	}{
		{localapi.UpRequest{Coordinator: m.url}, "--authkey"},
		{localapi.UpRequest{AuthKey: m.key}, "--coordinator"},
		{localapi.UpRequest{AuthKey: m.key, Coordinator: m.url, Tags: []string{"Not A Tag!"}}, "--advertise-tags"},
		{localapi.UpRequest{AuthKey: "mskey-nope", Coordinator: m.url}, "auth key"},
	} {
		_, err := a.Up(ctx, tc.req)
		if err == nil || !contains(err.Error(), tc.want) {
			t.Errorf("Up(%+v) = %v, want an error mentioning %q", tc.req, err, tc.want)
		}
	}
	st, _ := a.Status(ctx)
	if st.BackendState != localapi.StateNeedsLogin {
		t.Fatalf("state after failed ups: %s", st.BackendState)
	}
	if _, err := a.Up(ctx, localapi.UpRequest{AuthKey: m.key, Coordinator: m.url, Hostname: "x"}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Up(ctx, localapi.UpRequest{Coordinator: "https://127.0.0.1:1"}); err == nil || !contains(err.Error(), "fresh --state-dir") {
		t.Fatalf("up with another coordinator: %v", err)
	}
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }

// echoThrough serves an echo on to's tailnet port and checks that from gets
// msg back through the tunnel, dialling to by name.
func echoThrough(t *testing.T, from, to *Agent, toName string, port uint16, msg string) {
	t.Helper()
	ln, err := to.Listen("tcp4", port)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			io.Copy(c, c)
			c.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	c, err := from.Dial(ctx, "tcp", fmt.Sprintf("%s:%d", toName, port))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte(msg))
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
		t.Fatalf("echo through the tunnel: %q %v", buf, err)
	}
}
