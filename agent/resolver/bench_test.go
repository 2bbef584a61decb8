package resolver

import (
	"context"
	"fmt"
	"net/netip"
	"testing"

	"github.com/miekg/dns"

	"meshd.dev/meshd/netmap"
)

// bigMap is a map of n peers named peerN, each with an IPv4 and IPv6.
func bigMap(n int) *netmap.NetworkMap {
	nm := &netmap.NetworkMap{
		Self:  *node(1, "self", "100.64.0.1", "fd5e:5a1e:d::6440:1"),
		Peers: make(map[netmap.NodeID]*netmap.Node, n),
		DNS:   netmap.DNSConfig{Suffix: "meshd.internal"},
	}
	for i := range n {
		id := netmap.NodeID(i + 2)
		v4 := netip.AddrFrom4([4]byte{100, 64 + byte(i>>16), byte(i >> 8), byte(i)}).Next()
		b := v4.As4()
		v6 := netip.AddrFrom16([16]byte{0xfd, 0x5e, 0x5a, 0x1e, 0, 0xd, 12: b[0], 13: b[1], 14: b[2], 15: b[3]})
		nm.Peers[id] = node(id, fmt.Sprintf("peer%d", i), v4.String(), v6.String())
	}
	return nm
}

// lookupName is the hot part of answering a tailnet name: lowercase into
// a stack buffer, one map lookup.
func lookupName(t *table, name string) *entry {
	var buf [256]byte
	return t.lookup(string(lowerName(buf[:], name)))
}

func TestLookupAllocatesNothing(t *testing.T) {
	tab, _ := newTable(bigMap(1000))
	if n := testing.AllocsPerRun(100, func() {
		if lookupName(tab, "Peer500.MeshD.Internal.") == nil {
			t.Fatal("peer500 not found")
		}
	}); n != 0 {
		t.Fatalf("%v allocations per lookup", n)
	}
}

// BenchmarkLookup10k: the table lookup of a name at 10,000 peers.
func BenchmarkLookup10k(b *testing.B) {
	tab, _ := newTable(bigMap(10000))
	names := make([]string, 1024)
	for i := range names {
		names[i] = fmt.Sprintf("Peer%d.meshd.internal.", i*9)
	}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		if lookupName(tab, names[i%len(names)]) == nil {
			b.Fatal("not found")
		}
	}
}

// BenchmarkRespond10k: a whole A query, wire bytes in and out (parse,
// lookup, answer, pack), at 10,000 peers.
func BenchmarkRespond10k(b *testing.B) {
	r := New(Options{Upstreams: fixed()})
	r.SetMap(bigMap(10000))
	qs := make([][]byte, 1024)
	for i := range qs {
		qs[i] = query(b, fmt.Sprintf("peer%d.meshd.internal.", i*9), dns.TypeA, 0)
	}
	ctx := context.Background()
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		if r.Respond(ctx, qs[i%len(qs)], false) == nil {
			b.Fatal("no answer")
		}
	}
}

// BenchmarkSetMap10k: building the name table of a 10,000-peer map, which
// happens once per map.
func BenchmarkSetMap10k(b *testing.B) {
	nm := bigMap(10000)
	r := New(Options{})
	b.ReportAllocs()
	for b.Loop() {
		r.SetMap(nm)
	}
}
