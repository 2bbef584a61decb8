package control

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"testing"

	"meshd.dev/meshd/netmap"
)

// capsPolicies grant "app" capabilities through every kind of selector
// (tag, user, group, autogroup:self, host address, "*"), and one grants
// none. They are the PeerCapper contract's test cases.
var capsPolicies = map[string]string{
	"tags and users": `{
		"tagOwners": {"tag:srv": [], "tag:gpu": []},
		"groups": {"group:ops": ["alice@example.com"]},
		"grants": [
			{"src": ["group:ops"], "dst": ["tag:srv"], "app": {"example.com/cap/admin": [{"role": "admin"}]}},
			{"src": ["autogroup:member"], "dst": ["tag:gpu"], "ip": ["*"], "app": {"example.com/cap/view": [{}]}},
			{"src": ["tag:gpu"], "dst": ["tag:gpu"], "ip": ["tcp:22"]},
		],
	}`,
	"self and hosts": `{
		"tagOwners": {"tag:srv": [], "tag:gpu": []},
		"hosts": {"gpu1": "100.64.0.3/32"},
		"grants": [
			{"src": ["autogroup:member"], "dst": ["autogroup:self"], "ip": ["*"], "app": {"example.com/cap/self": [{"own": true}]}},
			{"src": ["tag:srv"], "dst": ["gpu1"], "app": {"example.com/cap/host": [{}]}},
			{"src": ["*"], "dst": ["tag:srv"], "ip": ["tcp:443"]},
		],
	}`,
	"everyone": `{
		"tagOwners": {"tag:srv": [], "tag:gpu": []},
		"grants": [{"src": ["*"], "dst": ["*"], "ip": ["*"], "app": {"example.com/cap/all": [{"n": 1}]}}],
	}`,
	"no app grants": `{
		"tagOwners": {"tag:srv": [], "tag:gpu": []},
		"grants": [{"src": ["*"], "dst": ["tag:srv"], "ip": ["*"]}],
	}`,
}

// capsNodes are two users with two devices each and three tagged nodes.
func capsNodes() []*netmap.Node {
	var out []*netmap.Node
	for i, who := range []struct{ user, tag string }{
		{user: "alice@example.com"}, {user: "alice@example.com"}, {tag: "tag:gpu"},
		{user: "bob@example.com"}, {user: "bob@example.com"}, {tag: "tag:srv"}, {tag: "tag:gpu"},
	} {
		n := benchNode(netmap.NodeID(i + 1))
		n.User, n.Tags = who.user, nil
		if who.tag != "" {
			n.Tags = []string{who.tag}
		}
		out = append(out, n)
	}
	return out
}

// TestPeerCapperContract: policy.Engine grants a capability on a node only
// where that node's filter carries CapGrants, which the coordinator relies
// on to skip PeerCaps for every other node (see PeerCapper).
func TestPeerCapperContract(t *testing.T) {
	nodes := capsNodes()
	if got := nodes[2].Addresses[0].Addr(); got != netip.MustParseAddr("100.64.0.3") {
		t.Fatalf("node 3 is %v; the hosts entry above names 100.64.0.3", got)
	}
	for name, src := range capsPolicies {
		t.Run(name, func(t *testing.T) {
			e := mustEngine(t, src)
			e.SetNodes(nodes)
			granted := 0
			for _, dst := range nodes {
				hasCaps := filterHasCaps(e.FilterFor(dst, nil))
				for _, peer := range nodes {
					if dst == peer {
						continue
					}
					if caps := e.PeerCaps(dst, peer); len(caps) > 0 {
						granted++
						if !hasCaps {
							t.Errorf("node %d holds %v on node %d, whose filter has no CapGrants", peer.ID, caps, dst.ID)
						}
					}
				}
			}
			if (granted == 0) != (name == "no app grants") {
				t.Fatalf("%d capabilities granted between the test nodes", granted)
			}
		})
	}
}

