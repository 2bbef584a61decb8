package magicbind

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun/netstack"

	"meshd.dev/meshd/derp"
	"meshd.dev/meshd/internal/tlspin"
	"meshd.dev/meshd/nat/endpoint"
	"meshd.dev/meshd/nat/stun"
	"meshd.dev/meshd/netmap"
)

// startRelay runs a DERP server (TLS, pinned) and a STUN server on loopback
// and returns a DERP map with them as region 1.
func startRelay(t *testing.T) netmap.DERPMap {
	t.Helper()
	dm, _ := startStoppableRelay(t)
	return dm
}

// startStoppableRelay is startRelay with a function that stops the relay
// (its STUN server too) before the test ends.
func startStoppableRelay(t *testing.T) (netmap.DERPMap, func()) {
	t.Helper()
	cert, err := derp.NewSelfSignedCert([]string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	s, err := derp.NewServer(derp.ServerOptions{PrivateKey: netmap.NewNodePrivate()})
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewUnstartedServer(s)
	hs.Config.ErrorLog = log.New(io.Discard, "", 0)
	hs.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"http/1.1"}}
	hs.StartTLS()
	ss, err := stun.Listen("127.0.0.1:0", nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); ss.Serve(ctx) }()
	stop := sync.OnceFunc(func() {
		hs.CloseClientConnections()
		s.Close()
		hs.Close()
		cancel()
		<-done
	})
	t.Cleanup(stop)
	port := hs.Listener.Addr().(*net.TCPAddr).Port
	return netmap.DERPMap{Regions: []netmap.DERPRegion{{ID: 1, Code: "lab", Nodes: []netmap.DERPNode{{
		Name: "1a", Host: "127.0.0.1", DERPPort: port, STUNPort: int(ss.AddrPort().Port()),
		CertFingerprint: tlspin.Fingerprint(cert.Leaf),
	}}}}}, stop
}

// testLogger logs at debug level through t (shown for failed tests) until
// the test's cleanups have run; WireGuard's goroutines log while stopping.
func testLogger(t *testing.T, name string) *slog.Logger {
	w := &tWriter{t: t}
	t.Cleanup(func() { w.mu.Lock(); w.done = true; w.mu.Unlock() })
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug})).With("node", name)
}

type tWriter struct {
	t    *testing.T
	mu   sync.Mutex
	done bool
}

func (w *tWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimSpace(string(p)))
	}
	return len(p), nil
}

type testNode struct {
	name  string
	key   netmap.NodePrivate
	disco netmap.DiscoPrivate
	ip    netip.Addr
	addr  netip.Addr // the underlay address peers reach it on
	bind  *Bind
	dev   *device.Device
	tnet  *netstack.Net
	port  uint16
	// transfers counts transfer calls to this node, so each listens on a
	// fresh port: the previous one may still be in TIME_WAIT in gVisor.
	transfers int
}

func newTestNode(t *testing.T, name string, ip string) *testNode {
	t.Helper()
	return newTestNodeWith(t, name, ip, nil)
}

// newTestNodeWith lets the test adjust the bind before WireGuard opens it.
func newTestNodeWith(t *testing.T, name string, ip string, adjust func(*Bind)) *testNode {
	t.Helper()
	return newTestNodeSetup(t, name, ip, nodeSetup{bind: adjust})
}

// nodeSetup adjusts a test node.
type nodeSetup struct {
	opts func(*Options) // the bind's options
	bind func(*Bind)    // the bind, before WireGuard opens it
	// in opens the UDP socket inside a namespace (netlab.Host.Do), and
	// addr is the node's address there; default: loopback.
	in   func(func() error) error
	addr netip.Addr
}

