package control

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
	"meshd.dev/meshd/policy"
)

// gatedPolicy is a policy engine whose first FilterFor call waits until
// the test releases it: a policy change that takes as long as the test
// wants, without sleeps.
type gatedPolicy struct {
	*policy.Engine
	entered     chan struct{} // closed when the change starts computing
	release     chan struct{}
	once        sync.Once
	releaseOnce sync.Once
}

func newGatedPolicy(e *policy.Engine) *gatedPolicy {
	return &gatedPolicy{Engine: e, entered: make(chan struct{}), release: make(chan struct{})}
}

func (g *gatedPolicy) FilterFor(n *netmap.Node, all []*netmap.Node) []netmap.FilterRule {
	g.once.Do(func() {
		close(g.entered)
		<-g.release
	})
	return g.Engine.FilterFor(n, all)
}

func (g *gatedPolicy) open() { g.releaseOnce.Do(func() { close(g.release) }) }

// within fails the test if fn does not return in time: what the
// coordinator must not block on.
func within(t *testing.T, what string, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn()
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s stalled behind the policy change", what)
	}
}

// TestSetPolicyReconcilesConcurrentChanges drives policy changes while
// nodes join, leave, are re-tagged, report endpoints, go on- and offline
// and open and close map streams, all during the changes' computation; at
// the end every open session must hold exactly what a fresh full map under
// the policy in force says, entry for entry, filter included.
func TestSetPolicyReconcilesConcurrentChanges(t *testing.T) {
	for seed := range uint64(16) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { reconcileRun(t, seed) })
	}
}

func reconcileRun(t *testing.T, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 11))
	h := newHub("e1", nil, 4096, time.Now)
	h.parallelChunk = 4 // workers, for -race to watch
	const tenants = 4
	tagOf := func() string { return fmt.Sprintf("tag:tenant%d", rng.IntN(tenants)) }
	nextID := netmap.NodeID(1)
	type client struct {
		s *session
		m *netmap.NetworkMap
	}
	clients := map[*session]*client{}
	subscribe := func(id netmap.NodeID) {
		s, m := subscribeMap(t, h, id)
		clients[s] = &client{s, m}
	}
	join := func() {
		n := hubNode(nextID, tagOf())
		if rng.IntN(3) == 0 {
			n.Tags, n.User = nil, fmt.Sprintf("user%d@example.com", rng.IntN(3))
		}
		nextID++
		h.upsert(n)
		if rng.IntN(2) == 0 {
			subscribe(n.ID)
		}
	}
	for range 40 {
		join()
	}
	randomNode := func() *netmap.Node {
		h.mu.Lock()
		defer h.mu.Unlock()
		all := h.allLocked()
		if len(all) == 0 {
			return nil
		}
		return all[rng.IntN(len(all))]
	}
	change := func() {
		n := randomNode()
		switch k := rng.IntN(7); {
		case k == 0 || n == nil:
			join()
		case k == 1:
			h.remove(n.ID, errSlowConsumer)
		case k == 2: // re-tagged
			nn := *n
			nn.Tags, nn.User = []string{tagOf()}, ""
			h.upsert(&nn)
		case k == 3: // endpoints (a patch)
			nn := *n
			nn.Endpoints = []netip.AddrPort{netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, 0, byte(rng.IntN(250) + 1)}), 41641)}
			h.upsert(&nn)
		case k == 4: // a new stream
			subscribe(n.ID)
		default: // a stream closes
			for s := range clients {
				delete(clients, s)
				h.unsubscribe(s)
				break
			}
		}
	}
	// Two policies that differ in ports alone: changes between them go
	// as filter patches, computed against the snapshot, which the
	// concurrent changes may make stale.
	specs := []string{tenantPolicy(tenants), capsPolicies["tags and users"], capsPolicies["everyone"], capsPolicies["no app grants"], "",
		tenantPortPolicy(tenants, 80), tenantPortPolicy(tenants, 443)}
	for step := range 12 {
		spec := specs[rng.IntN(len(specs))]
		if spec == "" {
			h.setPolicy(nil) // the bootstrap default, with no changes alongside
		} else {
			g := newGatedPolicy(mustEngine(t, withTenantTags(spec, tenants)))
			done := make(chan struct{})
			go func() {
				defer close(done)
				h.setPolicy(g)
			}()
			<-g.entered
			within(t, fmt.Sprintf("step %d: changes", step), func() {
				for range 1 + rng.IntN(8) {
					change()
				}
			})
			g.open()
			<-done
		}
		for s, c := range clients {
			drain(t, s, c.m)
			if s.dropped {
				delete(clients, s)
				continue
			}
			h.mu.Lock()
			self := h.nodes[s.node]
			var want *netmap.MapResponse
			if self != nil {
				want = decodeMsg(t, h.fullLocked(self))
			}
			h.mu.Unlock()
			if self == nil {
				t.Fatalf("step %d: session of removed node %d not dropped", step, s.node)
			}
			compareMaps(t, fmt.Sprintf("step %d, node %d", step, s.node), c.m, want)
		}
	}
}

