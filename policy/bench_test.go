package policy

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"

	"meshd.dev/meshd/netmap"
)

// benchFleet builds a policy of nGrants grants and a tailnet of nNodes
// nodes shaped like a GPU fleet: 60% user devices (two per user, users in
// groups of 20), 40% tagged servers over 500 tags. Every grant names a
// group, a tag or autogroup:member as source and one or two tags as
// destination.
func benchFleet(tb testing.TB, nGrants, nNodes int) (*Policy, []*netmap.Node) {
	tb.Helper()
	return benchFleetCaps(tb, nGrants, nNodes, 0)
}

// benchFleetCaps is benchFleet where every capsEvery-th grant (none if
// capsEvery is 0) also grants an "app" capability, and, with capsEvery set,
// every member holds one more on their own devices (autogroup:self), as
// fleets that hand their users a Kubernetes or SSH role do. The nodes and
// the other grants are the same as benchFleet's.
func benchFleetCaps(tb testing.TB, nGrants, nNodes, capsEvery int) (*Policy, []*netmap.Node) {
	tb.Helper()
	const nTags, groupSize = 500, 20
	nUsers := nNodes * 6 / 10 / 2
	nGroups := nUsers / groupSize
	rng := rand.New(rand.NewPCG(7, 7))
	var b strings.Builder
	b.WriteString("{\n\"groups\": {\n")
	for g := range nGroups {
		var members []string
		for u := g * groupSize; u < (g+1)*groupSize; u++ {
			members = append(members, fmt.Sprintf("%q", fmt.Sprintf("user%d@example.com", u)))
		}
		fmt.Fprintf(&b, "\"group:g%d\": [%s],\n", g, strings.Join(members, ", "))
	}
	b.WriteString("},\n\"tagOwners\": {\n")
	for t := range nTags {
		fmt.Fprintf(&b, "\"tag:t%d\": [\"group:g%d\"],\n", t, t%nGroups)
	}
	b.WriteString("},\n\"grants\": [\n")
	ips := []string{`"*"`, `"22"`, `"tcp:443"`, `"8000-9000"`, `"tcp:22", "udp:4789"`}
	for i := range nGrants {
		var src string
		switch rng.IntN(10) {
		case 0:
			src = "autogroup:member"
		case 1, 2, 3:
			src = fmt.Sprintf("tag:t%d", rng.IntN(nTags))
		default:
			src = fmt.Sprintf("group:g%d", rng.IntN(nGroups))
		}
		dst := fmt.Sprintf("%q", fmt.Sprintf("tag:t%d", rng.IntN(nTags)))
		if i%3 == 0 {
			dst += fmt.Sprintf(", %q", fmt.Sprintf("tag:t%d", rng.IntN(nTags)))
		}
		var app string
		if capsEvery > 0 && i%capsEvery == 0 {
			app = fmt.Sprintf(`, "app": {"meshd.dev/cap/job": [{"grant": %d}], "meshd.dev/cap/ssh": [{}]}`, i)
		}
		fmt.Fprintf(&b, "{\"src\": [%q], \"dst\": [%s], \"ip\": [%s]%s},\n", src, dst, ips[rng.IntN(len(ips))], app)
	}
	if capsEvery > 0 {
		b.WriteString(`{"src": ["autogroup:member"], "dst": ["autogroup:self"], "app": {"meshd.dev/cap/kubernetes": [{"impersonate": {"groups": ["owners"]}}]}},` + "\n")
	}
	b.WriteString("]}\n")
	p, err := Parse("bench.hujson", []byte(b.String()))
	if err != nil {
		tb.Fatal(err)
	}
	var nodes []*netmap.Node
	for i := range nNodes {
		id := i + 1
		if i < nUsers*2 {
			nodes = append(nodes, testNode(id, fmt.Sprintf("user%d@example.com", i/2)))
		} else {
			nodes = append(nodes, testNode(id, "", fmt.Sprintf("tag:t%d", rng.IntN(nTags))))
		}
	}
	return p, nodes
}

// BenchmarkCompileAll is the full recompute: a new policy compiled for
// 10,000 nodes, every node's filter and peer list produced.
func BenchmarkCompileAll(b *testing.B) {
	p, nodes := benchFleet(b, 1000, 10000)
	b.ResetTimer()
	for b.Loop() {
		e := NewEngine(p)
		e.SetNodes(nodes)
		for _, n := range nodes {
			e.FilterFor(n, nil)
		}
	}
}