func newTestNodeSetup(t *testing.T, name string, ip string, setup nodeSetup) *testNode {
	t.Helper()
	n := &testNode{name: name, key: netmap.NewNodePrivate(), disco: netmap.NewDiscoPrivate(), ip: netip.MustParseAddr(ip), addr: setup.addr}
	if !n.addr.IsValid() {
		n.addr = netip.MustParseAddr("127.0.0.1")
	}
	opts := Options{
		NodeKey: n.key, DiscoKey: n.disco,
		// Quick timings so fallback tests take seconds.
		Paths:  endpoint.Config{HeartbeatInterval: 300 * time.Millisecond, TrustDuration: time.Second, ProbeInterval: 500 * time.Millisecond},
		Logger: testLogger(t, name),
	}
	if setup.opts != nil {
		setup.opts(&opts)
	}
	n.bind = New(opts)
	if setup.bind != nil {
		setup.bind(n.bind)
	}
	if setup.in == nil {
		setup.in = func(f func() error) error { return f() }
	}
	tdev, tnet, err := netstack.CreateNetTUN([]netip.Addr{n.ip}, nil, 1280)
	if err != nil {
		t.Fatal(err)
	}
	n.tnet = tnet
	n.dev = device.NewDevice(tdev, n.bind, &device.Logger{
		Verbosef: func(f string, a ...any) { n.bind.log.Debug("wg: " + fmt.Sprintf(f, a...)) },
		Errorf:   func(f string, a ...any) { n.bind.log.Debug("wg error: " + fmt.Sprintf(f, a...)) },
	})
	t.Cleanup(n.dev.Close)
	k := n.key.Raw()
	if err := setup.in(func() error {
		if err := n.dev.IpcSet(fmt.Sprintf("private_key=%x\nlisten_port=0\n", k[:])); err != nil {
			return err
		}
		return n.dev.Up()
	}); err != nil {
		t.Fatal(err)
	}
	get, err := n.dev.IpcGet()
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range bytes.Split([]byte(get), []byte("\n")) {
		if v, ok := bytes.CutPrefix(line, []byte("listen_port=")); ok {
			p, _ := strconv.Atoi(string(v))
			n.port = uint16(p)
		}
	}
	if n.port == 0 {
		t.Fatal("no listen port")
	}
	return n
}

func (n *testNode) node(id netmap.NodeID, withEndpoints bool) netmap.Node {
	nd := netmap.Node{
		ID: id, Hostname: n.name, NodeKey: n.key.Public(), DiscoKey: n.disco.Public(),
		Addresses: []netip.Prefix{netip.PrefixFrom(n.ip, 32)}, HomeDERP: 1,
	}
	if withEndpoints {
		nd.Endpoints = []netip.AddrPort{netip.AddrPortFrom(n.addr, n.port)}
	}
	return nd
}

// connect gives a and b each other as peers, with the DERP map dm.
func connect(t *testing.T, a, b *testNode, dm netmap.DERPMap, endpoints bool) {
	t.Helper()
	na, nb := a.node(1, endpoints), b.node(2, endpoints)
	for _, x := range []struct {
		self      *testNode
		selfN, pN netmap.Node
		peer      *testNode
	}{{a, na, nb, b}, {b, nb, na, a}} {
		pN := x.pN
		x.self.bind.SetNetworkMap(&netmap.NetworkMap{Self: x.selfN, Peers: map[netmap.NodeID]*netmap.Node{pN.ID: &pN}, DERPMap: dm})
		pk := x.peer.key.Public()
		// No persistent keepalive: with both sides initiating at once,
		// wireguard-go can lose the session key when the two handshakes
		// cross in one receive batch, which recovers only on rekey.
		cfg := fmt.Sprintf("public_key=%x\nendpoint=%s\nallowed_ip=%s/32\n", pk[:], EndpointFor(pk), x.peer.ip)
		if err := x.self.dev.IpcSet(cfg); err != nil {
			t.Fatal(err)
		}
	}
}

// transfer sends size random bytes from a to b over TCP through the tunnel
// and checks they arrive intact.
func transfer(t *testing.T, a, b *testNode, size int) {
	t.Helper()
	port := uint16(5100 + b.transfers)
	b.transfers++
	ln, err := b.tnet.ListenTCPAddrPort(netip.AddrPortFrom(b.ip, port))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	want := make([]byte, size)
	rand.Read(want)
	got := make(chan []byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- nil
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(20 * time.Second))
		data, _ := io.ReadAll(c)
		got <- data
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := a.tnet.DialContextTCPAddrPort(ctx, netip.AddrPortFrom(b.ip, port))
	if err != nil {
		t.Fatalf("dial through the tunnel: %v", err)
	}
	c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := c.Write(want); err != nil {
		t.Fatalf("write: %v", err)
	}
	c.Close()
	if data := <-got; !bytes.Equal(data, want) {
		t.Fatalf("received %d bytes, want the %d sent", len(data), len(want))
	}
}