// withTenantTags adds tag:tenant0..k-1 to a policy's tagOwners (the
// capability policies know only tag:srv and tag:gpu), so that the tenants'
// nodes are valid under it.
func withTenantTags(src string, k int) string {
	if strings.Contains(src, `"tag:tenant0": []`) {
		return src
	}
	var owners string
	for i := range k {
		owners += fmt.Sprintf(`"tag:tenant%d": [], `, i)
	}
	return strings.Replace(src, `"tagOwners": {`, `"tagOwners": {`+owners, 1)
}

// compareMaps requires the client's map to be the full map's: the same
// peers with the same entries (capabilities included), filter and
// bootstrap flag.
func compareMaps(t *testing.T, what string, got *netmap.NetworkMap, want *netmap.MapResponse) {
	t.Helper()
	var wm netmap.NetworkMap
	if err := wm.Apply(want); err != nil {
		t.Fatal(err)
	}
	if got.PolicyBootstrap != wm.PolicyBootstrap {
		t.Fatalf("%s: bootstrap %v, full map %v", what, got.PolicyBootstrap, wm.PolicyBootstrap)
	}
	if g, w := peerIDs(got), peerIDs(&wm); !slices.Equal(g, w) {
		t.Fatalf("%s: peers %v, full map %v", what, g, w)
	}
	for id, p := range wm.Peers {
		gb, _ := json.Marshal(got.Peers[id])
		wb, _ := json.Marshal(p)
		if string(gb) != string(wb) {
			t.Fatalf("%s: peer %d is\n %s\nfull map has\n %s", what, id, gb, wb)
		}
	}
	gf, _ := json.Marshal(got.PacketFilter)
	wf, _ := json.Marshal(wm.PacketFilter)
	if string(gf) != string(wf) {
		t.Fatalf("%s: filter\n %s\nfull map has\n %s", what, gf, wf)
	}
}

