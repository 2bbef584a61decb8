package control

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"net"
	"net/http"
	"sync"
	"testing"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
)

// Coordinators on in-memory connections, for tests of time limits.
//
// A coordinator on a memListener runs in a testing/synctest bubble
// together with its clients. Its connections are net.Pipe pairs, so their
// deadlines, net/http's and connlimit's timers, and the coordinator's own
// all read the bubble's clock, which moves only when every goroutine of
// the bubble is blocked: a 10-second limit is checked to the nanosecond,
// in no wall time, and no load on the machine can overrun it. Loopback
// TCP cannot serve here: a goroutine blocked on a socket is not durably
// blocked, so the bubble's clock would never move.

// memHost is the coordinator's name and address on a memListener.
const memHost = "coordinator.test:443"

// memListener is a net.Listener whose connections are dialled in memory.
type memListener struct {
	addr  *net.TCPAddr
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once

	mu   sync.Mutex
	port int // the last client port handed out
}

func newMemListener() *memListener {
	return &memListener{
		addr:  &net.TCPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 443},
		conns: make(chan net.Conn),
		done:  make(chan struct{}),
		port:  40000,
	}
}

func (l *memListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *memListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *memListener) Addr() net.Addr { return l.addr }

// dial connects to the listener from the IP address src, so that limits
// per source apply as to TCP connections from src.
func (l *memListener) dial(ctx context.Context, src string) (net.Conn, error) {
	ip := net.ParseIP(src)
	if ip == nil {
		return nil, fmt.Errorf("dial from %q: not an IP address", src)
	}
	l.mu.Lock()
	l.port++
	from := &net.TCPAddr{IP: ip, Port: l.port}
	l.mu.Unlock()
	client, server := net.Pipe()
	select {
	case l.conns <- memConn{server, l.addr, from}:
		return memConn{client, from, l.addr}, nil
	case <-l.done:
	case <-ctx.Done():
	}
	client.Close()
	server.Close()
	return nil, fmt.Errorf("dial %s from %s: connection refused", l.addr, src)
}

// memConn is one end of a pipe with TCP addresses.
type memConn struct {
	net.Conn
	local, remote net.Addr
}

func (c memConn) LocalAddr() net.Addr  { return c.local }
func (c memConn) RemoteAddr() net.Addr { return c.remote }

// startMemServer runs a coordinator on a memListener for the test, which
// must run inside synctest.Test. ts.dial connects to it.
func startMemServer(t *testing.T, opts ServerOptions) *testServer {
	t.Helper()
	if opts.StateDir == "" {
		opts.StateDir = t.TempDir()
	}
	if opts.Logger == nil {
		opts.Logger = testLogger(t)
	}
	s, err := NewServer(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	ln := newMemListener()
	ts := &testServer{Server: s, url: "https://" + memHost, dir: opts.StateDir, addr: memHost, done: make(chan error, 1), dial: ln.dial}
	go func() { ts.done <- s.Serve(ln) }()
	t.Cleanup(func() { ts.stop(t) })
	return ts
}

// memHTTP is an HTTP client for the coordinator of startMemServer, pinned
// to its key, presenting machine key mk's certificate when mk is not nil,
// connecting from 127.0.0.1.
func memHTTP(t *testing.T, ts *testServer, mk ed25519.PrivateKey) *http.Client {
	t.Helper()
	var hc *http.Client
	if mk != nil {
		hc = machineHTTP(t, ts.Fingerprint(), mk)
	} else {
		tr := controlclient.PinnedTransport(ts.Fingerprint())
		t.Cleanup(tr.CloseIdleConnections)
		hc = &http.Client{Transport: tr}
	}
	hc.Transport.(*http.Transport).DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
		return ts.dial(ctx, "127.0.0.1")
	}
	return hc
}

// rawNode is a machine enrolled without a control client (which dials
// TCP only): its keys.
type rawNode struct {
	mk ed25519.PrivateKey
	nk netmap.NodePrivate
	dk netmap.DiscoPrivate
}

// enrolRaw registers a new machine with authKey with the coordinator of
// startMemServer, proving its node key as a control client does.
func enrolRaw(t *testing.T, ts *testServer, authKey, host string) rawNode {
	t.Helper()
	_, mk, _ := ed25519.GenerateKey(rand.Reader)
	n := rawNode{mk: mk, nk: netmap.NewNodePrivate(), dk: netmap.NewDiscoPrivate()}
	hc := memHTTP(t, ts, mk)
	ctx := context.Background()
	var ch netmap.Challenge
	if err := controlclient.DoJSON(ctx, hc, http.MethodPost, ts.url+controlclient.ChallengePath, "",
		netmap.ChallengeRequest{Version: netmap.ProtocolVersion}, &ch, nil); err != nil {
		t.Fatalf("enrol %s: challenge: %v", host, err)
	}
	proof, err := controlclient.SealNodeKeyProof(n.nk, machinePublic(mk), &ch)
	if err != nil {
		t.Fatal(err)
	}
	req := netmap.RegisterRequest{Version: netmap.ProtocolVersion, NodeKey: n.nk.Public(), DiscoKey: n.dk.Public(),
		Hostname: host, AuthKey: authKey, NodeKeyProof: proof}
	var resp netmap.RegisterResponse
	if err := controlclient.DoJSON(ctx, hc, http.MethodPost, ts.url+"/machine/register", "", req, &resp, nil); err != nil {
		t.Fatalf("enrol %s: %v", host, err)
	}
	hc.CloseIdleConnections()
	return n
}