func waitPath(t *testing.T, n *testNode, peer *testNode, want string, within time.Duration) PeerStatus {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		st := n.bind.PeerStatus(peer.key.Public())
		if st.Path == want {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s -> %s: path %q after %v, want %q", n.name, peer.name, st.Path, within, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestRelayedOnly(t *testing.T) {
	dm := startRelay(t)
	a, b := newTestNode(t, "a", "100.64.0.1"), newTestNode(t, "b", "100.64.0.2")
	// No endpoints published: the only path is the relay.
	connect(t, a, b, dm, false)
	transfer(t, a, b, 1<<20)
	st := waitPath(t, a, b, PathDERP, 5*time.Second)
	if st.DERPCode != "lab" || st.Endpoint() != "derp:lab" {
		t.Errorf("status %+v, want region lab", st)
	}
	// A relay's queue can hold a send to b: WireGuard times them.
	if !mayStall(t, a, b) {
		t.Error("SendMayStall false for a relayed peer")
	}
	if h := a.bind.HomeDERP(); h != 1 {
		t.Errorf("home DERP %d, want 1", h)
	}
	if eps := a.bind.STUNEndpoints(); len(eps) != 1 || eps[0] != netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), a.port) {
		t.Errorf("STUN endpoints %v, want the socket's 127.0.0.1:%d", eps, a.port)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	res, err := a.bind.Ping(ctx, b.key.Public())
	if err != nil {
		t.Fatal(err)
	}
	if res.Path != PathDERP || res.DERPCode != "lab" || res.Peer != "b" || res.Latency <= 0 {
		t.Errorf("ping %+v, want a pong from b via DERP(lab)", res)
	}
}

// TestRelayMovesWithDERPMap: when a new DERP map names another server as
// a region's relay (coordinator replicas' embedded relays, after the
// oldest replica is gone), nodes leave the old server and meet at the new
// one, without a restart.
func TestRelayMovesWithDERPMap(t *testing.T) {
	first, stopFirst := startStoppableRelay(t)
	second := startRelay(t)
	a, b := newTestNode(t, "a", "100.64.0.1"), newTestNode(t, "b", "100.64.0.2")
	connect(t, a, b, first, false)
	transfer(t, a, b, 64<<10)
	waitPath(t, a, b, PathDERP, 5*time.Second)

	stopFirst()
	moved := netmap.DERPMap{Regions: []netmap.DERPRegion{first.Regions[0]}}
	moved.Regions[0].Nodes = []netmap.DERPNode{second.Regions[0].Nodes[0]}
	na, nb := a.node(1, false), b.node(2, false)
	a.bind.SetNetworkMap(&netmap.NetworkMap{Self: na, Peers: map[netmap.NodeID]*netmap.Node{nb.ID: &nb}, DERPMap: moved})
	b.bind.SetNetworkMap(&netmap.NetworkMap{Self: nb, Peers: map[netmap.NodeID]*netmap.Node{na.ID: &na}, DERPMap: moved})
	transfer(t, a, b, 64<<10)
	transfer(t, b, a, 64<<10)
	waitPath(t, a, b, PathDERP, 5*time.Second)
}

