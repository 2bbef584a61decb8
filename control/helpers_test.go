package control

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync"
	"testing"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/internal/clock/clocktest"
	"meshd.dev/meshd/internal/tlspin"
	"meshd.dev/meshd/netmap"
)

func testLogger(t testing.TB) *slog.Logger {
	if os.Getenv("MESHD_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

type testServer struct {
	*Server
	url  string
	dir  string
	addr string
	done chan error
	// dial connects to a coordinator of startMemServer from src; nil
	// for one on loopback TCP.
	dial func(ctx context.Context, src string) (net.Conn, error)
}

// startServer runs a coordinator on a loopback port for the test.
func startServer(t testing.TB, opts ServerOptions) *testServer {
	t.Helper()
	if opts.StateDir == "" {
		opts.StateDir = t.TempDir()
	}
	return startServerAt(t, opts, "127.0.0.1:0")
}

func startServerAt(t testing.TB, opts ServerOptions, addr string) *testServer {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = testLogger(t)
	}
	s, err := NewServer(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	var ln net.Listener
	// A restarted server rebinds its old port; the kernel may need a moment.
	deadline := time.Now().Add(5 * time.Second)
	for {
		ln, err = net.Listen("tcp", addr)
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		s.Close()
		t.Fatal(err)
	}
	ts := &testServer{Server: s, url: "https://" + ln.Addr().String(), dir: opts.StateDir, addr: ln.Addr().String(), done: make(chan error, 1)}
	go func() { ts.done <- s.Serve(ln) }()
	t.Cleanup(func() { ts.stop(t) })
	return ts
}

func (ts *testServer) stop(t testing.TB) {
	ts.Close()
	select {
	case err := <-ts.done:
		if err != nil {
			t.Errorf("Serve: %v", err)
		}
		ts.done <- nil // later stops return at once
	case <-time.After(10 * time.Second):
		t.Error("Serve did not return after Close")
	}
}

func (ts *testServer) key(t testing.TB, o AuthKeyOptions) string {
	t.Helper()
	k, _, err := ts.CreateAuthKey(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// testNode is a machine with its keys and a control client.
type testNode struct {
	mk    ed25519.PrivateKey
	nk    netmap.NodePrivate
	dk    netmap.DiscoPrivate
	c     *controlclient.Client
	id    netmap.NodeID
	self  netmap.Node
	mu    sync.Mutex
	nm    *netmap.NetworkMap
	maps  chan *netmap.NetworkMap
	fdone chan error
	// onMap, if set before follow, sees every map the node applies, in
	// order, on the stream's goroutine.
	onMap func(*netmap.NetworkMap)
}

func newTestNode(t testing.TB, url, pin string) *testNode {
	t.Helper()
	_, mk, _ := ed25519.GenerateKey(rand.Reader)
	return newTestNodeKey(t, url, pin, mk)
}

func newTestNodeKey(t testing.TB, url, pin string, mk ed25519.PrivateKey) *testNode {
	t.Helper()
	return newTestNodeOpts(t, controlclient.ClientOptions{URL: url, MachineKey: mk, ServerPin: pin, MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond})
}

// newTestNodeOpts is a test node with a client made from o, given a new
// node key and the test's logger.
func newTestNodeOpts(t testing.TB, o controlclient.ClientOptions) *testNode {
	t.Helper()
	nk := netmap.NewNodePrivate()
	o.NodeKey, o.Logger = nk, testLogger(t)
	if o.MachineKey == nil {
		_, o.MachineKey, _ = ed25519.GenerateKey(rand.Reader)
	}
	mk := o.MachineKey
	c, err := controlclient.NewClient(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return &testNode{mk: mk, nk: nk, dk: netmap.NewDiscoPrivate(), c: c, maps: make(chan *netmap.NetworkMap, 1)}
}

// rotate gives the node a new node key (its client proves it from then
// on) and returns the old one. Report it with an Update or a new stream.
func (n *testNode) rotate() netmap.NodePrivate {
	old := n.nk
	n.nk = netmap.NewNodePrivate()
	n.c.SetNodeKey(n.nk)
	return old
}

func (n *testNode) register(ctx context.Context, authKey, host string, tags ...string) (*netmap.RegisterResponse, error) {
	resp, err := n.c.Register(ctx, netmap.RegisterRequest{
		NodeKey: n.nk.Public(), DiscoKey: n.dk.Public(), Hostname: host, AuthKey: authKey, RequestTags: tags,
	})
	if err == nil {
		n.id, n.self = resp.Node.ID, resp.Node
	}
	return resp, err
}

func (n *testNode) mustRegister(t testing.TB, authKey, host string) *netmap.RegisterResponse {
	t.Helper()
	resp, err := n.register(context.Background(), authKey, host)
	if err != nil {
		t.Fatalf("register %s: %v", host, err)
	}
	return resp
}

func (n *testNode) mapRequest() netmap.MapRequest {
	return netmap.MapRequest{NodeKey: n.nk.Public(), DiscoKey: n.dk.Public()}
}

// follow runs the map stream until the returned cancel is called.
func (n *testNode) follow(t testing.TB, req netmap.MapRequest) context.CancelFunc {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	n.fdone = make(chan error, 1)
	go func() {
		n.fdone <- n.c.Follow(ctx, req, func(m *netmap.NetworkMap) {
			if n.onMap != nil {
				n.onMap(m)
			}
			n.mu.Lock()
			n.nm = m
			n.mu.Unlock()
			select { // keep only the latest
			case <-n.maps:
			default:
			}
			n.maps <- m
		})
	}()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			select {
			case <-n.fdone:
			case <-time.After(10 * time.Second):
				t.Error("Follow did not return after cancel")
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

func (n *testNode) current() *netmap.NetworkMap {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.nm
}

// waitMap polls the node's latest map until cond holds.
func (n *testNode) waitMap(t testing.TB, what string, cond func(*netmap.NetworkMap) bool) *netmap.NetworkMap {
	t.Helper()
	deadline := time.After(20 * time.Second)
	for {
		if m := n.current(); m != nil && cond(m) {
			return m
		}
		select {
		case <-n.maps:
		case err := <-n.fdone:
			n.fdone <- err
			t.Fatalf("node %d: Follow ended while waiting for %s: %v", n.id, what, err)
		case <-deadline:
			t.Fatalf("node %d: timed out waiting for %s; last map: %+v", n.id, what, n.current())
		}
	}
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func wantErr(t testing.TB, err, want error) {
	t.Helper()
	if !errors.Is(err, want) {
		t.Fatalf("error %v: want %v", err, want)
	}
}

var osReadFile = os.ReadFile

// machineHTTP is an HTTP client for the coordinator pinned to pin that
// presents machine key mk, as a node's control client does.
func machineHTTP(t testing.TB, pin string, mk ed25519.PrivateKey) *http.Client {
	t.Helper()
	cert, err := tlspin.SelfSigned(mk, "raw", nil)
	if err != nil {
		t.Fatal(err)
	}
	tr := controlclient.PinnedTransport(pin)
	tr.TLSClientConfig.Certificates = []tls.Certificate{cert}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

// doRaw posts body as-is to a machine endpoint of the coordinator at base
// with hc (see machineHTTP).
func doRaw(ctx context.Context, hc *http.Client, base, path string, body []byte) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return controlclient.ReadAPIError(resp)
	}
	return nil
}

// newClock returns a clock for ServerOptions.clock and
// RelayVerifierOptions.clock that stands still until the test advances it.
// It starts at a fixed time, so a test reads the same times on every run.
func newClock() *clocktest.Clock {
	return clocktest.New(time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC))
}

// awaitTimer waits until clk has made timer number n (clocktest's
// Started): the one a goroutine arms in reaction to what the test did.
func awaitTimer(t testing.TB, clk *clocktest.Clock, n int, what string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := clk.AwaitStarted(ctx, n); err != nil {
		t.Fatalf("timed out waiting for %s", what)
	}
}
