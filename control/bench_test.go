package control

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
)

// benchNode builds node id with realistic fields (two addresses, three
// endpoints, keys, tags) without walking the address pool.
func benchNode(id netmap.NodeID) *netmap.Node {
	i := uint32(id - 1)
	v4 := netip.AddrFrom4([4]byte{100, 64 + byte(i/254/256), byte(i / 254 % 256), byte(i%254 + 1)})
	addrs := addrPool{}.Addresses(v4)
	return &netmap.Node{
		ID: id, Hostname: fmt.Sprintf("gpu-%05d", id), Tags: []string{"tag:gpu", "tag:prod"},
		MachineKey: netmap.MachinePublic{1, byte(id), byte(id >> 8)}, NodeKey: netmap.NodePublic{2, byte(id), byte(id >> 8)},
		DiscoKey: netmap.DiscoPublic{3, byte(id), byte(id >> 8)}, Addresses: addrs, AllowedIPs: addrs,
		Endpoints: []netip.AddrPort{
			netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(id >> 8), byte(id)}), 41641),
			netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 51, byte(id >> 8), byte(id)}), 41641),
			netip.MustParseAddrPort("[2001:db8::1]:41641"),
		},
		HomeDERP: 1, Online: true, Created: time.Unix(1700000000, 0).UTC(),
	}
}

// benchHub makes a hub with n online nodes, each with an open session
// (attached directly: setting up 10,000 streams is not what is measured).
func benchHub(n int) *hub {
	h := newHub("bench", nil, 8, time.Now)
	for id := netmap.NodeID(1); id <= netmap.NodeID(n); id++ {
		n := benchNode(id)
		h.nodes[id] = n
		h.byKey[n.NodeKey] = id
		// Streaming with the current protocol, as meshd nodes do.
		h.sessions[id] = []*session{{node: id, q: newFrameQueue(8), dead: make(chan struct{}), patches: true, rulePatches: true}}
	}
	return h
}

// drainAll empties every session queue and returns the size of one frame
// seen (all sessions get the same shared frame) and the total bytes.
func drainAll(h *hub) (frame, total int) {
	for _, ss := range h.sessions {
		for _, s := range ss {
			for _, f := range s.q.take(nil) {
				frame = len(f)
				total += len(f)
			}
		}
	}
	return frame, total
}

var benchSizes = []int{1000, 10000}

// BenchmarkJoinDelta measures one node joining a tailnet of n connected
// nodes: the work is one encode plus n queue sends (O(n) for n affected
// nodes), where rebuilding every map would be O(n²).
func BenchmarkJoinDelta(b *testing.B) {
	for _, n := range benchSizes {
		b.Run(fmt.Sprintf("nodes=%d", n), func(b *testing.B) {
			h := benchHub(n)
			var frame, total int
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				id := netmap.NodeID(n + 1)
				h.upsert(benchNode(id))
				b.StopTimer()
				frame, total = drainAll(h)
				h.remove(id, controlclient.ErrNotRegistered)
				drainAll(h)
				b.StartTimer()
			}
			b.ReportMetric(float64(frame), "bytes/update")
			b.ReportMetric(float64(total), "fanout-bytes/op")
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(n), "ns/affected-node")
		})
	}
}

// BenchmarkLeaveDelta measures one node leaving.
func BenchmarkLeaveDelta(b *testing.B) {
	for _, n := range benchSizes {
		b.Run(fmt.Sprintf("nodes=%d", n), func(b *testing.B) {
			h := benchHub(n)
			id := netmap.NodeID(n + 1)
			h.upsert(benchNode(id))
			drainAll(h)
			var frame int
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				h.remove(id, controlclient.ErrNotRegistered)
				b.StopTimer()
				frame, _ = drainAll(h)
				h.upsert(benchNode(id))
				drainAll(h)
				b.StartTimer()
			}
			b.ReportMetric(float64(frame), "bytes/update")
		})
	}
}

// BenchmarkEndpointChange measures a peer's endpoints changing: a PeerPatch
// of a few dozen bytes fanned out to everyone.
func BenchmarkEndpointChange(b *testing.B) {
	for _, n := range benchSizes {
		b.Run(fmt.Sprintf("nodes=%d", n), func(b *testing.B) {
			h := benchHub(n)
			var frame int
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				nn := *h.nodes[1]
				nn.Endpoints = []netip.AddrPort{netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 51, 100, byte(i)}), uint16(40000+i%1000))}
				h.upsert(&nn)
				b.StopTimer()
				frame, _ = drainAll(h)
				b.StartTimer()
			}
			b.ReportMetric(float64(frame), "bytes/update")
		})
	}
}

// BenchmarkFullMap measures building and encoding one node's full map, the
// cost paid once per new (or non-resumable) stream.
func BenchmarkFullMap(b *testing.B) {
	for _, n := range benchSizes {
		b.Run(fmt.Sprintf("nodes=%d", n), func(b *testing.B) {
			h := benchHub(n)
			self := h.nodes[1]
			var size int
			b.ReportAllocs()
			for i := 0; i < b.N; i++ {
				h.mu.Lock()
				m := h.fullLocked(self)
				h.mu.Unlock()
				f, err := m.frame()
				if err != nil {
					b.Fatal(err)
				}
				size = len(f)
			}
			b.ReportMetric(float64(size), "bytes/map")
		})
	}
}

// BenchmarkNaiveRebuild is the design we avoid (headscale's): on every
// change, rebuild and send every node's full map. At 1,000 nodes it already
// costs ~n times BenchmarkFullMap per change; 10,000 is left out because
// one iteration takes minutes.
func BenchmarkNaiveRebuild(b *testing.B) {
	n := 1000
	b.Run(fmt.Sprintf("nodes=%d", n), func(b *testing.B) {
		h := benchHub(n)
		var total int
		for i := 0; i < b.N; i++ {
			total = 0
			h.mu.Lock()
			for _, self := range h.nodes {
				// No peer-JSON cache: the naive design encodes every map anew.
				clear(h.peerJSON)
				f, err := h.fullLocked(self).frame()
				if err != nil {
					b.Fatal(err)
				}
				total += len(f)
			}
			h.mu.Unlock()
		}
		b.ReportMetric(float64(total), "fanout-bytes/op")
	})
}