// TestSetPolicyConcurrentChangeCases: one change at a time during a policy
// change's computation, each seen by viewers in every relation to it.
func TestSetPolicyConcurrentChangeCases(t *testing.T) {
	const pol = `{"tagOwners": {"tag:a": [], "tag:b": []}, "grants": [{"src": ["tag:a"], "dst": ["tag:a"], "ip": ["*"]}]}`
	// Under bOnly node 1 sees nobody: every tag:a peer is new to it
	// under pol, listed with its fields as of the snapshot.
	const bOnly = `{"tagOwners": {"tag:a": [], "tag:b": []}, "grants": [{"src": ["tag:b"], "dst": ["tag:b"], "ip": ["*"]}]}`
	for _, tc := range []struct {
		name   string
		from   string // the policy before; "" the bootstrap default
		change func(h *hub)
	}{
		{"a peer leaves", "", func(h *hub) { h.remove(2, errSlowConsumer) }},
		{"a peer is re-tagged away", "", func(h *hub) { n := *h.get(2); n.Tags = []string{"tag:b"}; h.upsert(&n) }},
		{"a peer is re-tagged in", "", func(h *hub) { n := *h.get(3); n.Tags = []string{"tag:a"}; h.upsert(&n) }},
		{"a peer reports endpoints", "", func(h *hub) {
			n := *h.get(2)
			n.Endpoints = []netip.AddrPort{netip.MustParseAddrPort("198.18.0.2:41641")}
			h.upsert(&n)
		}},
		{"a node joins", "", func(h *hub) { h.upsert(hubNode(9, "tag:a")) }},
		{"the viewer is re-tagged", "", func(h *hub) { n := *h.get(1); n.Tags = []string{"tag:b"}; h.upsert(&n) }},
		{"a new peer reports endpoints", bOnly, func(h *hub) {
			n := *h.get(2)
			n.Endpoints = []netip.AddrPort{netip.MustParseAddrPort("198.18.0.2:41641")}
			h.upsert(&n)
		}},
		{"a new peer leaves", bOnly, func(h *hub) { h.remove(2, errSlowConsumer) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHub("e1", nil, 0, time.Now)
			for id, tag := range map[netmap.NodeID]string{1: "tag:a", 2: "tag:a", 3: "tag:b", 4: "tag:a"} {
				h.upsert(hubNode(id, tag))
			}
			if tc.from != "" {
				h.setPolicy(mustEngine(t, tc.from))
			}
			s, m := subscribeMap(t, h, 1)
			g := newGatedPolicy(mustEngine(t, pol))
			done := make(chan struct{})
			go func() {
				defer close(done)
				h.setPolicy(g)
			}()
			<-g.entered
			within(t, tc.name, func() { tc.change(h) })
			g.open()
			<-done
			drain(t, s, m)
			h.mu.Lock()
			want := decodeMsg(t, h.fullLocked(h.nodes[1]))
			h.mu.Unlock()
			compareMaps(t, tc.name, m, want)
		})
	}
}

// TestSpliceVersion: a frame encoded for one version reads back, after the
// splice, as the same response at another; a frame that does not start as
// expected is refused rather than guessed at.
func TestSpliceVersion(t *testing.T) {
	f := []netmap.FilterRule{{SrcIPs: []netip.Prefix{netip.MustParsePrefix("100.64.0.1/32")}}}
	for _, tc := range []struct {
		name     string
		resp     netmap.MapResponse
		from, to uint64
		ok       bool
	}{
		{"longer", netmap.MapResponse{Epoch: "e1", PeersRemoved: []netmap.NodeID{3}, PacketFilter: &f}, 9, 10, true},
		{"much longer", netmap.MapResponse{Epoch: "abcdef0123456789", PacketFilter: &f}, 7, 1 << 62, true},
		{"shorter", netmap.MapResponse{Epoch: "e1", PolicyBootstrap: true}, 100, 99, true},
		{"not that version", netmap.MapResponse{Epoch: "e1"}, 12, 13, false},
		{"another epoch", netmap.MapResponse{Epoch: `e"2`}, 5, 6, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := tc.resp
			r.Version = tc.from
			if tc.name == "not that version" {
				r.Version = 120
			}
			frame, err := controlclient.EncodeFrame(&r)
			if err != nil {
				t.Fatal(err)
			}
			got := spliceVersion(frame, r.Epoch, tc.from, tc.to)
			if !tc.ok {
				if got != nil {
					t.Fatalf("spliced a frame at version %d as if it were %d", r.Version, tc.from)
				}
				return
			}
			want := r
			want.Version = tc.to
			wantFrame, _ := controlclient.EncodeFrame(&want)
			if !bytes.Equal(got, wantFrame) {
				t.Fatalf("spliced\n %q\nencoded\n %q", got, wantFrame)
			}
		})
	}
}

// unindexedPolicy hides the engine's index (PeerLister, NodeIndexer): the
// hub then finds viewers with a CanSee per session, the reference for the
// indexed path.
type unindexedPolicy struct{ e *policy.Engine }

