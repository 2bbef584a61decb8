package policy

import (
	"fmt"
	"strings"
	"testing"

	"meshd.dev/meshd/netmap"
)

// peerBenchSizes are the tailnet sizes of the peer-query benchmarks.
var peerBenchSizes = []int{1000, 10000}

// peerBenchCase is a policy and tailnet the peer-query benchmarks run on.
type peerBenchCase struct {
	name  string
	build func(tb testing.TB, nNodes int) (*Policy, []*netmap.Node)
}

// peerBenchCases are the shapes a policy change at scale meets:
//   - fleet: benchFleet (groups, tags, autogroup:member; one grant per 10
//     nodes), every fourth grant with an "app" capability, plus
//     autogroup:self capabilities for every member;
//   - tenants: control's BenchmarkSetPolicyCaps policy, 100 tenants whose
//     nodes reach each other and hold a capability on each other, so every
//     visible pair carries capabilities.
var peerBenchCases = []peerBenchCase{
	{"fleet", func(tb testing.TB, n int) (*Policy, []*netmap.Node) { return benchFleetCaps(tb, n/10, n, 4) }},
	{"tenants", benchTenants},
}

// benchTenants puts node i in tag:tenant(i%100), with a grant per tenant
// opening every port and granting one capability between its nodes.
func benchTenants(tb testing.TB, nNodes int) (*Policy, []*netmap.Node) {
	tb.Helper()
	const k = 100
	var owners, grants []string
	for i := range k {
		owners = append(owners, fmt.Sprintf(`"tag:tenant%d": []`, i))
		grants = append(grants, fmt.Sprintf(`{"src": ["tag:tenant%d"], "dst": ["tag:tenant%d"], "ip": ["*"], "app": {"example.com/cap/job": [{"tenant": %d}]}}`, i, i, i))
	}
	src := `{"tagOwners": {` + strings.Join(owners, ",") + `}, "grants": [` + strings.Join(grants, ",") + `]}`
	p, err := Parse("tenants.hujson", []byte(src))
	if err != nil {
		tb.Fatal(err)
	}
	nodes := make([]*netmap.Node, nNodes)
	for i := range nodes {
		nodes[i] = testNode(i+1, "", fmt.Sprintf("tag:tenant%d", i%k))
	}
	return p, nodes
}

// runPeerBench runs fn as a sub-benchmark for every case and size, on a
// warm engine (filters computed once, as after a policy change).
func runPeerBench(b *testing.B, fn func(b *testing.B, e *Engine, nodes []*netmap.Node)) {
	for _, c := range peerBenchCases {
		for _, n := range peerBenchSizes {
			b.Run(fmt.Sprintf("policy=%s/nodes=%d", c.name, n), func(b *testing.B) {
				p, nodes := c.build(b, n)
				e := NewEngineWith(p, nodes)
				for _, nd := range nodes {
					e.FilterFor(nd, nil)
				}
				b.ReportAllocs()
				b.ResetTimer()
				fn(b, e, nodes)
			})
		}
	}
}

// benchViewers are 64 nodes spread over the tailnet (users' devices and
// tagged servers alike), with their peers.
func benchViewers(e *Engine, nodes []*netmap.Node) (viewers []*netmap.Node, peers [][]*netmap.Node) {
	byID := make(map[netmap.NodeID]*netmap.Node, len(nodes))
	for _, n := range nodes {
		byID[n.ID] = n
	}
	for i := range 64 {
		v := nodes[i*len(nodes)/64]
		var ps []*netmap.Node
		for _, id := range e.Peers(v) {
			ps = append(ps, byID[id])
		}
		viewers, peers = append(viewers, v), append(peers, ps)
	}
	return viewers, peers
}

// BenchmarkPeersScale is one node's peer list, cycling through every node
// of the tailnet: what a policy change asks twice per connected node.
func BenchmarkPeersScale(b *testing.B) {
	runPeerBench(b, func(b *testing.B, e *Engine, nodes []*netmap.Node) {
		i, total := 0, 0
		for b.Loop() {
			total += len(e.Peers(nodes[i%len(nodes)]))
			i++
		}
		b.ReportMetric(float64(total)/float64(i), "peers/op")
	})
}

// BenchmarkPeerCapsPairs is the capabilities of 64 viewers' peers asked
// per pair, as control does today: PeerCaps(viewer, p) for every peer p
// each viewer sees. One op is all 64 viewers.
func BenchmarkPeerCapsPairs(b *testing.B) {
	runPeerBench(b, func(b *testing.B, e *Engine, nodes []*netmap.Node) {
		viewers, peers := benchViewers(e, nodes)
		b.ResetTimer()
		pairs, holders := 0, 0
		for b.Loop() {
			pairs, holders = 0, 0
			for v, viewer := range viewers {
				for _, p := range peers[v] {
					if e.PeerCaps(viewer, p) != nil {
						holders++
					}
				}
				pairs += len(peers[v])
			}
		}
		b.ReportMetric(float64(pairs), "pairs/op")
		b.ReportMetric(float64(holders), "holders/op")
	})
}

// BenchmarkPeerCapsFor is BenchmarkPeerCapsPairs through the batch API:
// one call per viewer, whose answer covers every peer. One op is all 64
// viewers.
func BenchmarkPeerCapsFor(b *testing.B) {
	runPeerBench(b, func(b *testing.B, e *Engine, nodes []*netmap.Node) {
		viewers, _ := benchViewers(e, nodes)
		b.ResetTimer()
		holders := 0
		for b.Loop() {
			holders = 0
			for _, v := range viewers {
				ids, _ := e.PeerCapsFor(v)
				holders += len(ids)
			}
		}
		b.ReportMetric(float64(holders), "holders/op")
	})
}