// BenchmarkCompileAllWithPeers adds every node's peer list to the full
// recompute.
func BenchmarkCompileAllWithPeers(b *testing.B) {
	p, nodes := benchFleet(b, 1000, 10000)
	b.ResetTimer()
	for b.Loop() {
		e := NewEngine(p)
		e.SetNodes(nodes)
		for _, n := range nodes {
			e.FilterFor(n, nil)
			e.Peers(n)
		}
	}
}

// BenchmarkNewEngine is compiling the policy and indexing the nodes, before
// any per-node answer.
func BenchmarkNewEngine(b *testing.B) {
	p, nodes := benchFleet(b, 1000, 10000)
	b.ResetTimer()
	for b.Loop() {
		e := NewEngine(p)
		e.SetNodes(nodes)
	}
}

// BenchmarkFilterForOneNode is one node's filter from a warm engine.
func BenchmarkFilterForOneNode(b *testing.B) {
	p, nodes := benchFleet(b, 1000, 10000)
	e := NewEngine(p)
	e.SetNodes(nodes)
	for _, n := range nodes {
		e.FilterFor(n, nil)
	}
	i := 0
	b.ResetTimer()
	for b.Loop() {
		e.FilterFor(nodes[len(nodes)-1-i%4000], nil) // tagged nodes: the ones with inbound rules
		i++
	}
}

// BenchmarkNodeJoin is the incremental cost of a change: one user device
// joins (invalidating the rules whose sources include its user), then the
// filter of a node that must now admit it is recomputed.
func BenchmarkNodeJoin(b *testing.B) {
	p, nodes := benchFleet(b, 1000, 10000)
	e := NewEngine(p)
	e.SetNodes(nodes)
	for _, n := range nodes {
		e.FilterFor(n, nil)
	}
	i := 0
	b.ResetTimer()
	for b.Loop() {
		n := testNode(20000+i%1000, fmt.Sprintf("user%d@example.com", i%3000))
		e.UpsertNode(n)
		e.FilterFor(nodes[len(nodes)-1-i%4000], nil)
		e.RemoveNode(n.ID)
		i++
	}
}

// BenchmarkFilterForSync is FilterFor given the whole node list, which
// checks it against the index (one comparison per node) first.
func BenchmarkFilterForSync(b *testing.B) {
	p, nodes := benchFleet(b, 1000, 10000)
	e := NewEngine(p)
	e.SetNodes(nodes)
	for _, n := range nodes {
		e.FilterFor(n, nil)
	}
	i := 0
	b.ResetTimer()
	for b.Loop() {
		e.FilterFor(nodes[len(nodes)-1-i%4000], nodes)
		i++
	}
}

// BenchmarkPeers is one node's visible peer set.
func BenchmarkPeers(b *testing.B) {
	p, nodes := benchFleet(b, 1000, 10000)
	e := NewEngine(p)
	e.SetNodes(nodes)
	i := 0
	b.ResetTimer()
	for b.Loop() {
		e.Peers(nodes[i%len(nodes)])
		i++
	}
}

// BenchmarkParse is parsing and validating a file of 1,000 grants.
func BenchmarkParse(b *testing.B) {
	var src strings.Builder
	src.WriteString(`{"tagOwners": {"tag:a": []}, "grants": [`)
	for i := range 1000 {
		fmt.Fprintf(&src, `{"src": ["user%d@example.com"], "dst": ["tag:a"], "ip": ["tcp:%d"]},`, i, 1+i)
	}
	src.WriteString(`]}`)
	data := []byte(src.String())
	b.SetBytes(int64(len(data)))
	b.ResetTimer()
	for b.Loop() {
		if _, err := Parse("bench.hujson", data); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkCanSee is one pair, as control's policy-change path calls it.
func BenchmarkCanSee(b *testing.B) {
	p, nodes := benchFleet(b, 1000, 10000)
	e := NewEngine(p)
	i := 0
	for b.Loop() {
		e.CanSee(nodes[i%len(nodes)], nodes[(i*7919)%len(nodes)])
		i++
	}
}