func (u unindexedPolicy) CanSee(a, b *netmap.Node) bool { return u.e.CanSee(a, b) }
func (u unindexedPolicy) FilterFor(n *netmap.Node, all []*netmap.Node) []netmap.FilterRule {
	return u.e.FilterFor(n, all)
}
func (u unindexedPolicy) CheckTags(user string, keyTags, requested []string) error {
	return u.e.CheckTags(user, keyTags, requested)
}

// TestDeltasFollowIndex: joins, leaves, re-tags and endpoint changes sent
// as deltas leave every session holding what a fresh full map says, when
// the viewers of a change come from the policy's index and when they come
// from a CanSee per session.
func TestDeltasFollowIndex(t *testing.T) {
	const pol = `{"tagOwners": {"tag:a": [], "tag:b": [], "tag:c": []},
		"grants": [{"src": ["tag:a"], "dst": ["tag:a"], "ip": ["*"]},
		           {"src": ["tag:b"], "dst": ["tag:c"], "ip": ["tcp:22"]}]}`
	tags := []string{"tag:a", "tag:b", "tag:c"}
	for _, indexed := range []bool{true, false} {
		t.Run(fmt.Sprintf("indexed=%v", indexed), func(t *testing.T) {
			h := newHub("e1", nil, 0, time.Now)
			var p Policy = mustEngine(t, pol)
			if !indexed {
				p = unindexedPolicy{mustEngine(t, pol)}
			}
			h.setPolicy(p)
			const n = 24
			for id := netmap.NodeID(1); id <= n; id++ {
				h.upsert(hubNode(id, tags[int(id)%3]))
			}
			type sub struct {
				s *session
				m *netmap.NetworkMap
			}
			subs := map[netmap.NodeID]sub{}
			for id := netmap.NodeID(1); id <= n; id += 2 {
				s, m := subscribeMap(t, h, id)
				subs[id] = sub{s, m}
			}
			r := rand.New(rand.NewPCG(7, 9))
			for step := range 300 {
				id := netmap.NodeID(2 + r.IntN(n-1)) // node 1 stays, so someone always watches
				var what string
				switch cur := h.get(id); {
				case cur == nil:
					what = "join"
					h.upsert(hubNode(id, tags[r.IntN(3)]))
				case r.IntN(4) == 0:
					what = "leave"
					h.remove(id, controlclient.ErrNotRegistered)
					if sb, ok := subs[id]; ok {
						h.unsubscribe(sb.s)
						delete(subs, id)
					}
				case r.IntN(2) == 0:
					what = "re-tag"
					nn := *cur
					nn.Tags = []string{tags[r.IntN(3)]}
					h.upsert(&nn)
				default:
					what = "endpoints"
					nn := *cur
					nn.Endpoints = []netip.AddrPort{netip.AddrPortFrom(netip.MustParseAddr("198.18.0.1"), uint16(1000+step))}
					h.upsert(&nn)
				}
				if _, ok := subs[id]; !ok && h.get(id) != nil && r.IntN(3) == 0 {
					s, m := subscribeMap(t, h, id)
					subs[id] = sub{s, m}
				}
				for vid, sb := range subs {
					drain(t, sb.s, sb.m)
					h.mu.Lock()
					want := decodeMsg(t, h.fullLocked(h.nodes[vid]))
					h.mu.Unlock()
					compareMaps(t, fmt.Sprintf("step %d (%s of %d), viewer %d", step, what, id, vid), sb.m, want)
				}
			}
		})
	}
}

