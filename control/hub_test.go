package control

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
)

func hubNode(id netmap.NodeID, tags ...string) *netmap.Node {
	v4 := addrPool{}.Next(netip.Addr{})
	for range id - 1 {
		v4 = addrPool{}.Next(v4)
	}
	addrs := addrPool{}.Addresses(v4)
	return &netmap.Node{ID: id, Hostname: fmt.Sprintf("n%d", id), Tags: tags, NodeKey: netmap.NewNodePrivate().Public(),
		Addresses: addrs, AllowedIPs: addrs}
}

// drain applies every queued frame of s to m.
func drain(t testing.TB, s *session, m *netmap.NetworkMap) int {
	t.Helper()
	n := 0
	for _, f := range s.q.take(nil) {
		resp, _, err := controlclient.ReadMapResponse(bytes.NewReader(f), nil)
		if err != nil {
			t.Fatalf("queued frame: %v", err)
		}
		if err := m.Apply(resp); err != nil {
			t.Fatalf("apply queued frame: %v", err)
		}
		n++
	}
	return n
}

func subscribeMap(t testing.TB, h *hub, id netmap.NodeID) (*session, *netmap.NetworkMap) {
	t.Helper()
	s, first, err := h.subscribe(id, netmap.ProtocolVersion, 0, "", "")
	if err != nil {
		t.Fatal(err)
	}
	m := &netmap.NetworkMap{}
	if err := m.Apply(decodeMsg(t, first)); err != nil {
		t.Fatal(err)
	}
	return s, m
}

func peerIDs(m *netmap.NetworkMap) []netmap.NodeID {
	var ids []netmap.NodeID
	for _, p := range m.SortedPeers() {
		ids = append(ids, p.ID)
	}
	return ids
}

// tagPolicy lets nodes see each other only if they share a tag, and allows
// inbound traffic from exactly the visible peers.
type tagPolicy struct{ refuse string }

func (tagPolicy) CanSee(a, b *netmap.Node) bool {
	for _, t := range a.Tags {
		if slices.Contains(b.Tags, t) {
			return true
		}
	}
	return false
}

func (p tagPolicy) FilterFor(n *netmap.Node, all []*netmap.Node) []netmap.FilterRule {
	var src []netip.Prefix
	for _, o := range all {
		if o.ID != n.ID && p.CanSee(n, o) {
			src = append(src, o.Addresses...)
		}
	}
	if len(src) == 0 {
		return nil
	}
	return []netmap.FilterRule{{SrcIPs: src, DstPorts: []netmap.NetPortRange{{Net: n.Addresses[0], Ports: netmap.AllPorts}}}}
}

func (p tagPolicy) CheckTags(user string, keyTags, requested []string) error {
	if slices.Contains(requested, p.refuse) {
		return errors.New("tag:" + p.refuse + " is not yours")
	}
	return nil
}

