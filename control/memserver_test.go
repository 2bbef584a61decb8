package control

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"testing"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/internal/memnet"
	"meshd.dev/meshd/netmap"
)

// Coordinators on in-memory connections (internal/memnet), for tests of
// time limits. A coordinator of startMemServer runs in a testing/synctest
// bubble together with its clients, so connection deadlines, net/http's
// and connlimit's timers and the coordinator's own all follow the
// bubble's clock: a 10-second limit is checked to the nanosecond, in no
// wall time, and no load on the machine can overrun it.

// startMemServer runs a coordinator on a memnet listener for the test, which
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
	ln := memnet.Listen(netip.MustParseAddrPort("192.0.2.1:443"))
	dial := func(ctx context.Context, src string) (net.Conn, error) {
		ip, err := netip.ParseAddr(src)
		if err != nil {
			return nil, fmt.Errorf("dial from %q: %w", src, err)
		}
		return ln.Dial(ctx, ip)
	}
	ts := &testServer{Server: s, url: "https://coordinator.test", dir: opts.StateDir, addr: "coordinator.test:443", done: make(chan error, 1), dial: dial}
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
	tr := hc.Transport.(*http.Transport)
	tr.DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
		return ts.dial(ctx, "127.0.0.1")
	}
	// No session tickets over memnet: a client that can resume makes the
	// server send a ticket right after its Finished, while the client
	// writes its own Finished and request, and net.Pipe, having no buffer
	// as TCP has, blocks both writes for good.
	tr.TLSClientConfig.ClientSessionCache = nil
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
