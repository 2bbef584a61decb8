package magicbind

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn"

	"meshd.dev/meshd/nat/endpoint"
	"meshd.dev/meshd/netmap"
)

// TestCountersPerPath: sends count on the path they took (here: direct, to
// the published endpoint), receives count per peer including handshake
// messages and only from known addresses, and counting allocates nothing.
func TestCountersPerPath(t *testing.T) {
	sink, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	go func() {
		buf := make([]byte, 65536)
		for {
			if _, _, err := sink.ReadFrom(buf); err != nil {
				return
			}
		}
	}()
	dst := sink.LocalAddr().(*net.UDPAddr).AddrPort()
	peerKey := netmap.NewNodePrivate().Public()
	mb := New(Options{NodeKey: netmap.NewNodePrivate(), DiscoKey: netmap.NewDiscoPrivate(),
		Paths: endpoint.Config{TrustDuration: time.Hour, HeartbeatInterval: time.Hour}})
	mb.SetNetworkMap(&netmap.NetworkMap{Peers: map[netmap.NodeID]*netmap.Node{1: {
		ID: 1, NodeKey: peerKey, Endpoints: []netip.AddrPort{dst},
	}}})
	if _, _, err := mb.Open(0); err != nil {
		t.Fatal(err)
	}
	defer mb.Close()
	ep, _ := mb.ParseEndpoint(EndpointFor(peerKey))
	p := ep.(*Endpoint).p

	get := func() PeerCounters {
		var got PeerCounters
		mb.Counters(func(c PeerCounters) {
			if c.Key == peerKey {
				got = c
			}
		})
		return got
	}
	// No trusted path yet: the bind sends to the published endpoint (a
	// direct send on a guess).
	bufs := [][]byte{make([]byte, 1000), make([]byte, 500)}
	if err := mb.Send(bufs, ep); err != nil {
		t.Fatal(err)
	}
	if c := get(); c.TxPackets[pathDirect] != 2 || c.TxBytes[pathDirect] != 1500 || c.TxPackets[pathDERP] != 0 {
		t.Fatalf("after a batch of 2 to the published endpoint: %+v", c)
	}
	if err := mb.Send(bufs, ep); err != nil {
		t.Fatal(err)
	}
	c := get()
	if c.TxPackets[pathDirect] != 4 || c.TxBytes[pathDirect] != 3000 {
		t.Fatalf("after a second batch: %+v", c)
	}
	// A handshake initiation counts as a handshake message too.
	init := make([]byte, wgInitiationSize)
	init[0] = wgInitiationType
	if err := mb.Send([][]byte{init}, ep); err != nil {
		t.Fatal(err)
	}
	if c := get(); c.HandshakesTx != 1 {
		t.Errorf("handshakes sent %d, want 1", c.HandshakesTx)
	}

	// Receive: a batch from the peer's address, one of them a handshake
	// response, and one from an unknown address that is not counted.
	resp := make([]byte, wgResponseSize)
	resp[0] = wgResponseType
	stranger := &conn.StdNetEndpoint{AddrPort: netip.MustParseAddrPort("127.0.0.9:9")}
	known := &conn.StdNetEndpoint{AddrPort: dst}
	inner := func(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		for i := range 4 {
			packets[i][0] = 4 // transport data
			sizes[i], eps[i] = 200, known
		}
		sizes[2], eps[2] = 300, stranger
		copy(packets[3], resp)
		sizes[3] = len(resp)
		return 4, nil
	}
	recv := mb.wrapReceive(inner)
	packets, sizes, eps := make([][]byte, 4), make([]int, 4), make([]conn.Endpoint, 4)
	for i := range packets {
		packets[i] = make([]byte, 1500)
	}
	if _, err := recv(packets, sizes, eps); err != nil {
		t.Fatal(err)
	}
	c = get()
	if c.RxPackets[pathDirect] != 3 || c.RxBytes[pathDirect] != 400+wgResponseSize {
		t.Errorf("after receiving 3 from the peer (one a handshake response) and 1 from a stranger: %+v", c)
	}
	if a := testing.AllocsPerRun(100, func() { recv(packets, sizes, eps) }); a != 0 {
		t.Errorf("%v allocations per received batch with counting, want 0", a)
	}
	// The socket send itself allocates (wireguard-go's StdNetBind, as
	// BenchmarkSend/std shows); the counting must not add any.
	if a := testing.AllocsPerRun(100, func() { p.ctr.addTx(pathDirect, bufs) }); a != 0 {
		t.Errorf("%v allocations per counted batch, want 0", a)
	}
}

// TestPathChanges: the first path a peer's sends take is no change; the
// same path again is none; relay to direct, one direct address to
// another, and back to the relay each count one.
func TestPathChanges(t *testing.T) {
	relay := netip.AddrPort{}
	a, b := netip.MustParseAddrPort("198.18.0.2:41641"), netip.MustParseAddrPort("198.18.0.3:41641")
	for _, tt := range []struct {
		name  string
		paths []netip.AddrPort
		want  uint64
	}{
		{"first path", []netip.AddrPort{relay}, 0},
		{"same path", []netip.AddrPort{a, a, a}, 0},
		{"relay to direct", []netip.AddrPort{relay, relay, a}, 1},
		{"roam and fall back", []netip.AddrPort{a, b, b, relay, a}, 3},
	} {
		var p peer
		for _, x := range tt.paths {
			p.notePathLocked(x)
		}
		if got := p.ctr.pathChanges.Load(); got != tt.want {
			t.Errorf("%s: %d changes, want %d", tt.name, got, tt.want)
		}
	}
}