func TestHubPolicyVisibilityAndFilters(t *testing.T) {
	h := newHub("e1", nil, 0, time.Now)
	h.upsert(hubNode(1, "tag:a"))
	h.upsert(hubNode(2, "tag:a"))
	h.upsert(hubNode(3, "tag:b"))
	s1, m1 := subscribeMap(t, h, 1)
	s3, m3 := subscribeMap(t, h, 3)
	if got := peerIDs(m1); !slices.Equal(got, []netmap.NodeID{2, 3}) || !m1.PolicyBootstrap {
		t.Fatalf("bootstrap: node 1 sees %v (bootstrap=%v)", got, m1.PolicyBootstrap)
	}

	h.setPolicy(tagPolicy{})
	drain(t, s1, m1)
	drain(t, s3, m3)
	if got := peerIDs(m1); !slices.Equal(got, []netmap.NodeID{2}) || m1.PolicyBootstrap {
		t.Fatalf("tag policy: node 1 sees %v (bootstrap=%v); want [2]", got, m1.PolicyBootstrap)
	}
	if len(m3.Peers) != 0 || len(m3.PacketFilter) != 0 || m3.PacketFilter == nil {
		t.Fatalf("node 3 alone in tag:b: peers %v filter %v; want none and deny-all", peerIDs(m3), m3.PacketFilter)
	}
	if f := m1.PacketFilter; len(f) != 1 || !slices.Contains(f[0].SrcIPs, hubNode(2).Addresses[0]) {
		t.Fatalf("node 1 filter %+v; want node 2 as the source", f)
	}

	// A joining tag:b node shows up for node 3 only, and opens 3's filter.
	h.upsert(hubNode(4, "tag:b"))
	drain(t, s1, m1)
	drain(t, s3, m3)
	if !slices.Equal(peerIDs(m1), []netmap.NodeID{2}) || !slices.Equal(peerIDs(m3), []netmap.NodeID{4}) {
		t.Fatalf("after join: 1 sees %v, 3 sees %v", peerIDs(m1), peerIDs(m3))
	}
	if len(m3.PacketFilter) != 1 {
		t.Fatalf("node 3 filter after join: %+v", m3.PacketFilter)
	}
	// Re-tagging node 3 into tag:a moves it across, for itself and others.
	n3 := *hubNode(3, "tag:a")
	n3.NodeKey, n3.Addresses, n3.AllowedIPs = h.get(3).NodeKey, h.get(3).Addresses, h.get(3).AllowedIPs
	n3.Online = true
	h.upsert(&n3)
	drain(t, s1, m1)
	drain(t, s3, m3)
	if !slices.Equal(peerIDs(m1), []netmap.NodeID{2, 3}) || !slices.Equal(peerIDs(m3), []netmap.NodeID{1, 2}) {
		t.Fatalf("after re-tag: 1 sees %v, 3 sees %v", peerIDs(m1), peerIDs(m3))
	}
	// Back to bootstrap: everyone again.
	h.setPolicy(nil)
	drain(t, s1, m1)
	if !slices.Equal(peerIDs(m1), []netmap.NodeID{2, 3, 4}) || !m1.PolicyBootstrap {
		t.Fatalf("bootstrap again: 1 sees %v", peerIDs(m1))
	}
}

func TestHubSlowConsumerDropped(t *testing.T) {
	h := newHub("e", nil, 2, time.Now)
	h.upsert(hubNode(1))
	h.upsert(hubNode(2))
	slow, _ := subscribeMap(t, h, 1)
	fast, mf := subscribeMap(t, h, 2)
	for i := range 5 {
		n := *h.get(1)
		n.HomeDERP = i + 1
		h.upsert(&n)
		drain(t, fast, mf)
	}
	select {
	case <-slow.dead:
		if !errors.Is(slow.dropErr, errSlowConsumer) {
			t.Errorf("drop reason %v", slow.dropErr)
		}
	default:
		t.Fatal("session with a full queue was not dropped")
	}
	select {
	case <-fast.dead:
		t.Fatal("a reader that keeps up was dropped")
	default:
	}
	if mf.Peers[1].HomeDERP != 5 {
		t.Errorf("fast reader saw home DERP %d; want 5", mf.Peers[1].HomeDERP)
	}
}

func TestHubResume(t *testing.T) {
	h := newHub("e", nil, 0, time.Now)
	for id := range netmap.NodeID(3) {
		h.upsert(hubNode(id + 1))
	}
	s, m := subscribeMap(t, h, 1)
	h.unsubscribe(s)
	since := m.Version
	n2 := *h.get(2)
	n2.Endpoints = []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:1")}
	h.upsert(&n2)
	h.remove(3, controlclient.ErrNotRegistered)
	h.upsert(hubNode(9))

	tests := []struct {
		name  string
		since uint64
		epoch string
		full  bool
	}{
		{"resume", since, "e", false},
		{"other epoch", since, "old", true},
		{"no base", 0, "e", true},
		{"from the future", h.version + 1000, "e", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, first, err := h.subscribe(1, netmap.ProtocolVersion, tt.since, tt.epoch, "")
			if err != nil {
				t.Fatal(err)
			}
			defer h.unsubscribe(s)
			if first.resp.Full != tt.full {
				t.Fatalf("full=%v; want %v", first.resp.Full, tt.full)
			}
			mm := m.Clone()
			if err := mm.Apply(decodeMsg(t, first)); err != nil {
				t.Fatal(err)
			}
			if got := peerIDs(mm); !slices.Equal(got, []netmap.NodeID{2, 9}) || len(mm.Peers[2].Endpoints) != 1 {
				t.Fatalf("peers after resume %v", got)
			}
		})
	}
	// Once the change log has wrapped past since, resuming needs a full map.
	for i := range changeLogLen + 1 {
		n := *h.get(2)
		n.HomeDERP = i + 1
		h.upsert(&n)
	}
	s, first, _ := h.subscribe(1, netmap.ProtocolVersion, since, "e", "")
	h.unsubscribe(s)
	if !first.resp.Full {
		t.Fatal("resume across a wrapped change log was not a full map")
	}
}