// TestFilterRefreshCoalesced: a burst of joins reaches a viewer as one
// filter update after the delay (the peers themselves at once), a leave's
// too, while a re-tag that narrows access updates the filter at once.
func TestFilterRefreshCoalesced(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const pol = `{"tagOwners": {"tag:a": [], "tag:b": []},
			"grants": [{"src": ["tag:a"], "dst": ["tag:a"], "ip": ["*"]}, {"src": ["tag:b"], "dst": ["tag:a"], "ip": ["tcp:22"]}]}`
		h := newHub("e1", nil, 0, time.Now)
		h.filterDelay = 100 * time.Millisecond
		h.afterFunc = func(d time.Duration, f func()) { time.AfterFunc(d, f) }
		h.setPolicy(mustEngine(t, pol))
		h.upsert(hubNode(1, "tag:a"))
		h.upsert(hubNode(2, "tag:a"))
		s, m := subscribeMap(t, h, 1)
		// count drains s into m and counts the frames carrying a filter
		// and those carrying peers.
		count := func() (filters, peers int) {
			for _, f := range s.q.take(nil) {
				resp, _, err := controlclient.ReadMapResponse(bytes.NewReader(f), nil)
				if err != nil {
					t.Fatal(err)
				}
				if resp.PacketFilter != nil || resp.PacketFilterPatch != nil {
					filters++
				}
				if len(resp.PeersChanged)+len(resp.PeersRemoved) > 0 {
					peers++
				}
				if err := m.Apply(resp); err != nil {
					t.Fatal(err)
				}
			}
			return filters, peers
		}
		full := func(what string) {
			h.mu.Lock()
			want := decodeMsg(t, h.fullLocked(h.nodes[1]))
			h.mu.Unlock()
			compareMaps(t, what, m, want)
		}
		// A lone join: admitted at once, before its first packet.
		h.upsert(hubNode(9, "tag:a"))
		if f, p := count(); f != 1 || p != 1 {
			t.Fatalf("right after a join: %d filter updates and %d peer updates; want 1 and 1", f, p)
		}
		full("after a lone join")
		time.Sleep(time.Second)
		// A burst: the first at once, the other nine in one update after
		// the delay; the peers themselves at once.
		for id := netmap.NodeID(10); id < 20; id++ {
			h.upsert(hubNode(id, "tag:a"))
		}
		if f, p := count(); f != 1 || p != 10 {
			t.Fatalf("right after 10 joins: %d filter updates and %d peer updates; want 1 and 10", f, p)
		}
		time.Sleep(100 * time.Millisecond)
		synctest.Wait()
		if f, _ := count(); f != 1 {
			t.Fatalf("after the delay: %d filter updates; want 1 for the last 9 joins", f)
		}
		full("after the joins")

		// Two leaves: the second waits for the delay.
		h.remove(10, controlclient.ErrNotRegistered)
		h.remove(12, controlclient.ErrNotRegistered)
		if f, p := count(); f != 0 || p != 2 {
			t.Fatalf("right after two leaves within the delay of the last update: %d filter updates and %d peer updates; want 0 and 2", f, p)
		}
		time.Sleep(100 * time.Millisecond)
		synctest.Wait()
		if f, _ := count(); f != 1 {
			t.Fatalf("after the delay: %d filter updates for the leaves; want 1", f)
		}
		full("after the leaves")

		// tag:b may reach node 1 on tcp:22 only: narrower, and at once.
		n := *h.get(11)
		n.Tags = []string{"tag:b"}
		h.upsert(&n)
		if f, _ := count(); f != 1 {
			t.Fatalf("right after a re-tag: %d filter updates; want 1 at once", f)
		}
		full("after the re-tag")
		time.Sleep(time.Second)
		synctest.Wait()
		if f, p := count(); f != 0 || p != 0 {
			t.Fatalf("later: %d filter and %d peer updates; want none", f, p)
		}
	})
}

// countingEngine is a policy.Engine that counts the peer lists asked of it.
type countingEngine struct {
	*policy.Engine
	peers atomic.Int64
}

func (c *countingEngine) Peers(n *netmap.Node) []netmap.NodeID {
	c.peers.Add(1)
	return c.Engine.Peers(n)
}

