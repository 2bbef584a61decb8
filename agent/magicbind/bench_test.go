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

// BenchmarkDemux is the per-packet cost the magic bind adds on receive:
// telling WireGuard from disco and STUN and mapping the source address to
// the peer's endpoint, for a full batch of WireGuard packets.
func BenchmarkDemux(b *testing.B) {
	peerKey := netmap.NewNodePrivate().Public()
	src := netip.MustParseAddrPort("127.0.0.1:41641")
	mb := New(Options{NodeKey: netmap.NewNodePrivate(), DiscoKey: netmap.NewDiscoPrivate()})
	mb.SetNetworkMap(&netmap.NetworkMap{Peers: map[netmap.NodeID]*netmap.Node{1: {
		ID: 1, NodeKey: peerKey, DiscoKey: netmap.NewDiscoPrivate().Public(), Endpoints: []netip.AddrPort{src},
	}}})
	const batch = conn.IdealBatchSize
	stdEP := &conn.StdNetEndpoint{AddrPort: src}
	inner := func(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		for i := range packets {
			packets[i][0] = 4 // WireGuard transport data
			sizes[i] = 1420
			eps[i] = stdEP
		}
		return len(packets), nil
	}
	recv := mb.wrapReceive(inner)
	packets, sizes, eps := make([][]byte, batch), make([]int, batch), make([]conn.Endpoint, batch)
	for i := range packets {
		packets[i] = make([]byte, 1500)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if n, _ := recv(packets, sizes, eps); n != batch || sizes[0] == 0 {
			b.Fatal("packet not delivered")
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*batch), "ns/packet")
}

// BenchmarkSend compares sending a batch of WireGuard-sized datagrams to a
// loopback socket through the magic bind (peer on a direct path) with
// conn.StdNetBind, which it wraps: the difference is the path lookup.
func BenchmarkSend(b *testing.B) {
	sink, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		b.Fatal(err)
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
	const batch = 64
	bufs := make([][]byte, batch)
	for i := range bufs {
		bufs[i] = make([]byte, 1420, 1500)
	}

	b.Run("std", func(b *testing.B) {
		sb := conn.NewStdNetBind()
		if _, _, err := sb.Open(0); err != nil {
			b.Fatal(err)
		}
		defer sb.Close()
		ep := &conn.StdNetEndpoint{AddrPort: dst}
		b.SetBytes(batch * 1420)
		b.ReportAllocs()
		for b.Loop() {
			if err := sb.Send(bufs, ep); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("magic-direct", func(b *testing.B) {
		peerKey := netmap.NewNodePrivate().Public()
		mb := New(Options{NodeKey: netmap.NewNodePrivate(), DiscoKey: netmap.NewDiscoPrivate(),
			Paths: endpoint.Config{TrustDuration: time.Hour, HeartbeatInterval: time.Hour}})
		mb.SetNetworkMap(&netmap.NetworkMap{Peers: map[netmap.NodeID]*netmap.Node{1: {
			ID: 1, NodeKey: peerKey, Endpoints: []netip.AddrPort{dst}, // no disco key: no pings
		}}})
		if _, _, err := mb.Open(0); err != nil {
			b.Fatal(err)
		}
		defer mb.Close()
		ep, _ := mb.ParseEndpoint(EndpointFor(peerKey))
		p := ep.(*Endpoint).p
		// Trust the path as a pong would.
		now := time.Now()
		p.mu.Lock()
		p.sel.NoteActivity(now)
		for _, pr := range p.sel.Poll(now).Pings {
			p.sel.HandlePong(now, pr.TxID, pr.To)
		}
		p.mu.Unlock()
		if st := mb.PeerStatus(peerKey); st.Path != PathDirect {
			b.Fatalf("path %+v, want direct", st)
		}
		b.SetBytes(batch * 1420)
		b.ReportAllocs()
		for b.Loop() {
			if err := mb.Send(bufs, ep); err != nil {
				b.Fatal(err)
			}
		}
	})
}
