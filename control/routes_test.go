package control

import (
	"context"
	"encoding/json"
	"net/netip"
	"slices"
	"strconv"
	"testing"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
)

func prefixes(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

// routedNode registers a node and follows its map, advertising routes.
func routedNode(t *testing.T, ts *testServer, key, host string, routes ...string) (*testNode, context.CancelFunc) {
	t.Helper()
	n := newTestNode(t, ts.url, ts.Fingerprint())
	n.mustRegister(t, key, host)
	req := n.mapRequest()
	req.Stream = true
	if routes != nil {
		req.Hostinfo = &netmap.Hostinfo{RoutableIPs: prefixes(routes...)}
	}
	return n, n.follow(t, req)
}

func peerOf(nm *netmap.NetworkMap, id netmap.NodeID) *netmap.Node { return nm.Peers[id] }

// TestSubnetRouteApprovalAndFailover: an advertised route is in nobody's
// AllowedIPs until approved; with two approved routers one is primary
// (the lowest id) and the other stands by; when the primary's stream ends
// the standby takes over, and the old primary coming back does not take
// the subnet back.
func TestSubnetRouteApprovalAndFailover(t *testing.T) {
	ts := startServer(t, ServerOptions{clock: newClock()}) // silent-router checks never fire
	key := ts.key(t, AuthKeyOptions{Reusable: true, Tags: []string{"tag:x"}, Preauthorized: true})
	subnet := netip.MustParsePrefix("10.1.0.0/24")
	r1, stop1 := routedNode(t, ts, key, "r1", "10.1.0.0/24")
	r2, _ := routedNode(t, ts, key, "r2", "10.1.0.0/24")
	cl, _ := routedNode(t, ts, key, "client")
	ctx := context.Background()

	cl.waitMap(t, "routers advertised, nothing routed", func(nm *netmap.NetworkMap) bool {
		a, b := peerOf(nm, r1.id), peerOf(nm, r2.id)
		return a != nil && b != nil && slices.Equal(a.AdvertisedRoutes, []netip.Prefix{subnet}) &&
			slices.Equal(b.AdvertisedRoutes, []netip.Prefix{subnet}) && len(a.AllowedIPs) == 2 && len(b.AllowedIPs) == 2
	})
	for _, r := range []*testNode{r1, r2} {
		if err := ts.ApproveRoute(ctx, r.id, subnet); err != nil {
			t.Fatal(err)
		}
	}
	primaryIs := func(want, standby *testNode) func(*netmap.NetworkMap) bool {
		return func(nm *netmap.NetworkMap) bool {
			p, s := peerOf(nm, want.id), peerOf(nm, standby.id)
			return p != nil && s != nil && slices.Contains(p.AllowedIPs, subnet) && slices.Equal(p.PrimaryRoutes, []netip.Prefix{subnet}) &&
				!slices.Contains(s.AllowedIPs, subnet) && len(s.PrimaryRoutes) == 0 && slices.Equal(s.ApprovedRoutes, []netip.Prefix{subnet})
		}
	}
	cl.waitMap(t, "r1 primary, r2 standby", primaryIs(r1, r2))
	// The router's own map says it carries the route (its filter is
	// compiled for it as a local destination).
	r1.waitMap(t, "r1's self carries the route", func(nm *netmap.NetworkMap) bool { return slices.Contains(nm.Self.AllowedIPs, subnet) })

	stop1()
	cl.waitMap(t, "r2 took over", primaryIs(r2, r1))
	r2.waitMap(t, "r2's self carries the route", func(nm *netmap.NetworkMap) bool { return slices.Contains(nm.Self.AllowedIPs, subnet) })

	// r1 comes back: r2 keeps the subnet (no flapping back).
	req := r1.mapRequest()
	req.Stream = true
	r1.follow(t, req)
	cl.waitMap(t, "r1 online again", func(nm *netmap.NetworkMap) bool { return peerOf(nm, r1.id) != nil && peerOf(nm, r1.id).Online })
	if nm := cl.current(); !primaryIs(r2, r1)(nm) {
		t.Fatalf("primary moved back to r1: r1 %+v r2 %+v", peerOf(nm, r1.id), peerOf(nm, r2.id))
	}

	// Routes list: both advertise, both approved, r2 primary.
	rs, err := ts.Routes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got := map[netmap.NodeID]RouteInfo{}
	for _, r := range rs {
		got[r.ID] = r
	}
	if len(got[r2.id].Primary) != 1 || len(got[r1.id].Primary) != 0 || len(got[r1.id].Approved) != 1 {
		t.Fatalf("routes list: %+v", rs)
	}
}

// TestRouteAdminErrors: approving what is not advertised, approving twice
// and rejecting what is not approved are errors that change nothing.
func TestRouteAdminErrors(t *testing.T) {
	ts := startServer(t, ServerOptions{clock: newClock()}) // silent-router checks never fire
	key := ts.key(t, AuthKeyOptions{Reusable: true, Tags: []string{"tag:x"}, Preauthorized: true})
	r, _ := routedNode(t, ts, key, "r", "10.1.0.0/24")
	ctx := context.Background()
	waitFor(t, "advertised", func() bool { n := ts.hub.get(r.id); return n != nil && len(n.AdvertisedRoutes) == 1 })
	for _, tc := range []struct {
		name    string
		approve bool
		route   string
	}{
		{"not advertised", true, "10.2.0.0/24"},
		{"reject unapproved", false, "10.1.0.0/24"},
		{"tailnet range", true, "100.64.0.0/10"},
	} {
		var err error
		if tc.approve {
			err = ts.ApproveRoute(ctx, r.id, netip.MustParsePrefix(tc.route))
		} else {
			err = ts.RejectRoute(ctx, r.id, netip.MustParsePrefix(tc.route))
		}
		if err == nil {
			t.Errorf("%s: no error", tc.name)
		}
	}
	if err := ts.ApproveRoute(ctx, r.id, netip.MustParsePrefix("10.1.0.0/24")); err != nil {
		t.Fatal(err)
	}
	if err := ts.ApproveRoute(ctx, r.id, netip.MustParsePrefix("10.1.0.0/24")); err == nil {
		t.Error("approving twice: no error")
	}
}

// TestRouteAdvertisementRefused: a node advertising a malformed route,
// another node's tailnet address or the tailnet range is refused, and its
// routes in force stay as they were.
func TestRouteAdvertisementRefused(t *testing.T) {
	ts := startServer(t, ServerOptions{clock: newClock()}) // silent-router checks never fire
	key := ts.key(t, AuthKeyOptions{Reusable: true, Tags: []string{"tag:x"}, Preauthorized: true})
	victim, _ := routedNode(t, ts, key, "victim")
	r, _ := routedNode(t, ts, key, "r", "10.1.0.0/24")
	waitFor(t, "advertised", func() bool { n := ts.hub.get(r.id); return n != nil && len(n.AdvertisedRoutes) == 1 })
	victimAddr := ts.hub.get(victim.id).Addresses[0]
	for _, bad := range []string{"10.1.0.1/24", victimAddr.String(), "100.64.0.0/10", "fd5e:5a1e:d::/64", "0.0.0.0/1", "127.0.0.0/8", "::ffff:10.0.0.0/104"} {
		req := r.mapRequest()
		req.Hostinfo = &netmap.Hostinfo{RoutableIPs: prefixes(bad)}
		err := r.c.Update(context.Background(), req)
		wantErr(t, err, controlclient.ErrBadRequest)
	}
	if n := ts.hub.get(r.id); !slices.Equal(n.AdvertisedRoutes, prefixes("10.1.0.0/24")) {
		t.Fatalf("advertised routes after refused updates: %v", n.AdvertisedRoutes)
	}
}

// TestNodeCannotApproveItsOwnRoutes: the machine key opens no admin
// endpoint; only the admin token approves.
func TestNodeCannotApproveItsOwnRoutes(t *testing.T) {
	ts := startServer(t, ServerOptions{clock: newClock()}) // silent-router checks never fire
	key := ts.key(t, AuthKeyOptions{Reusable: true, Tags: []string{"tag:x"}, Preauthorized: true})
	r, _ := routedNode(t, ts, key, "r", "10.1.0.0/24")
	waitFor(t, "advertised", func() bool { n := ts.hub.get(r.id); return n != nil && len(n.AdvertisedRoutes) == 1 })
	body, _ := json.Marshal(routeRequest{Route: "10.1.0.0/24"})
	hc := machineHTTP(t, ts.Fingerprint(), r.mk)
	err := doRaw(context.Background(), hc, ts.url, "/admin/v1/nodes/"+strconv.FormatUint(uint64(r.id), 10)+"/routes/approve", body)
	wantErr(t, err, controlclient.ErrUnauthorized)
	if n := ts.hub.get(r.id); len(n.ApprovedRoutes) != 0 || len(n.PrimaryRoutes) != 0 {
		t.Fatalf("route approved by the node itself: %+v", n)
	}
}

// TestAutoApprovers: a policy's autoApprovers approve the routes and exit
// routes of the nodes they name, a node they do not name stays pending,
// and a new policy without them withdraws what they approved.
func TestAutoApprovers(t *testing.T) {
	ts := startServer(t, ServerOptions{clock: newClock()}) // silent-router checks never fire
	ctx := context.Background()
	const pol = `{
		"tagOwners": {"tag:router": [], "tag:exit": [], "tag:x": []},
		"grants": [{"src": ["*"], "dst": ["*"], "ip": ["*"]}],
		"autoApprovers": {"routes": {"10.0.0.0/8": ["tag:router"]}, "exitNode": ["tag:exit"]},
	}`
	if _, err := ts.ApplyPolicy(ctx, "p.hujson", []byte(pol)); err != nil {
		t.Fatal(err)
	}
	rk := ts.key(t, AuthKeyOptions{Tags: []string{"tag:router"}, Preauthorized: true})
	ek := ts.key(t, AuthKeyOptions{Tags: []string{"tag:exit"}, Preauthorized: true})
	xk := ts.key(t, AuthKeyOptions{Tags: []string{"tag:x"}, Preauthorized: true})
	r, _ := routedNode(t, ts, rk, "r", "10.1.0.0/24", "192.168.5.0/24")
	ex, _ := routedNode(t, ts, ek, "ex", "0.0.0.0/0", "::/0")
	x, _ := routedNode(t, ts, xk, "x", "10.9.0.0/24")
	waitFor(t, "approvals", func() bool {
		a, b, c := ts.hub.get(r.id), ts.hub.get(ex.id), ts.hub.get(x.id)
		return a != nil && b != nil && c != nil && len(c.AdvertisedRoutes) == 1 &&
			slices.Equal(a.ApprovedRoutes, prefixes("10.1.0.0/24")) && slices.Equal(b.ApprovedRoutes, prefixes("0.0.0.0/0", "::/0"))
	})
	if n := ts.hub.get(x.id); len(n.ApprovedRoutes) != 0 {
		t.Fatalf("a node autoApprovers do not name got %v", n.ApprovedRoutes)
	}
	// An auto-approved route cannot be rejected by the admin API.
	if err := ts.RejectRoute(ctx, r.id, netip.MustParsePrefix("10.1.0.0/24")); err == nil {
		t.Error("rejecting an auto-approved route: no error")
	}
	const without = `{
		"tagOwners": {"tag:router": [], "tag:exit": [], "tag:x": []},
		"grants": [{"src": ["*"], "dst": ["*"], "ip": ["*"]}],
	}`
	if _, err := ts.ApplyPolicy(ctx, "p.hujson", []byte(without)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "auto approvals withdrawn", func() bool {
		a, b := ts.hub.get(r.id), ts.hub.get(ex.id)
		return len(a.ApprovedRoutes) == 0 && len(a.PrimaryRoutes) == 0 && len(b.ApprovedRoutes) == 0 && len(a.AllowedIPs) == 2
	})
}

// TestPromotedRouterLearnsItsClients: under a policy, a standby router is
// no peer of the subnet's clients (nothing lets them reach it); once
// promoted, it gets a map with them, so their later patches apply.
func TestPromotedRouterLearnsItsClients(t *testing.T) {
	ts := startServer(t, ServerOptions{clock: newClock()}) // silent-router checks never fire
	ctx := context.Background()
	const pol = `{
		"tagOwners": {"tag:router": [], "tag:client": []},
		"grants": [{"src": ["tag:client"], "dst": ["10.1.0.0/24"], "ip": ["*"]}],
		"autoApprovers": {"routes": {"10.1.0.0/24": ["tag:router"]}},
	}`
	if _, err := ts.ApplyPolicy(ctx, "p.hujson", []byte(pol)); err != nil {
		t.Fatal(err)
	}
	rk := ts.key(t, AuthKeyOptions{Reusable: true, Tags: []string{"tag:router"}, Preauthorized: true})
	ck := ts.key(t, AuthKeyOptions{Tags: []string{"tag:client"}, Preauthorized: true})
	r1, stop1 := routedNode(t, ts, rk, "r1", "10.1.0.0/24")
	// The routes come with the stream, which opens in the background: r1
	// must be primary before r2 advertises, or r2 may be first and, the
	// primary being sticky, stay primary (one CI run).
	r1.waitMap(t, "r1 primary", func(nm *netmap.NetworkMap) bool { return len(nm.Self.PrimaryRoutes) == 1 })
	r2, _ := routedNode(t, ts, rk, "r2", "10.1.0.0/24")
	cl, _ := routedNode(t, ts, ck, "client")
	r1.waitMap(t, "r1 sees the client", func(nm *netmap.NetworkMap) bool { return nm.Peers[cl.id] != nil })
	if nm := r2.waitMap(t, "r2's map", func(nm *netmap.NetworkMap) bool { return len(nm.Self.ApprovedRoutes) == 1 }); nm.Peers[cl.id] != nil {
		t.Fatal("standby router sees the client")
	}
	stop1()
	r2.waitMap(t, "promoted r2 sees the client", func(nm *netmap.NetworkMap) bool {
		return nm.Peers[cl.id] != nil && len(nm.Self.PrimaryRoutes) == 1 && len(nm.PacketFilter) > 0
	})
	// A patch of the client (new endpoints) reaches r2 and applies.
	req := cl.mapRequest()
	req.Endpoints = []netip.AddrPort{netip.MustParseAddrPort("198.18.0.9:41641")}
	if err := cl.c.Update(ctx, req); err != nil {
		t.Fatal(err)
	}
	r2.waitMap(t, "client's endpoint patch", func(nm *netmap.NetworkMap) bool {
		p := nm.Peers[cl.id]
		return p != nil && slices.Contains(p.Endpoints, req.Endpoints[0])
	})
}

// TestSilentPrimaryRouterReplaced: a primary router that stops reporting
// for RouterSilence loses its stream, and the standby takes its subnet;
// the coordinator's clock is a test clock.
func TestSilentPrimaryRouterReplaced(t *testing.T) {
	clk := newClock()
	ts := startServer(t, ServerOptions{clock: clk})
	key := ts.key(t, AuthKeyOptions{Reusable: true, Tags: []string{"tag:x"}, Preauthorized: true})
	subnet := netip.MustParsePrefix("10.1.0.0/24")
	r1, _ := routedNode(t, ts, key, "r1", "10.1.0.0/24")
	r2, _ := routedNode(t, ts, key, "r2", "10.1.0.0/24")
	cl, _ := routedNode(t, ts, key, "client")
	ctx := context.Background()
	// A router's routes arrive with its map request, after its join: wait
	// for them, not just for the routers.
	cl.waitMap(t, "both routers advertising", func(nm *netmap.NetworkMap) bool {
		a, b := peerOf(nm, r1.id), peerOf(nm, r2.id)
		return a != nil && b != nil && slices.Contains(a.AdvertisedRoutes, subnet) && slices.Contains(b.AdvertisedRoutes, subnet)
	})
	for _, r := range []*testNode{r1, r2} {
		if err := ts.ApproveRoute(ctx, r.id, subnet); err != nil {
			t.Fatal(err)
		}
	}
	cl.waitMap(t, "r1 primary", func(nm *netmap.NetworkMap) bool { return slices.Contains(nm.Peers[r1.id].PrimaryRoutes, subnet) })
	// The router's silence is counted from the first check; less than
	// RouterSilence of it changes nothing.
	clk.Advance(time.Second)
	ts.hub.silentRouters(ts.now())
	clk.Advance(RouterSilence - time.Second)
	if ids := ts.hub.silentRouters(ts.now()); len(ids) != 0 {
		t.Fatalf("routers %v dropped before RouterSilence", ids)
	}
	for range 3 {
		clk.Advance(time.Second)
	}
	cl.waitMap(t, "r2 took over from the silent r1", func(nm *netmap.NetworkMap) bool {
		return slices.Contains(nm.Peers[r2.id].PrimaryRoutes, subnet) && !slices.Contains(nm.Peers[r1.id].PrimaryRoutes, subnet)
	})
}
