package control

import (
	"fmt"
	"strings"
	"testing"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
)

// tenantHub is benchHub with every node in one of 100 tenants.
func tenantHub(b testing.TB, n int) *hub {
	h := benchHub(n)
	for id, nd := range h.nodes {
		nd.Tags = []string{fmt.Sprintf("tag:tenant%d", int(id)%100)}
	}
	h.setPolicy(mustEngine(b, tenantPolicy(100)))
	drainAll(h)
	return h
}

// BenchmarkSetPolicy measures `admin policy set` on a hub of n connected
// nodes in 100 tenants, alternating two engines: the peer lists come from
// the engine's index (PeerLister), not a CanSee call per pair of nodes.
func BenchmarkSetPolicy(b *testing.B) {
	for _, n := range benchSizes {
		b.Run(fmt.Sprintf("nodes=%d", n), func(b *testing.B) {
			h := tenantHub(b, n)
			engines := []Policy{mustEngine(b, tenantPolicy(100)), mustEngine(b, tenantPolicy(100))}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				h.setPolicy(engines[i%2])
				b.StopTimer()
				drainAll(h)
				b.StartTimer()
			}
		})
	}
}

// tenantCapsPolicy is tenantPolicy with an "app" grant in each tenant:
// every node holds a capability on each of its tenant's peers.
func tenantCapsPolicy(k int) string {
	var owners, grants []string
	for i := range k {
		owners = append(owners, fmt.Sprintf(`"tag:tenant%d": []`, i))
		grants = append(grants, fmt.Sprintf(`{"src": ["tag:tenant%d"], "dst": ["tag:tenant%d"], "ip": ["*"], "app": {"example.com/cap/job": [{"tenant": %d}]}}`, i, i, i))
	}
	return `{"tagOwners": {` + strings.Join(owners, ",") + `}, "grants": [` + strings.Join(grants, ",") + `]}`
}

// BenchmarkSetPolicyCaps is BenchmarkSetPolicy where every tenant has an
// "app" grant, so capabilities must be computed for every pair of peers
// (the case the CapGrants gate cannot skip).
func BenchmarkSetPolicyCaps(b *testing.B) {
	for _, n := range benchSizes {
		b.Run(fmt.Sprintf("nodes=%d", n), func(b *testing.B) {
			h := tenantHub(b, n)
			engines := []Policy{mustEngine(b, tenantCapsPolicy(100)), mustEngine(b, tenantCapsPolicy(100))}
			h.setPolicy(engines[1])
			drainAll(h)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				h.setPolicy(engines[i%2])
				b.StopTimer()
				drainAll(h)
				b.StartTimer()
			}
		})
	}
}

// BenchmarkFullMapPolicy is BenchmarkFullMap under a 100-tenant policy: a
// node's full map lists only its tenant.
func BenchmarkFullMapPolicy(b *testing.B) {
	for _, n := range benchSizes {
		b.Run(fmt.Sprintf("nodes=%d", n), func(b *testing.B) {
			h := tenantHub(b, n)
			self := h.nodes[1]
			var peers int
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				h.mu.Lock()
				m := h.fullLocked(self)
				h.mu.Unlock()
				if _, err := m.frame(); err != nil {
					b.Fatal(err)
				}
				peers = len(m.peers)
			}
			if want := n/100 - 1; peers != want {
				b.Fatalf("full map lists %d peers, want the %d of node 1's tenant", peers, want)
			}
			b.ReportMetric(float64(peers), "peers/map")
		})
	}
}

// BenchmarkSetPolicyFilterChange is BenchmarkSetPolicy where every round
// changes every node's filter (another port in each tenant's grant) and
// no peer list: what bench/hascale's policy rounds do. Every connected
// node is sent a new filter.
func BenchmarkSetPolicyFilterChange(b *testing.B) {
	for _, n := range benchSizes {
		b.Run(fmt.Sprintf("nodes=%d", n), func(b *testing.B) {
			h := tenantHub(b, n)
			engines := []Policy{mustEngine(b, tenantPortPolicy(100, 10001)), mustEngine(b, tenantPortPolicy(100, 10002))}
			var total int
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				h.setPolicy(engines[i%2])
				b.StopTimer()
				_, total = drainAll(h)
				b.StartTimer()
			}
			b.ReportMetric(float64(total)/float64(n), "bytes/node")
		})
	}
}

// tenantPortPolicy is tenantPolicy opening only tcp:22 and tcp:port.
func tenantPortPolicy(k int, port int) string {
	var owners, grants []string
	for i := range k {
		owners = append(owners, fmt.Sprintf(`"tag:tenant%d": []`, i))
		grants = append(grants, fmt.Sprintf(`{"src": ["tag:tenant%d"], "dst": ["tag:tenant%d"], "ip": ["tcp:22", "tcp:%d"]}`, i, i, port))
	}
	return `{"tagOwners": {` + strings.Join(owners, ",") + `}, "grants": [` + strings.Join(grants, ",") + `]}`
}

// BenchmarkFullMapDecode is a node's side of BenchmarkFullMapPolicy: it
// decodes and applies the full map of a member of a tenant of 100, as a
// node does on every new stream (and every node of a dead replica at
// once, on failover).
func BenchmarkFullMapDecode(b *testing.B) {
	h := tenantHub(b, 10000)
	h.mu.Lock()
	m := h.fullLocked(h.nodes[1])
	h.mu.Unlock()
	frame, err := m.frame()
	if err != nil {
		b.Fatal(err)
	}
	body := frame[controlclient.FrameHeaderLen:]
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	for b.Loop() {
		resp, err := netmap.DecodeMapResponse(body)
		if err != nil {
			b.Fatal(err)
		}
		var nm netmap.NetworkMap
		if err := nm.Apply(resp); err != nil {
			b.Fatal(err)
		}
	}
}
