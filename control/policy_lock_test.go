package control

import (
	"context"
	"net/netip"
	"slices"
	"testing"
	"time"

	"meshd.dev/meshd/netmap"
)

// TestPolicyChangeDoesNotStallJoins: while a policy change computes, a
// node joins, opens its map stream and another reports endpoints; when the
// change lands, every node's map is the new policy's view of all of them.
func TestPolicyChangeDoesNotStallJoins(t *testing.T) {
	ctx := context.Background()
	ts := startServer(t, ServerOptions{})
	ka := ts.key(t, AuthKeyOptions{Tags: []string{"tag:a"}, Reusable: true})
	kb := ts.key(t, AuthKeyOptions{Tags: []string{"tag:b"}, Reusable: true})
	a, b, c := newTestNode(t, ts.url, ""), newTestNode(t, ts.url, ""), newTestNode(t, ts.url, "")
	a.mustRegister(t, ka, "a")
	b.mustRegister(t, kb, "b")
	a.follow(t, a.mapRequest())
	b.follow(t, b.mapRequest())
	a.waitMap(t, "a sees b under bootstrap", hasPeer(b.id))

	g := newGatedPolicy(mustEngine(t, abPolicy)) // tag:a sees only tag:a
	t.Cleanup(g.open)
	changed := make(chan struct{})
	go func() {
		defer close(changed)
		ts.SetPolicy(g)
	}()
	select {
	case <-g.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the policy change never started computing")
	}
	within(t, "a join", func() {
		if _, err := c.register(ctx, ka, "c"); err != nil {
			t.Error(err)
		}
	})
	c.follow(t, c.mapRequest())
	c.waitMap(t, "c's first map, under the old policy", func(m *netmap.NetworkMap) bool { return m.PolicyBootstrap && m.Peers[b.id] != nil })
	ep := netip.MustParseAddrPort("198.18.0.7:41641")
	within(t, "an endpoint update", func() {
		req := b.mapRequest()
		req.Endpoints = []netip.AddrPort{ep}
		if err := b.c.Update(ctx, req); err != nil {
			t.Error(err)
		}
	})
	select {
	case <-changed:
		t.Fatal("the policy change finished while held")
	default:
	}
	g.open()
	select {
	case <-changed:
	case <-time.After(10 * time.Second):
		t.Fatal("the policy change did not finish")
	}

	// The new policy's view of all three, filters included (a peer and
	// the filter that admits it may come in separate frames, as with any
	// join: wait for both).
	addr := map[netmap.NodeID]netip.Prefix{}
	for _, n := range []*testNode{a, b, c} {
		addr[n.id] = netip.PrefixFrom(n.self.Addresses[0].Addr(), 32)
	}
	underPolicy := func(want ...netmap.NodeID) func(*netmap.NetworkMap) bool {
		return func(m *netmap.NetworkMap) bool {
			if m.PolicyBootstrap || !slices.Equal(peerIDs(m), want) {
				return false
			}
			var src []netip.Prefix
			for _, r := range m.PacketFilter {
				src = append(src, r.SrcIPs...)
			}
			for id, p := range addr {
				if id != m.Self.ID && slices.Contains(want, id) != slices.Contains(src, p) {
					return false
				}
			}
			return true
		}
	}
	a.waitMap(t, "a sees and admits c, not b", underPolicy(c.id))
	c.waitMap(t, "c sees and admits a, not b", underPolicy(a.id))
	b.waitMap(t, "b sees and admits nobody", underPolicy())
}
