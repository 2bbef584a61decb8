package control

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
	"meshd.dev/meshd/policy"
)

func mustEngine(t testing.TB, src string) *policy.Engine {
	t.Helper()
	p, err := policy.Parse("test.hujson", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	return policy.NewEngine(p)
}

const prodPolicy = `{
	"tagOwners": {"tag:prod": [], "tag:dev": []},
	"grants": [{"src": ["tag:prod"], "dst": ["tag:prod"], "ip": ["*"], "app": {"example.com/cap/ops": [{"role": "admin"}]}}],
}`

// TestPolicyEngineThroughCoordinator runs the real policy engine behind a
// coordinator: visibility and filters follow joins and policy changes.
func TestPolicyEngineThroughCoordinator(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	ts.SetPolicy(mustEngine(t, prodPolicy))
	prod := ts.key(t, AuthKeyOptions{Tags: []string{"tag:prod"}, Reusable: true})
	dev := ts.key(t, AuthKeyOptions{Tags: []string{"tag:dev"}, Reusable: true})
	p1, p2, d1 := newTestNode(t, ts.url, ""), newTestNode(t, ts.url, ""), newTestNode(t, ts.url, "")
	p1.mustRegister(t, prod, "p1")
	p2.mustRegister(t, prod, "p2")
	d1.mustRegister(t, dev, "d1")
	for _, n := range []*testNode{p1, p2, d1} {
		n.follow(t, n.mapRequest())
	}
	srcs := func(m *netmap.NetworkMap) []netip.Prefix {
		var out []netip.Prefix
		for _, r := range m.PacketFilter {
			out = append(out, r.SrcIPs...)
		}
		return out
	}
	hasCap := func(p *netmap.Node) bool { return p != nil && len(p.Capabilities["example.com/cap/ops"]) == 1 }
	p1.waitMap(t, "p2 only, in the filter, with its app capability", func(m *netmap.NetworkMap) bool {
		return !m.PolicyBootstrap && slices.Equal(peerIDs(m), []netmap.NodeID{p2.id}) && slices.Contains(srcs(m), p2.self.Addresses[0]) &&
			hasCap(m.Peers[p2.id])
	})
	d1.waitMap(t, "nothing for dev", func(m *netmap.NetworkMap) bool {
		return len(m.Peers) == 0 && m.PacketFilter != nil && len(m.PacketFilter) == 0
	})
	// A prod node joining reaches p1's map and filter.
	p3 := newTestNode(t, ts.url, "")
	p3.mustRegister(t, prod, "p3")
	p1.waitMap(t, "p3 joined", func(m *netmap.NetworkMap) bool {
		return hasCap(m.Peers[p3.id]) && slices.Contains(srcs(m), p3.self.Addresses[0])
	})
	if d1.current().Peers[p3.id] != nil {
		t.Error("dev node learned about a prod node")
	}
	// Re-tagging d1 into prod: it now sees the prod nodes, and they see it.
	if err := ts.TagNode(t.Context(), d1.id, []string{"tag:prod"}); err != nil {
		t.Fatal(err)
	}
	d1.waitMap(t, "d1 sees prod", func(m *netmap.NetworkMap) bool { return len(m.Peers) == 3 && hasCap(m.Peers[p1.id]) })
	p1.waitMap(t, "p1 sees d1 and may be reached by it", func(m *netmap.NetworkMap) bool {
		return hasCap(m.Peers[d1.id]) && slices.Contains(srcs(m), d1.self.Addresses[0])
	})
	ts.SetPolicy(nil)
	p1.waitMap(t, "bootstrap again, capabilities gone", func(m *netmap.NetworkMap) bool {
		return m.PolicyBootstrap && len(m.Peers) == 3 && !hasCap(m.Peers[p2.id])
	})
}

// tenantPolicy gives each of k tenants a tag whose nodes reach each other.
func tenantPolicy(k int) string {
	var owners, grants []string
	for i := range k {
		owners = append(owners, fmt.Sprintf(`"tag:tenant%d": []`, i))
		grants = append(grants, fmt.Sprintf(`{"src": ["tag:tenant%d"], "dst": ["tag:tenant%d"], "ip": ["*"]}`, i, i))
	}
	return `{"tagOwners": {` + strings.Join(owners, ",") + `}, "grants": [` + strings.Join(grants, ",") + `]}`
}

// BenchmarkJoinDeltaPolicy is BenchmarkJoinDelta under a real policy: 100
// tenants whose nodes see only their own tenant. A join costs a CanSee per
// session plus a filter rebuild for the ~n/100 nodes of the joiner's tenant.
func BenchmarkJoinDeltaPolicy(b *testing.B) {
	const tenants = 100
	for _, n := range benchSizes {
		b.Run(fmt.Sprintf("nodes=%d", n), func(b *testing.B) {
			h := benchHub(n)
			for id, nd := range h.nodes {
				nd.Tags = []string{fmt.Sprintf("tag:tenant%d", int(id)%tenants)}
			}
			h.setPolicy(mustEngine(b, tenantPolicy(tenants)))
			drainAll(h)
			var total int
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				id := netmap.NodeID(n + 1)
				nd := benchNode(id)
				nd.Tags = []string{"tag:tenant7"}
				h.upsert(nd)
				b.StopTimer()
				_, total = drainAll(h)
				h.remove(id, controlclient.ErrNotRegistered)
				drainAll(h)
				b.StartTimer()
			}
			b.ReportMetric(float64(total), "fanout-bytes/op")
		})
	}
}
