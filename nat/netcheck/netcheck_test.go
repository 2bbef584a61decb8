package netcheck

import (
	"context"
	"net"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"meshd.dev/meshd/nat/stun"
	"meshd.dev/meshd/netmap"
)

func stunServer(t *testing.T) netip.AddrPort {
	t.Helper()
	s, err := stun.Listen("127.0.0.1:0", nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.Serve(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return s.AddrPort()
}

func tcpListener(t *testing.T) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

func region(id int, stunAddr, derpAddr netip.AddrPort) netmap.DERPRegion {
	n := netmap.DERPNode{Name: "n", Host: stunAddr.Addr().String(), STUNPort: int(stunAddr.Port())}
	if derpAddr.IsValid() {
		n.DERPPort = int(derpAddr.Port())
	}
	return netmap.DERPRegion{ID: id, Code: "r", Nodes: []netmap.DERPNode{n}}
}

// natEmu stands in for a NAT in front of the prober: one UDP front port per
// STUN server, relaying through outbound sockets. Sharing one outbound
// socket for all destinations is an endpoint-independent mapping; one per
// destination is what a symmetric NAT does.
type natEmu struct {
	fronts []netip.AddrPort
}

func newNATEmu(t *testing.T, servers []netip.AddrPort, symmetric bool) *natEmu {
	t.Helper()
	e := &natEmu{}
	var shared *net.UDPConn
	var wg sync.WaitGroup
	var conns []*net.UDPConn
	listen := func() *net.UDPConn {
		c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		return c
	}
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
		wg.Wait()
	})
	var mu sync.Mutex
	var client netip.AddrPort
	frontFor := map[netip.AddrPort]*net.UDPConn{}
	relayBack := func(out *net.UDPConn) {
		defer wg.Done()
		buf := make([]byte, 1500)
		for {
			n, from, err := out.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			mu.Lock()
			front, dst := frontFor[from], client
			mu.Unlock()
			if front != nil && dst.IsValid() {
				front.WriteToUDPAddrPort(buf[:n], dst)
			}
		}
	}
	if !symmetric {
		shared = listen()
		wg.Add(1)
		go relayBack(shared)
	}
	for _, srv := range servers {
		front := listen()
		out := shared
		if symmetric {
			out = listen()
			wg.Add(1)
			go relayBack(out)
		}
		mu.Lock()
		frontFor[srv] = front
		mu.Unlock()
		e.fronts = append(e.fronts, front.LocalAddr().(*net.UDPAddr).AddrPort())
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 1500)
			for {
				n, from, err := front.ReadFromUDPAddrPort(buf)
				if err != nil {
					return
				}
				mu.Lock()
				client = from
				mu.Unlock()
				out.WriteToUDPAddrPort(buf[:n], srv)
			}
		}()
	}
	return e
}

func TestRunTwoSTUNServers(t *testing.T) {
	derp := tcpListener(t)
	s1, s2 := stunServer(t), stunServer(t)
	dm := &netmap.DERPMap{Regions: []netmap.DERPRegion{region(1, s1, derp), region(2, s2, derp)}}
	r, err := Run(context.Background(), Options{DERPMap: dm, ListenV4: "127.0.0.1:0", ListenV6: "[::1]:0", Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if !r.UDP || !r.IPv4 || r.IPv6 {
		t.Fatalf("udp=%v ipv4=%v ipv6=%v, want v4 UDP only", r.UDP, r.IPv4, r.IPv6)
	}
	if r.GlobalV4.Addr() != netip.MustParseAddr("127.0.0.1") || r.GlobalV4.Port() == 0 {
		t.Fatalf("global v4 %v", r.GlobalV4)
	}
	if r.MappingVariesByDest == nil || *r.MappingVariesByDest {
		t.Fatalf("mapping varies = %v, want false on loopback", r.MappingVariesByDest)
	}
	if len(r.RegionLatency) != 2 || len(r.RegionLatencyTCP) != 0 {
		t.Fatalf("latencies %v (tcp %v), want both regions over UDP", r.RegionLatency, r.RegionLatencyTCP)
	}
	if r.PreferredDERP != 1 && r.PreferredDERP != 2 {
		t.Fatalf("preferred %d", r.PreferredDERP)
	}
	for id, d := range r.RegionLatency {
		if d <= 0 || d > 5*time.Second || (id == r.PreferredDERP) != (d == min(r.RegionLatency[1], r.RegionLatency[2])) {
			t.Fatalf("region %d latency %v inconsistent with preferred %d", id, d, r.PreferredDERP)
		}
	}
}

func TestRunDetectsSymmetricNAT(t *testing.T) {
	for _, tt := range []struct {
		name      string
		symmetric bool
	}{{"endpoint-independent", false}, {"symmetric", true}} {
		t.Run(tt.name, func(t *testing.T) {
			s1, s2 := stunServer(t), stunServer(t)
			nat := newNATEmu(t, []netip.AddrPort{s1, s2}, tt.symmetric)
			dm := &netmap.DERPMap{Regions: []netmap.DERPRegion{
				region(1, nat.fronts[0], netip.AddrPort{}),
				region(2, nat.fronts[1], netip.AddrPort{}),
			}}
			r, err := Run(context.Background(), Options{DERPMap: dm, ListenV4: "127.0.0.1:0", Timeout: 5 * time.Second})
			if err != nil {
				t.Fatal(err)
			}
			if r.MappingVariesByDest == nil {
				t.Fatalf("mapping behaviour not determined: %+v", r)
			}
			if *r.MappingVariesByDest != tt.symmetric {
				t.Fatalf("mapping varies = %v, want %v", *r.MappingVariesByDest, tt.symmetric)
			}
		})
	}
}

func TestRunUDPBlockedFallsBackToTCPLatency(t *testing.T) {
	// A bound socket that never answers: the STUN datagrams vanish.
	hole, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer hole.Close()
	derp := tcpListener(t)
	dm := &netmap.DERPMap{Regions: []netmap.DERPRegion{region(7, hole.LocalAddr().(*net.UDPAddr).AddrPort(), derp)}}
	r, err := Run(context.Background(), Options{DERPMap: dm, ListenV4: "127.0.0.1:0", Timeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if r.UDP || r.GlobalV4.IsValid() || r.MappingVariesByDest != nil {
		t.Fatalf("UDP reported working: %+v", r)
	}
	if _, ok := r.RegionLatency[7]; !ok || !slices.Equal(r.RegionLatencyTCP, []int{7}) || r.PreferredDERP != 7 {
		t.Fatalf("want region 7 measured over TCP and preferred, got %+v", r)
	}
}

func TestRunNeedsMap(t *testing.T) {
	if _, err := Run(context.Background(), Options{}); err == nil {
		t.Fatal("ran without a DERP map")
	}
}