// setPolicyReference is setPolicy as it was before the CapGrants gate:
// PeerCaps for every pair visible before and after. It is the reference
// the fast path must match frame for frame.
func (h *hub) setPolicyReference(p Policy) {
	h.mu.Lock()
	defer h.mu.Unlock()
	old, oldIndexed, oldBootstrap := h.policy, h.indexer != nil, h.bootstrap
	if p == nil {
		h.policy, h.bootstrap = newBootstrapPolicy(), true
	} else {
		h.policy, h.bootstrap = p, false
	}
	oldCapper := h.capper
	h.indexer, _ = p.(NodeIndexer)
	h.capper, _ = p.(PeerCapper)
	all := h.allLocked()
	was := make(map[netmap.NodeID][]netmap.NodeID, len(h.sessions))
	for id := range h.sessions {
		if viewer := h.nodes[id]; viewer != nil {
			was[id] = visible(old, oldIndexed, viewer, all)
		}
	}
	if h.indexer != nil {
		h.indexer.SetNodes(all)
	}
	h.version++
	h.logChange(0)
	for id, ss := range h.sessions {
		viewer := h.nodes[id]
		if viewer == nil {
			continue
		}
		is := visible(h.policy, h.indexer != nil, viewer, all)
		r := h.base()
		wasIDs := was[id]
		i, j := 0, 0
		for i < len(wasIDs) || j < len(is) {
			switch {
			case j == len(is) || i < len(wasIDs) && wasIDs[i] < is[j]:
				r.PeersRemoved = append(r.PeersRemoved, wasIDs[i])
				i++
			case i == len(wasIDs) || is[j] < wasIDs[i]:
				if m := h.nodes[is[j]]; m != nil {
					r.PeersChanged = append(r.PeersChanged, withCaps(m, h.capsLocked(viewer, m)))
				}
				j++
			default:
				if m := h.nodes[is[j]]; m != nil && (oldCapper != nil || h.capper != nil) {
					var oc map[string][]json.RawMessage
					if oldCapper != nil {
						oc = oldCapper.PeerCaps(viewer, m)
					}
					if nc := h.capsLocked(viewer, m); !capsEqual(oc, nc) {
						r.PeersChanged = append(r.PeersChanged, withCaps(m, nc))
					}
				}
				i++
				j++
			}
		}
		f := h.filterFor(viewer)
		r.PacketFilter = &f
		fb, _ := json.Marshal(f)
		same := oldBootstrap == h.bootstrap && len(r.PeersChanged) == 0 && len(r.PeersRemoved) == 0
		var frame []byte
		for _, s := range ss {
			if same && bytes.Equal(s.lastFilter, fb) {
				continue
			}
			if frame == nil {
				frame = h.encode(&r)
			}
			s.lastFilter = fb
			h.send(s, frame)
		}
	}
}

// TestSetPolicyMatchesReference drives two hubs through the same policy
// changes, one with setPolicy and one with the reference, and requires
// the same frames on every session.
func TestSetPolicyMatchesReference(t *testing.T) {
	steps := []string{"tags and users", "self and hosts", "self and hosts", "no app grants", "everyone", "", "tags and users", "everyone", "no app grants", ""}
	newHubWith := func() *hub {
		h := newHub("ref", nil, 64, nil)
		for _, n := range capsNodes() {
			h.nodes[n.ID] = n
			h.byKey[n.NodeKey] = n.ID
			h.sessions[n.ID] = []*session{{node: n.ID, q: newFrameQueue(64), dead: make(chan struct{})}}
		}
		return h
	}
	fast, ref := newHubWith(), newHubWith()
	fast.parallelChunk = 1 // workers even for 7 nodes, for -race to watch
	sent, withCaps := 0, 0
	for i, name := range steps {
		var pf, pr Policy
		if name != "" {
			pf, pr = mustEngine(t, capsPolicies[name]), mustEngine(t, capsPolicies[name])
		}
		fast.setPolicy(pf)
		ref.setPolicyReference(pr)
		for id, ss := range ref.sessions {
			want, got := drainFrames(ss[0]), drainFrames(fast.sessions[id][0])
			if len(want) != len(got) {
				t.Fatalf("step %d (%q), node %d: %d frames, reference sent %d", i, name, id, len(got), len(want))
			}
			for k := range want {
				if !bytes.Equal(want[k], got[k]) {
					t.Fatalf("step %d (%q), node %d, frame %d:\n got %s\nwant %s", i, name, id, k, got[k], want[k])
				}
			}
			sent += len(want)
			for _, f := range want {
				if bytes.Contains(f, []byte(`"capabilities"`)) {
					withCaps++
				}
			}
		}
	}
	if sent == 0 || withCaps == 0 {
		t.Fatalf("%d frames sent, %d with capabilities: the comparison proves too little", sent, withCaps)
	}
}

func drainFrames(s *session) [][]byte {
	return s.q.take(nil)
}
