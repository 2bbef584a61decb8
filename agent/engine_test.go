package agent

import (
	"context"
	"io"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"meshd.dev/meshd/netmap"
)

// testEngine starts a real netstack + WireGuard data plane on loopback.
func testEngine(t *testing.T, key netmap.NodePrivate, addr string) *engine {
	t.Helper()
	e, err := newEngine(engineConfig{
		tunName: TUNUserspace, mtu: 1280, port: 0, nodeKey: key,
		addrs: pfx(addr + "/32"), log: slog.New(slog.DiscardHandler),
		localAddrs: func() ([]netip.Prefix, error) { return pfx("127.0.0.1/8"), nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.close)
	return e
}

// TestEngineTCPThroughWireGuard connects two data planes over real
// WireGuard on loopback, checks the peer counters, then removes the peer and
// checks traffic stops.
func TestEngineTCPThroughWireGuard(t *testing.T) {
	ka, kb := netmap.NewNodePrivate(), netmap.NewNodePrivate()
	a := testEngine(t, ka, "100.64.0.1")
	b := testEngine(t, kb, "100.64.0.2")
	na := netmap.Node{ID: 1, NodeKey: ka.Public(), Addresses: pfx("100.64.0.1/32"), AllowedIPs: pfx("100.64.0.1/32"),
		Endpoints: []netip.AddrPort{netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), a.port)}}
	nb := netmap.Node{ID: 2, NodeKey: kb.Public(), Addresses: pfx("100.64.0.2/32"), AllowedIPs: pfx("100.64.0.2/32"),
		Endpoints: []netip.AddrPort{netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), b.port)}}
	mapA := &netmap.NetworkMap{Self: na, Peers: map[netmap.NodeID]*netmap.Node{2: &nb}}
	mapB := &netmap.NetworkMap{Self: nb, Peers: map[netmap.NodeID]*netmap.Node{1: &na}}
	if err := a.applyMap(mapA); err != nil {
		t.Fatal(err)
	}
	if err := b.applyMap(mapB); err != nil {
		t.Fatal(err)
	}
	ln, err := b.listen(netip.MustParseAddrPort("100.64.0.2:8080"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	payload := make([]byte, 256<<10)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.Write(payload)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	c, err := a.dial(ctx, netip.MustParseAddrPort("100.64.0.2:8080"))
	if err != nil {
		t.Fatalf("dial through WireGuard: %v", err)
	}
	got, err := io.ReadAll(c)
	c.Close()
	if err != nil || len(got) != len(payload) {
		t.Fatalf("read %d bytes, %v; want %d", len(got), err, len(payload))
	}
	for i := range got {
		if got[i] != payload[i] {
			t.Fatalf("byte %d differs", i)
		}
	}
	st, err := a.stats()
	if err != nil {
		t.Fatal(err)
	}
	ps := st.Peers[kb.Public()]
	if ps.LastHandshake.IsZero() || ps.RxBytes < uint64(len(payload)) || ps.TxBytes == 0 {
		t.Fatalf("peer stats after transfer: %+v", ps)
	}

	// Same map again: no reconfiguration, the session survives.
	if diff := uapiDiff(a.peers, a.wantPeers(mapA)); diff != "" {
		t.Fatalf("re-applying the same map would change the device:\n%s", diff)
	}

	// Peer removed from A's map: A can no longer reach B.
	if err := a.applyMap(&netmap.NetworkMap{Self: na, Peers: map[netmap.NodeID]*netmap.Node{}}); err != nil {
		t.Fatal(err)
	}
	if st, _ := a.stats(); len(st.Peers) != 0 {
		t.Fatalf("peer still configured after removal: %+v", st.Peers)
	}
	short, cancel2 := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel2()
	if c, err := a.dial(short, netip.MustParseAddrPort("100.64.0.2:8080")); err == nil {
		c.Close()
		t.Fatal("dial succeeded after the peer was removed")
	}
}

// BenchmarkEngineTCP measures bulk TCP throughput between two userspace
// (netstack) data planes over real WireGuard on loopback: the sidecar
// path's ceiling on this machine.
func BenchmarkEngineTCP(b *testing.B) {
	ka, kb := netmap.NewNodePrivate(), netmap.NewNodePrivate()
	mk := func(key netmap.NodePrivate, addr string) *engine {
		e, err := newEngine(engineConfig{
			tunName: TUNUserspace, mtu: 1280, nodeKey: key, addrs: pfx(addr + "/32"),
			log: slog.New(slog.DiscardHandler), localAddrs: func() ([]netip.Prefix, error) { return pfx("127.0.0.1/8"), nil },
		})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(e.close)
		return e
	}
	a, c := mk(ka, "100.64.0.1"), mk(kb, "100.64.0.2")
	lo := netip.MustParseAddr("127.0.0.1")
	na := netmap.Node{ID: 1, NodeKey: ka.Public(), Addresses: pfx("100.64.0.1/32"), Endpoints: []netip.AddrPort{netip.AddrPortFrom(lo, a.port)}}
	nb := netmap.Node{ID: 2, NodeKey: kb.Public(), Addresses: pfx("100.64.0.2/32"), Endpoints: []netip.AddrPort{netip.AddrPortFrom(lo, c.port)}}
	a.applyMap(&netmap.NetworkMap{Self: na, Peers: map[netmap.NodeID]*netmap.Node{2: &nb}})
	c.applyMap(&netmap.NetworkMap{Self: nb, Peers: map[netmap.NodeID]*netmap.Node{1: &na}})
	ln, err := c.listen(netip.MustParseAddrPort("100.64.0.2:5201"))
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		s, err := ln.Accept()
		if err != nil {
			return
		}
		io.Copy(io.Discard, s)
		s.Close()
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	conn, err := a.dial(ctx, netip.MustParseAddrPort("100.64.0.2:5201"))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	buf := make([]byte, 64<<10)
	b.SetBytes(int64(len(buf)))
	b.ResetTimer()
	for b.Loop() {
		if _, err := conn.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
}