func TestPatchFor(t *testing.T) {
	base := hubNode(1, "tag:a")
	tests := []struct {
		name   string
		mod    func(*netmap.Node)
		ok     bool
		fields string
	}{
		{"endpoints", func(n *netmap.Node) { n.Endpoints = []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:5")} }, true, "endpoints"},
		{"online", func(n *netmap.Node) { n.Online = true }, true, "online"},
		{"derp+disco", func(n *netmap.Node) { n.HomeDERP = 2; n.DiscoKey = netmap.NewDiscoPrivate().Public() }, true, "home_derp,disco_key"},
		{"node key", func(n *netmap.Node) { n.NodeKey = netmap.NewNodePrivate().Public() }, true, "node_key"},
		{"tags", func(n *netmap.Node) { n.Tags = []string{"tag:b"} }, false, ""},
		{"hostname", func(n *netmap.Node) { n.Hostname = "x" }, false, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := *base
			tt.mod(&n)
			p, ok := patchFor(base, &n)
			if ok != tt.ok {
				t.Fatalf("ok=%v; want %v", ok, tt.ok)
			}
			if !ok {
				return
			}
			var got []string
			if p.Endpoints != nil {
				got = append(got, "endpoints")
			}
			if p.HomeDERP != nil {
				got = append(got, "home_derp")
			}
			if p.Online != nil {
				got = append(got, "online")
			}
			if p.DiscoKey != nil {
				got = append(got, "disco_key")
			}
			if p.NodeKey != nil {
				got = append(got, "node_key")
			}
			if strings.Join(got, ",") != tt.fields {
				t.Errorf("patch fields %v; want %s", got, tt.fields)
			}
		})
	}
}

func TestAddrPool(t *testing.T) {
	p := addrPool{}
	a := p.Next(netip.Addr{})
	if a != netip.MustParseAddr("100.64.0.1") {
		t.Fatalf("first address %v", a)
	}
	tests := []struct{ prev, want string }{
		{"100.64.0.254", "100.64.1.1"},
		{"100.100.100.99", "100.100.100.101"},
		{"100.127.255.254", "100.64.0.1"},
		{"10.0.0.1", "100.64.0.1"},
	}
	for _, tt := range tests {
		if got := p.Next(netip.MustParseAddr(tt.prev)); got.String() != tt.want {
			t.Errorf("Next(%s) = %v; want %s", tt.prev, got, tt.want)
		}
	}
	if got := v6For(netip.MustParseAddr("100.64.1.2")); got != netip.MustParseAddr("fd5e:5a1e:d::6440:102") {
		t.Errorf("v6For = %v", got)
	}
}

// decodeMsg builds m's frame and reads it back, as a client would.
func decodeMsg(t testing.TB, m *mapMessage) *netmap.MapResponse {
	t.Helper()
	f, err := m.frame()
	if err != nil {
		t.Fatal(err)
	}
	r, _, err := controlclient.ReadMapResponse(bytes.NewReader(f), nil)
	if err != nil {
		t.Fatalf("read back %s: %v", f[controlclient.FrameHeaderLen:], err)
	}
	return r
}

func TestFullMapSplicingMatchesPlainEncoding(t *testing.T) {
	h := newHub("e", &netmap.DERPMap{Regions: []netmap.DERPRegion{{ID: 1, Code: "x", Nodes: []netmap.DERPNode{{Name: "a", Host: "127.0.0.1", DERPPort: 1}}}}}, 0, time.Now)
	for id := range netmap.NodeID(5) {
		h.upsert(benchNode(id + 1))
	}
	for _, n := range []int{1, 5} { // with peers, and alone after removals
		h.mu.Lock()
		m := h.fullLocked(h.nodes[1])
		h.mu.Unlock()
		got := decodeMsg(t, m)
		want := *m.resp
		for _, p := range h.allLocked() {
			if p.ID != 1 {
				want.Peers = append(want.Peers, *p)
			}
		}
		wb, _ := json.Marshal(&want)
		gb, _ := json.Marshal(got)
		if !bytes.Equal(wb, gb) {
			t.Fatalf("spliced full map differs:\n got %s\nwant %s", gb, wb)
		}
		if n == 1 {
			for id := netmap.NodeID(2); id <= 5; id++ {
				h.remove(id, controlclient.ErrNotRegistered)
			}
		}
	}
}
