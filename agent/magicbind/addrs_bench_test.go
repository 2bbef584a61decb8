package magicbind

import (
	"net/netip"
	"sync"
	"testing"
)

// BenchmarkAddrLookup is the receive path's per-packet lookup alone, in
// the address index and in the structures addrs.go compares it with (a Go
// map, as the bind used before, and a sync.Map), holding 1 or 20,000
// addresses; each looks up a present address and an absent one.
func BenchmarkAddrLookup(b *testing.B) {
	p := &peer{}
	hit, miss := peerEndpoint(0, 0), learntEndpoint(0)
	for _, n := range []int{1, 2 * mapPeers} {
		var x addrIndex
		x.init()
		m := map[netip.AddrPort]*peer{}
		var sm sync.Map
		for i := range n {
			a := peerEndpoint(i/2, i%2)
			x.claim(a, p)
			m[a] = p
			sm.Store(a, p)
		}
		t := x.table.Load()
		for _, bc := range []struct {
			name   string
			lookup func(netip.AddrPort) *peer
		}{
			{"table", t.lookup},
			{"gomap", func(a netip.AddrPort) *peer { return m[a] }},
			{"syncmap", func(a netip.AddrPort) *peer {
				v, _ := sm.Load(a)
				q, _ := v.(*peer)
				return q
			}},
		} {
			b.Run(bc.name+"/"+map[bool]string{true: "1", false: "20000"}[n == 1], func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					if bc.lookup(hit) != p || bc.lookup(miss) != nil {
						b.Fatal("wrong lookup")
					}
				}
			})
		}
	}
}
