package policy

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"

	"meshd.dev/meshd/netmap"
)

// randPolicy writes a random but valid policy over users u0-u4, groups
// g0-g2, tags t0-t3, a host alias and CIDRs: every selector kind appears as
// a source and as a destination, grants open ports, grant capabilities or
// both, and may name several destinations that match the same node.
func randPolicy(rng *rand.Rand) string {
	pick := func(opts []string) string { return opts[rng.IntN(len(opts))] }
	user := func() string { return fmt.Sprintf("u%d@x.com", rng.IntN(5)) }
	srcs := []string{"*", "autogroup:member", "autogroup:tagged", "group:g0", "group:g1", "group:g2",
		"tag:t0", "tag:t1", "tag:t2", "tag:t3", "host1", "100.64.0.0/29", "10.1.0.0/24"}
	dsts := append(slices.Clone(srcs), "autogroup:self", "autogroup:self", "100.64.0.5", "10.1.0.9")
	var b strings.Builder
	b.WriteString("{\"groups\": {")
	for g := range 3 {
		var ms []string
		for range rng.IntN(4) {
			ms = append(ms, fmt.Sprintf("%q", user()))
		}
		fmt.Fprintf(&b, "\"group:g%d\": [%s],", g, strings.Join(ms, ", "))
	}
	b.WriteString("},\n\"hosts\": {\"host1\": \"100.64.0.3\"},\n")
	b.WriteString("\"tagOwners\": {\"tag:t0\": [], \"tag:t1\": [], \"tag:t2\": [], \"tag:t3\": []},\n\"grants\": [\n")
	for i := range 1 + rng.IntN(8) {
		var src, dst []string
		for range 1 + rng.IntN(2) {
			s := pick(srcs)
			if rng.IntN(6) == 0 {
				s = user()
			}
			src = append(src, fmt.Sprintf("%q", s))
		}
		for range 1 + rng.IntN(3) {
			d := pick(dsts)
			if rng.IntN(6) == 0 {
				d = user()
			}
			dst = append(dst, fmt.Sprintf("%q", d))
		}
		if slices.Contains(dst, `"autogroup:self"`) {
			// Tailscale and meshd refuse autogroup:self with sources that
			// are not users: draw them again from users only.
			for i := range src {
				src[i] = fmt.Sprintf("%q", pick([]string{"autogroup:member", "group:g0", "group:g1", "group:g2", user()}))
			}
		}
		fmt.Fprintf(&b, "{\"src\": [%s], \"dst\": [%s]", strings.Join(src, ", "), strings.Join(dst, ", "))
		kind := rng.IntN(3)
		if kind != 1 {
			fmt.Fprintf(&b, ", \"ip\": [%q]", pick([]string{"*", "22", "tcp:443", "udp:53"}))
		}
		if kind != 0 {
			fmt.Fprintf(&b, ", \"app\": {\"x.com/cap/%d\": [{\"grant\": %d}], \"x.com/cap/shared\": [{\"n\": %d}]}", rng.IntN(2), i, i)
		}
		b.WriteString("},\n")
	}
	b.WriteString("]}\n")
	return b.String()
}

// randNode is a user device (of u0-u4) or a tagged node (one or two of
// t0-t3), sometimes routing 10.1.0.0/24.
func randNode(rng *rand.Rand, id int) *netmap.Node {
	var n *netmap.Node
	switch rng.IntN(3) {
	case 0:
		n = testNode(id, fmt.Sprintf("u%d@x.com", rng.IntN(5)))
	case 1:
		n = testNode(id, fmt.Sprintf("u%d@x.com", rng.IntN(5)), fmt.Sprintf("tag:t%d", rng.IntN(4)))
	default:
		n = testNode(id, "", fmt.Sprintf("tag:t%d", rng.IntN(2)), fmt.Sprintf("tag:t%d", 2+rng.IntN(2)))
	}
	if rng.IntN(5) == 0 {
		n.AllowedIPs = append(n.AllowedIPs, netip.MustParsePrefix("10.1.0.0/24"))
	}
	return n
}

// checkPeerQueries compares the engine's index-based answers for dst with
// the per-pair ones over every node of all (the indexed nodes): PeerCapsFor
// with PeerCaps, Peers with CanSee, and every capability holder is a peer.
func checkPeerQueries(t *testing.T, e *Engine, dst *netmap.Node, all []*netmap.Node, where string) {
	t.Helper()
	ids, caps := e.PeerCapsFor(dst)
	if len(ids) != len(caps) {
		t.Fatalf("%s: PeerCapsFor(%d): %d IDs, %d capability sets", where, dst.ID, len(ids), len(caps))
	}
	if !slices.IsSorted(ids) || len(slices.Compact(slices.Clone(ids))) != len(ids) {
		t.Fatalf("%s: PeerCapsFor(%d) IDs not ascending and unique: %v", where, dst.ID, ids)
	}
	batch := map[netmap.NodeID]map[string][]json.RawMessage{}
	for i, id := range ids {
		batch[id] = caps[i]
	}
	var peers []netmap.NodeID
	for _, p := range all {
		if p.ID == dst.ID {
			if _, ok := batch[p.ID]; ok {
				t.Fatalf("%s: PeerCapsFor(%d) lists the node itself", where, dst.ID)
			}
			continue
		}
		if e.CanSee(dst, p) {
			peers = append(peers, p.ID)
		}
		want := e.PeerCaps(dst, p)
		got, ok := batch[p.ID]
		if ok != (want != nil) || !reflect.DeepEqual(got, want) && ok {
			t.Fatalf("%s: capabilities of %d on %d: PeerCapsFor says %s (listed %v), PeerCaps says %s",
				where, p.ID, dst.ID, capsString(got), ok, capsString(want))
		}
	}
	if len(batch) > len(all) {
		t.Fatalf("%s: PeerCapsFor(%d) has %d entries for %d nodes", where, dst.ID, len(batch), len(all))
	}
	slices.Sort(peers)
	got := e.Peers(dst)
	if !slices.Equal(got, peers) && len(got)+len(peers) > 0 {
		t.Fatalf("%s: Peers(%d) = %v, CanSee says %v", where, dst.ID, got, peers)
	}
	for id := range batch {
		if _, ok := slices.BinarySearch(got, id); !ok {
			t.Fatalf("%s: %d holds capabilities on %d but is not its peer", where, id, dst.ID)
		}
	}
}