func TestDirectAfterPong(t *testing.T) {
	dm := startRelay(t)
	a, b := newTestNode(t, "a", "100.64.0.1"), newTestNode(t, "b", "100.64.0.2")
	connect(t, a, b, dm, true)
	transfer(t, a, b, 256<<10)
	st := waitPath(t, a, b, PathDirect, 5*time.Second)
	if st.Addr.Port() != b.port {
		t.Errorf("direct path %v, want b's port %d", st.Addr, b.port)
	}
	waitPath(t, b, a, PathDirect, 5*time.Second)
	transfer(t, b, a, 1<<20)
	// Direct sends wait only on the socket every peer shares.
	if mayStall(t, b, a) {
		t.Error("SendMayStall true after direct sends")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	res, err := a.bind.Ping(ctx, b.key.Public())
	if err != nil {
		t.Fatal(err)
	}
	if res.Path != PathDirect || res.Addr.Port() != b.port {
		t.Errorf("ping %+v, want a direct pong from b's port %d", res, b.port)
	}
}

// mayStall is SendMayStall of n's endpoint for peer.
func mayStall(t *testing.T, n, peer *testNode) bool {
	t.Helper()
	ep, err := n.bind.ParseEndpoint(EndpointFor(peer.key.Public()))
	if err != nil {
		t.Fatal(err)
	}
	return ep.(*Endpoint).SendMayStall()
}

func TestNoRelayUsesPublishedEndpoints(t *testing.T) {
	a, b := newTestNode(t, "a", "100.64.0.1"), newTestNode(t, "b", "100.64.0.2")
	connect(t, a, b, netmap.DERPMap{}, true)
	transfer(t, a, b, 64<<10)
	waitPath(t, a, b, PathDirect, 5*time.Second)
}

func TestNoPathAtAll(t *testing.T) {
	a, b := newTestNode(t, "a", "100.64.0.1"), newTestNode(t, "b", "100.64.0.2")
	connect(t, a, b, netmap.DERPMap{}, false)
	if st := a.bind.PeerStatus(b.key.Public()); st.Path != PathNone || st.Endpoint() != "" {
		t.Errorf("status %+v, want none", st)
	}
	ep, err := a.bind.ParseEndpoint(EndpointFor(b.key.Public()))
	if err != nil {
		t.Fatal(err)
	}
	if err := a.bind.Send([][]byte{make([]byte, 100)}, ep); err == nil {
		t.Error("Send with no path succeeded")
	}
}

func TestParseEndpoint(t *testing.T) {
	b := New(Options{NodeKey: netmap.NewNodePrivate(), DiscoKey: netmap.NewDiscoPrivate()})
	k := netmap.NewNodePrivate().Public()
	e1, err := b.ParseEndpoint(EndpointFor(k))
	if err != nil {
		t.Fatal(err)
	}
	e2, _ := b.ParseEndpoint(EndpointFor(k))
	if e1 != e2 {
		t.Error("two parses of one key gave different endpoints; WireGuard needs one per peer")
	}
	if !bytes.Equal(e1.DstToBytes(), k[:]) {
		t.Error("DstToBytes is not the peer key")
	}
	for _, bad := range []string{"", "127.0.0.1:41641", "nodekey:zz"} {
		if _, err := b.ParseEndpoint(bad); err == nil {
			t.Errorf("ParseEndpoint(%q) accepted", bad)
		}
	}
}

// cuttableBind is the UDP socket with a switch that drops every direct
// datagram sent while it is on, from both nodes: a firewall rule appearing
// on the path. Datagrams already on their way (in the receiver's socket
// buffer) still arrive, as they would on a real network; the relay (TCP)
// is unaffected.
type cuttableBind struct {
	conn.Bind
	cut atomic.Bool
}

func (c *cuttableBind) Send(bufs [][]byte, ep conn.Endpoint) error {
	if c.cut.Load() {
		return nil
	}
	return c.Bind.Send(bufs, ep)
}

// TestFallbackToRelayAndBack: a direct path dies in the middle of a TCP
// transfer; traffic moves to the relay and the transfer completes; when the
// path heals, traffic goes direct again.
//
// The sender keeps at most one chunk unacknowledged (the receiver answers
// each chunk with a byte), so the cut strands at most one chunk. gVisor's
// TCP repairs a stranded window at about two segments per retransmission
// timeout: after the timeout, the first ACK makes RACK mark the rest lost
// and enter SACK recovery, whose pipe still counts the segments not yet
// resent, so nothing more goes out until the next timeout. With a bulk
// stream the window at the cut is however far TCP had ramped up, further on
// a busy machine: 200 stranded segments took 100 timeouts (24 s) there, and
// more overran the deadline. What is tested is the path, not gVisor's loss
// recovery.
func TestFallbackToRelayAndBack(t *testing.T) {
	dm := startRelay(t)
	cuts := [2]*cuttableBind{}
	mk := func(i int, name, ip string) *testNode {
		return newTestNodeWith(t, name, ip, func(b *Bind) {
			cuts[i] = &cuttableBind{Bind: b.std}
			b.std = cuts[i]
		})
	}
	a, b := mk(0, "a", "100.64.0.1"), mk(1, "b", "100.64.0.2")
	connect(t, a, b, dm, true)
	transfer(t, a, b, 64<<10)
	waitPath(t, a, b, PathDirect, 5*time.Second)

	ln, err := b.tnet.ListenTCPAddrPort(netip.AddrPortFrom(b.ip, 5002))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	const size, chunk = 4 << 20, 16 << 10
	const chunks, cutAt = size / chunk, size / chunk / 4
	received := make(chan error, 1)
	go func() { received <- receiveChunks(ln, chunks, chunk) }()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := a.tnet.DialContextTCPAddrPort(ctx, netip.AddrPortFrom(b.ip, 5002))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	buf, ack := make([]byte, chunk), make([]byte, 1)
	var cutTime time.Time
	for i := range chunks {
		if i == cutAt {
			cuts[0].cut.Store(true)
			cuts[1].cut.Store(true)
			cutTime = time.Now()
		}
		for j := range buf {
			buf[j] = byte(i)
		}
		if _, err := c.Write(buf); err != nil {
			t.Fatalf("write chunk %d of %d (cut at %d): %v", i, chunks, cutAt, err)
		}
		if _, err := io.ReadFull(c, ack); err != nil {
			t.Fatalf("acknowledgement of chunk %d of %d (cut at %d): %v", i, chunks, cutAt, err)
		}
		if ack[0] != byte(i) {
			t.Fatalf("chunk %d acknowledged as %d", i, ack[0])
		}
		if i == cutAt {
			t.Logf("first chunk after the cut acknowledged in %v", time.Since(cutTime))
		}
	}
	if err := <-received; err != nil {
		t.Fatalf("receiving across the cut: %v", err)
	}
	if st := a.bind.PeerStatus(b.key.Public()); st.Path != PathDERP {
		t.Errorf("path after the cut: %+v, want derp", st)
	}
	cuts[0].cut.Store(false)
	cuts[1].cut.Store(false)
	// The peer was active moments ago, so probing goes on and finds the
	// healed path.
	waitPath(t, a, b, PathDirect, 10*time.Second)
	transfer(t, a, b, 64<<10)
}

// receiveChunks accepts one connection and reads n chunks of size bytes,
// chunk i filled with byte(i), answering each with its byte once it is
// complete and intact.
func receiveChunks(ln net.Listener, n, size int) error {
	c, err := ln.Accept()
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	buf := make([]byte, size)
	for i := range n {
		if _, err := io.ReadFull(c, buf); err != nil {
			return fmt.Errorf("chunk %d of %d: %w", i, n, err)
		}
		for k, x := range buf {
			if x != byte(i) {
				return fmt.Errorf("chunk %d: byte %d is %d, want %d", i, k, x, byte(i))
			}
		}
		if _, err := c.Write([]byte{byte(i)}); err != nil {
			return fmt.Errorf("acknowledge chunk %d: %w", i, err)
		}
	}
	return nil
}

// TestPeerInAnotherRegion: nodes with different home regions reach each
// other through the peer's home, which each bind connects to when it first
// sends there.
func TestPeerInAnotherRegion(t *testing.T) {
	r1, r2 := startRelay(t).Regions[0], startRelay(t).Regions[0]
	r2.ID, r2.Code = 2, "far"
	// Each node's STUN answers only from "its" region, so a's home is
	// region 1 and b's region 2 (with the same map, the faster region
	// would win).
	noSTUN := func(r netmap.DERPRegion) netmap.DERPRegion {
		r.Nodes = slices.Clone(r.Nodes)
		r.Nodes[0].STUNPort = -1
		return r
	}
	maps := [2]netmap.DERPMap{{Regions: []netmap.DERPRegion{r1, noSTUN(r2)}}, {Regions: []netmap.DERPRegion{noSTUN(r1), r2}}}
	a, b := newTestNode(t, "a", "100.64.0.1"), newTestNode(t, "b", "100.64.0.2")
	na, nb := a.node(1, false), b.node(2, false)
	na.HomeDERP, nb.HomeDERP = 1, 2 // as each publishes it
	for i, x := range []struct {
		self      *testNode
		selfN, pN netmap.Node
		peer      *testNode
	}{{a, na, nb, b}, {b, nb, na, a}} {
		pN := x.pN
		x.self.bind.SetNetworkMap(&netmap.NetworkMap{Self: x.selfN, Peers: map[netmap.NodeID]*netmap.Node{pN.ID: &pN}, DERPMap: maps[i]})
		pk := x.peer.key.Public()
		if err := x.self.dev.IpcSet(fmt.Sprintf("public_key=%x\nendpoint=%s\nallowed_ip=%s/32\n", pk[:], EndpointFor(pk), x.peer.ip)); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for a.bind.HomeDERP() != 1 || b.bind.HomeDERP() != 2 {
		if time.Now().After(deadline) {
			t.Fatalf("homes a=%d b=%d, want 1 and 2", a.bind.HomeDERP(), b.bind.HomeDERP())
		}
		time.Sleep(20 * time.Millisecond)
	}
	transfer(t, a, b, 256<<10)
	if st := waitPath(t, a, b, PathDERP, 5*time.Second); st.DERPRegion != 2 || st.DERPCode != "far" {
		t.Errorf("a -> b through %+v, want b's home, region 2 (far)", st)
	}
	if st := waitPath(t, b, a, PathDERP, 5*time.Second); st.DERPRegion != 1 || st.DERPCode != "lab" {
		t.Errorf("b -> a through %+v, want a's home, region 1 (lab)", st)
	}
}

// TestDoubtfulPathCopiesToRelay: when a trusted direct path stops
// answering heartbeats, traffic also goes through the relay at once rather
// than after TrustDuration: a transfer started after the cut completes
// long before the direct path's trust (a minute) lapses, and status shows
// the relay that carries it.
func TestDoubtfulPathCopiesToRelay(t *testing.T) {
	dm := startRelay(t)
	cuts := [2]*cuttableBind{}
	mk := func(i int, name, ip string) *testNode {
		return newTestNodeSetup(t, name, ip, nodeSetup{
			opts: func(o *Options) {
				// Trust outlasts the whole test: only the copies sent
				// while in doubt can carry the transfer.
				o.Paths.TrustDuration = time.Minute
			},
			bind: func(b *Bind) {
				cuts[i] = &cuttableBind{Bind: b.std}
				b.std = cuts[i]
			},
		})
	}
	a, b := mk(0, "a", "100.64.0.1"), mk(1, "b", "100.64.0.2")
	connect(t, a, b, dm, true)
	transfer(t, a, b, 64<<10)
	waitPath(t, a, b, PathDirect, 5*time.Second)
	waitPath(t, b, a, PathDirect, 5*time.Second)
	cuts[0].cut.Store(true)
	cuts[1].cut.Store(true)
	transfer(t, a, b, 256<<10)
	transfer(t, b, a, 256<<10)
	for _, x := range [][2]*testNode{{a, b}, {b, a}} {
		x[0].bind.mu.Lock()
		p := x[0].bind.peers[x[1].key.Public()]
		x[0].bind.mu.Unlock()
		p.mu.Lock()
		_, trusted := p.sel.Path(time.Now())
		p.mu.Unlock()
		if !trusted {
			t.Errorf("%s -> %s: direct path no longer trusted; the test is not testing the doubt", x[0].name, x[1].name)
		}
		if st := x[0].bind.PeerStatus(x[1].key.Public()); st.Path != PathDERP || st.DERPCode != "lab" {
			t.Errorf("%s -> %s: %+v, want the relay shown while the direct path is in doubt", x[0].name, x[1].name, st)
		}
	}
}

// TestDiscoLoopPollsActivePeersOnly: with many peers in the map, the disco
// loop polls only those with recent traffic, and a peer leaves it once idle
// (so an idle node with thousands of peers does no per-peer work).
func TestDiscoLoopPollsActivePeersOnly(t *testing.T) {
	dm := startRelay(t)
	a := newTestNodeSetup(t, "a", "100.64.0.1", nodeSetup{opts: func(o *Options) {
		o.Paths.ActiveTimeout = 2 * time.Second
	}})
	b := newTestNode(t, "b", "100.64.0.2")
	connect(t, a, b, dm, true)
	// 500 more peers that never send or receive anything.
	nm := &netmap.NetworkMap{Self: a.node(1, true), Peers: map[netmap.NodeID]*netmap.Node{}, DERPMap: dm}
	nb := b.node(2, true)
	nm.Peers[2] = &nb
	for i := range 500 {
		n := netmap.Node{ID: netmap.NodeID(100 + i), NodeKey: netmap.NewNodePrivate().Public(), DiscoKey: netmap.NewDiscoPrivate().Public(), HomeDERP: 1,
			Endpoints: []netip.AddrPort{netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(20000+i))}}
		nm.Peers[n.ID] = &n
	}
	a.bind.SetNetworkMap(nm)
	if n := a.bind.polledPeers(); n != 0 {
		t.Fatalf("%d peers polled before any traffic, want 0", n)
	}
	transfer(t, a, b, 64<<10)
	if n := a.bind.polledPeers(); n != 1 {
		t.Fatalf("%d peers polled while talking to one, want 1", n)
	}
	waitPath(t, a, b, PathDirect, 5*time.Second)
	deadline := time.Now().Add(10 * time.Second)
	for a.bind.polledPeers() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d peers still polled 10 s after the traffic stopped (active timeout 2 s)", a.bind.polledPeers())
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Traffic again: back in the loop, and the path works.
	transfer(t, a, b, 64<<10)
	if n := a.bind.polledPeers(); n != 1 {
		t.Fatalf("%d peers polled after traffic resumed, want 1", n)
	}
}
