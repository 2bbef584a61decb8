package control

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"meshd.dev/meshd/netmap"
)

// TestFullMapKeepsUnchangedPeers: a node that reconnects to another
// replica (another hub, another epoch) with the digest of the peers it
// holds gets a full map without them when the replica would send exactly
// those, and ends with the replica's full map; any difference in a peer
// entry, a wrong digest or an older client gets the peers listed.
func TestFullMapKeepsUnchangedPeers(t *testing.T) {
	for name, pol := range map[string]string{
		"tenants":                    tenantPolicy(2),
		"capabilities on every peer": withTenantTags(capsPolicies["everyone"], 2),
	} {
		t.Run(name, func(t *testing.T) {
			// Two replicas of one tailnet: the same nodes and policy.
			var nodes []*netmap.Node
			for id := netmap.NodeID(1); id <= 12; id++ {
				n := hubNode(id, fmt.Sprintf("tag:tenant%d", id%2))
				if id%5 == 0 {
					n.Tags, n.User = nil, "alice@example.com"
				}
				nodes = append(nodes, n)
			}
			hubs := []*hub{newHub("e1", nil, 4096, time.Now), newHub("e2", nil, 4096, time.Now)}
			for _, h := range hubs {
				h.setPolicy(mustEngine(t, pol))
				for _, n := range nodes {
					nn := *n
					h.upsert(&nn)
				}
			}
			_, m := subscribeMap(t, hubs[0], 2)
			if len(m.Peers) == 0 {
				t.Fatal("node 2 sees no peers: nothing to keep")
			}
			reconnect := func(version int, digest string) (kept bool) {
				t.Helper()
				// Always as from the other replica: its epoch, which this
				// one cannot resume from, so the stream starts full.
				_, first, err := hubs[1].subscribe(2, version, m.Version, "e1", digest)
				if err != nil {
					t.Fatal(err)
				}
				resp := decodeMsg(t, first)
				if err := m.Apply(resp); err != nil {
					t.Fatal(err)
				}
				hubs[1].mu.Lock()
				want := decodeMsg(t, hubs[1].fullLocked(hubs[1].nodes[2]))
				hubs[1].mu.Unlock()
				compareMaps(t, "after the reconnect", m, want)
				if !resp.Full || m.Epoch != "e2" {
					t.Fatalf("full %v, epoch %q; want a full map of e2", resp.Full, m.Epoch)
				}
				return resp.PeersKept
			}
			if !reconnect(netmap.ProtocolVersion, m.PeersDigest()) {
				t.Fatal("the same peers on the other replica were sent again")
			}
			if reconnect(netmap.FilterRulePatchVersion, m.PeersDigest()) {
				t.Fatal("peers kept for a client of protocol 4, which cannot keep them")
			}
			d := []byte(m.PeersDigest())
			d[0] = "10"[min(1, int(d[0]-'0'))] // another hex digit
			if reconnect(netmap.ProtocolVersion, string(d)) {
				t.Fatal("peers kept for a digest that is not theirs")
			}
			// A peer whose entry differs on the replica (endpoints it has
			// not told this node about yet): every peer is sent.
			hubs[1].mu.Lock()
			n4 := *hubs[1].nodes[4]
			hubs[1].mu.Unlock()
			if _, ok := m.Peers[4]; !ok {
				t.Fatal("node 2 does not see node 4")
			}
			n4.Endpoints = []netip.AddrPort{netip.MustParseAddrPort("198.18.0.4:41641")}
			hubs[1].upsert(&n4)
			if reconnect(netmap.ProtocolVersion, m.PeersDigest()) {
				t.Fatal("peers kept though node 4's endpoints changed")
			}
			if !reconnect(netmap.ProtocolVersion, m.PeersDigest()) {
				t.Fatal("after a full map, the same peers were sent again")
			}
		})
	}
}

// TestPeersKeptNeedsAMap: a full map that keeps peers applies only to a
// map that has some; a client without one asks for a full map.
func TestPeersKeptNeedsAMap(t *testing.T) {
	h := newHub("e1", nil, 4096, time.Now)
	h.setPolicy(mustEngine(t, tenantPolicy(1)))
	for id := netmap.NodeID(1); id <= 3; id++ {
		h.upsert(hubNode(id, "tag:tenant0"))
	}
	_, m := subscribeMap(t, h, 1)
	_, first, err := h.subscribe(1, netmap.ProtocolVersion, 0, "", m.PeersDigest())
	if err != nil {
		t.Fatal(err)
	}
	resp := decodeMsg(t, first)
	if !resp.PeersKept {
		t.Fatal("peers not kept")
	}
	var empty netmap.NetworkMap
	if err := empty.Apply(resp); err == nil {
		t.Fatal("a map without peers took a full map that keeps them")
	}
}