func capsString(c map[string][]json.RawMessage) string {
	if c == nil {
		return "nil"
	}
	b, _ := json.Marshal(c)
	return string(b)
}

// TestPeerCapsForMatchesPairs is the property test of the batch API: over
// random policies and random tailnets kept current by joins, leaves and
// re-tags, PeerCapsFor(dst) agrees with PeerCaps(dst, p) for every node p,
// and Peers with CanSee. A node the index does not hold (one not yet
// joined) is asked about too.
func TestPeerCapsForMatchesPairs(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 13))
	capsSeen, pairsSeen := 0, 0
	for round := range 150 {
		src := randPolicy(rng)
		p, err := Parse("rand.hujson", []byte(src))
		if err != nil {
			t.Fatalf("round %d: generated policy does not parse: %v\n%s", round, err, src)
		}
		live := map[netmap.NodeID]*netmap.Node{}
		for id := 1; id <= 4+rng.IntN(16); id++ {
			live[netmap.NodeID(id)] = randNode(rng, id)
		}
		e := NewEngine(p)
		e.SetNodes(slices.Collect(mapValues(live)))
		for step := range 6 {
			all := slices.Collect(mapValues(live))
			where := fmt.Sprintf("round %d step %d\n%s", round, step, src)
			for _, dst := range append(all, randNode(rng, 99)) {
				checkPeerQueries(t, e, dst, all, where)
				_, caps := e.PeerCapsFor(dst)
				for _, c := range caps {
					capsSeen += len(c)
				}
				pairsSeen += len(all)
			}
			// Change the tailnet through the incremental API.
			id := netmap.NodeID(1 + rng.IntN(24))
			if rng.IntN(3) == 0 {
				delete(live, id)
				e.RemoveNode(id)
			} else {
				n := randNode(rng, int(id))
				live[id] = n
				e.UpsertNode(n)
			}
		}
	}
	// The generator must exercise what it claims to, or this test proves
	// nothing.
	if capsSeen < pairsSeen/20 {
		t.Fatalf("only %d capabilities over %d pairs: the random policies grant too few", capsSeen, pairsSeen)
	}
}

// mapValues yields m's values.
func mapValues[K comparable, V any](m map[K]V) func(func(V) bool) {
	return func(yield func(V) bool) {
		for _, v := range m {
			if !yield(v) {
				return
			}
		}
	}
}

// TestPeerCapsGrantCountsOnce: a grant whose destinations name a node more
// than once (two of its tags; autogroup:self and autogroup:member) grants
// its capabilities once, per pair and in the batch.
func TestPeerCapsGrantCountsOnce(t *testing.T) {
	f := newFleet()
	both := testNode(8, "", "tag:srv", "tag:other")
	all := append(slices.Clone(f.all), both)
	tests := []struct {
		name      string
		grant     string
		dst, peer *netmap.Node
		want      string
	}{
		{
			name:  "two tags of the destination",
			grant: `{"src": ["group:eng"], "dst": ["tag:srv", "tag:other"], "app": {"x.com/cap": [{"n": 1}]}}`,
			dst:   both, peer: f.a1, want: `{"x.com/cap":[{"n":1}]}`,
		},
		{
			name:  "self and member",
			grant: `{"src": ["autogroup:member"], "dst": ["autogroup:self", "autogroup:member"], "app": {"x.com/cap": [{"n": 2}]}}`,
			dst:   f.a1, peer: f.a2, want: `{"x.com/cap":[{"n":2}]}`,
		},
		{
			name:  "self only, another user",
			grant: `{"src": ["autogroup:member"], "dst": ["autogroup:self"], "app": {"x.com/cap": [{"n": 3}]}}`,
			dst:   f.a1, peer: f.b1, want: "nil",
		},
		{
			name:  "two grants both count",
			grant: `{"src": ["group:eng"], "dst": ["tag:srv"], "app": {"x.com/cap": [{"n": 4}]}}, {"src": ["*"], "dst": ["tag:other"], "app": {"x.com/cap": [{"n": 5}]}}`,
			dst:   both, peer: f.a1, want: `{"x.com/cap":[{"n":4},{"n":5}]}`,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := NewEngineWith(mustParse(t, fleetHeader+`"grants": [`+tc.grant+`]}`), all)
			if got := capsString(e.PeerCaps(tc.dst, tc.peer)); got != tc.want {
				t.Errorf("PeerCaps = %s, want %s", got, tc.want)
			}
			ids, caps := e.PeerCapsFor(tc.dst)
			got := "nil"
			if i, ok := slices.BinarySearch(ids, tc.peer.ID); ok {
				got = capsString(caps[i])
			}
			if got != tc.want {
				t.Errorf("PeerCapsFor[%d] = %s, want %s", tc.peer.ID, got, tc.want)
			}
		})
	}
}