// TestSetPolicySameVisibility: a policy change that keeps who sees whom
// lists no node's peers when no capabilities or exit nodes are involved,
// and still brings every node to its full map's state when capabilities
// change (they ride in the peer entries) or exit node use does.
func TestSetPolicySameVisibility(t *testing.T) {
	const header = `"tagOwners": {"tag:srv": [], "tag:gpu": [], "tag:exit": []},
		"autoApprovers": {"exitNode": ["tag:exit"]},`
	pol := func(grants string) *countingEngine {
		return &countingEngine{Engine: mustEngine(t, `{`+header+`"grants": [`+grants+`]}`)}
	}
	h := newHub("e1", nil, 4096, time.Now)
	first := pol(`{"src": ["tag:gpu"], "dst": ["tag:srv"], "ip": ["tcp:22"]}`)
	h.setPolicy(first)
	clients := map[*session]*netmap.NetworkMap{}
	for id := netmap.NodeID(1); id <= 12; id++ {
		tag := []string{"tag:srv", "tag:gpu", "tag:exit"}[id%3]
		n := hubNode(id, tag)
		h.upsert(n)
		s, m := subscribeMap(t, h, id)
		clients[s] = m
	}
	check := func(what string) {
		t.Helper()
		for s, m := range clients {
			drain(t, s, m)
			h.mu.Lock()
			want := decodeMsg(t, h.fullLocked(h.nodes[s.node]))
			h.mu.Unlock()
			compareMaps(t, fmt.Sprintf("%s, node %d", what, s.node), m, want)
		}
	}
	check("first policy")
	first.peers.Store(0)
	// The tag:exit nodes become exit nodes (auto-approved) for the last
	// steps.
	becomeExits := func() {
		for _, id := range []netmap.NodeID{2, 5, 8, 11} {
			h.mu.Lock()
			n := *h.nodes[id]
			h.mu.Unlock()
			n.AdvertisedRoutes = []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")}
			h.upsert(&n)
			h.mu.Lock()
			if !isExitPeer(h.nodes[id]) {
				t.Fatalf("node %d is no exit node", id)
			}
			h.mu.Unlock()
		}
		check("exit nodes approved")
	}
	steps := []struct {
		name      string
		grants    string
		listPeers bool
	}{
		{"other ports", `{"src": ["tag:gpu"], "dst": ["tag:srv"], "ip": ["tcp:80"]}`, false},
		{"capabilities granted", `{"src": ["tag:gpu"], "dst": ["tag:srv"], "ip": ["tcp:80"], "app": {"example.com/cap/x": [{"a": 1}]}}`, true},
		{"capabilities changed", `{"src": ["tag:gpu"], "dst": ["tag:srv"], "ip": ["tcp:80"], "app": {"example.com/cap/x": [{"a": 2}]}}`, true},
		{"capabilities revoked", `{"src": ["tag:gpu"], "dst": ["tag:srv"], "ip": ["tcp:81"]}`, true},
		{"again other ports", `{"src": ["tag:gpu"], "dst": ["tag:srv"], "ip": ["tcp:22"]}`, false},
		{"exit nodes approved", "", true},
		{"exit node use", `{"src": ["tag:gpu"], "dst": ["tag:srv"], "ip": ["tcp:22"]}, {"src": ["tag:gpu"], "dst": ["autogroup:internet"], "ip": ["*"]}`, true},
		{"exit node ports", `{"src": ["tag:gpu"], "dst": ["tag:srv"], "ip": ["tcp:22"]}, {"src": ["tag:gpu"], "dst": ["autogroup:internet"], "ip": ["tcp:443"]}`, true},
	}
	prev := first
	for _, st := range steps {
		if st.grants == "" {
			becomeExits()
			prev.peers.Store(0)
			continue
		}
		next := pol(st.grants)
		h.setPolicy(next)
		if listed := prev.peers.Load()+next.peers.Load() > 0; listed != st.listPeers {
			t.Errorf("%s: peer lists asked for = %v; want %v", st.name, listed, st.listPeers)
		}
		check(st.name)
		prev = next
		prev.peers.Store(0)
	}
}
