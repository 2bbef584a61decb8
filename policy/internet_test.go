package policy

import (
	"net/netip"
	"slices"
	"testing"

	"meshd.dev/meshd/netmap"
)

// withRoutes is n routing ps as well (as control gives a router its
// primary routes in AllowedIPs).
func withRoutes(n *netmap.Node, ps ...string) *netmap.Node {
	for _, p := range ps {
		n.AllowedIPs = append(n.AllowedIPs, netip.MustParsePrefix(p))
	}
	return n
}

func TestInternetSet(t *testing.T) {
	for _, tc := range []struct {
		addr string
		want bool
	}{
		{"8.8.8.8", true},
		{"198.19.88.10", true},
		{"1.0.0.0", true},
		{"255.255.255.255", true},
		{"10.1.2.3", false},
		{"172.16.0.1", false},
		{"172.31.255.255", false},
		{"172.32.0.1", true},
		{"192.168.1.1", false},
		{"100.64.0.1", false},
		{"100.127.255.255", false},
		{"100.128.0.1", true},
		{"169.254.1.1", false},
		{"2001:db8::1", true},
		{"2606:4700::1111", true},
		{"fd00:1::1", false},
		{"fd5e:5a1e:d::1", false},
		{"fe80::1", false},
		{"::ffff:8.8.8.8", true},
		{"::ffff:10.0.0.1", false},
	} {
		if got := inInternet(netip.MustParseAddr(tc.addr)); got != tc.want {
			t.Errorf("inInternet(%s) = %v, want %v", tc.addr, got, tc.want)
		}
	}
	// The set is exactly everything but what it leaves out: no gap, no overlap.
	for _, set := range [][]netip.Prefix{internetV4, internetV6} {
		for i := 1; i < len(set); i++ {
			if set[i-1].Overlaps(set[i]) {
				t.Errorf("%v overlaps %v", set[i-1], set[i])
			}
		}
	}
	if len(internetV4) > 64 || len(internetV6) != 1 {
		t.Errorf("internet set is %d+%d prefixes, want it minimal", len(internetV4), len(internetV6))
	}
}

// TestInternetAndVia: autogroup:internet compiles into exit nodes' filters
// (the internet, not their private LANs), "*" no longer includes exit
// routes, and a "via" grant is allowed only on the routers it names.
func TestInternetAndVia(t *testing.T) {
	src := `{
	"tagOwners": {"tag:exit": [], "tag:exit-eu": [], "tag:router": [], "tag:router-eu": [], "tag:web": [], "tag:eu": [], "tag:eve": []},
	"grants": [
		{"src": ["tag:web"], "dst": ["autogroup:internet"], "ip": ["tcp:443"]},
		{"src": ["tag:eve"], "dst": ["*"], "ip": ["*"]},
		{"src": ["tag:web"], "dst": ["192.168.7.0/24"], "ip": ["*"]},
		{"src": ["tag:eu"], "dst": ["autogroup:internet"], "ip": ["*"], "via": ["tag:exit-eu"]},
		{"src": ["tag:eu"], "dst": ["10.1.0.0/24"], "ip": ["tcp:22"], "via": ["tag:router-eu"]},
	],
}`
	e := NewEngine(mustParse(t, src))
	exit := withRoutes(testNode(1, "", "tag:exit"), "0.0.0.0/0", "::/0")
	exitEU := withRoutes(testNode(2, "", "tag:exit-eu"), "0.0.0.0/0", "::/0")
	router := withRoutes(testNode(3, "", "tag:router"), "10.1.0.0/24")
	routerEU := withRoutes(testNode(4, "", "tag:router-eu"), "10.1.0.0/24")
	web := testNode(5, "", "tag:web")
	eu := testNode(6, "", "tag:eu")
	eve := testNode(7, "", "tag:eve")
	plain := testNode(8, "", "tag:router") // a router routing nothing now
	all := []*netmap.Node{exit, exitEU, router, routerEU, web, eu, eve, plain}
	e.SetNodes(all)

	allows := func(from, at *netmap.Node, dst string, port uint16) bool {
		_, ok := ruleAllows(e.FilterFor(at, nil), from.Addresses[0].Addr(), netip.MustParseAddr(dst), netmap.ProtoTCP, port)
		if a := netip.MustParseAddr(dst); a.Is6() {
			_, ok = ruleAllows(e.FilterFor(at, nil), from.Addresses[1].Addr(), a, netmap.ProtoTCP, port)
		}
		return ok
	}
	for _, tc := range []struct {
		name     string
		from, at *netmap.Node
		dst      string
		port     uint16
		want     bool
	}{
		{"internet through the exit node", web, exit, "8.8.8.8", 443, true},
		{"internet over IPv6", web, exit, "2606:4700::1111", 443, true},
		{"internet, port outside the grant", web, exit, "8.8.8.8", 80, false},
		{"the exit node's private LAN is not the internet", web, exit, "172.16.5.5", 443, false},
		{"a private LAN granted by CIDR", web, exit, "192.168.7.9", 443, true},
		{"the tailnet is not the internet", web, exit, "100.64.0.8", 443, false},
		{"* is not the internet", eve, exit, "8.8.8.8", 443, false},
		{"* still reaches the exit node itself", eve, exit, exit.Addresses[0].Addr().String(), 22, true},
		{"* still includes subnet routes", eve, router, "10.1.0.9", 22, true},
		{"no internet on a subnet router", web, router, "8.8.8.8", 443, false},
		{"via: internet through the named exit node", eu, exitEU, "8.8.8.8", 80, true},
		{"via: not through another exit node", eu, exit, "8.8.8.8", 80, false},
		{"via: the subnet through the named router", eu, routerEU, "10.1.0.9", 22, true},
		{"via: not through another router of the subnet", eu, router, "10.1.0.9", 22, false},
		{"via never widens: other ports", eu, routerEU, "10.1.0.9", 80, false},
		{"via never widens: other sources", web, routerEU, "10.1.0.9", 22, false},
		{"via never widens: the router itself", eu, routerEU, routerEU.Addresses[0].Addr().String(), 22, false},
	} {
		if got := allows(tc.from, tc.at, tc.dst, tc.port); got != tc.want {
			t.Errorf("%s: %s -> %s:%d at %s = %v, want %v", tc.name, tc.from.Hostname, tc.dst, tc.port, tc.at.Hostname, got, tc.want)
		}
	}

	// Who sees whom: the sources see the exit nodes and routers that
	// forward for them, and not the others (and eve, whose "*" reaches
	// every node).
	peers := func(n *netmap.Node) []netmap.NodeID { return e.Peers(n) }
	for _, tc := range []struct {
		n    *netmap.Node
		want []netmap.NodeID
	}{
		{web, []netmap.NodeID{exit.ID, exitEU.ID, eve.ID}},
		{eu, []netmap.NodeID{exitEU.ID, routerEU.ID, eve.ID}},
		{eve, []netmap.NodeID{exit.ID, exitEU.ID, router.ID, routerEU.ID, web.ID, eu.ID, plain.ID}},
	} {
		got := slices.DeleteFunc(peers(tc.n), func(id netmap.NodeID) bool { return id == tc.n.ID })
		if !slices.Equal(got, tc.want) {
			t.Errorf("Peers(%s) = %v, want %v", tc.n.Hostname, got, tc.want)
		}
		for _, m := range all {
			if m == tc.n {
				continue
			}
			if want := slices.Contains(tc.want, m.ID) || slices.Contains(peers(m), tc.n.ID); e.CanSee(tc.n, m) != want {
				t.Errorf("CanSee(%s, %s) = %v, want %v", tc.n.Hostname, m.Hostname, !want, want)
			}
		}
	}
	// An exit node whose exit routes are withdrawn forwards nothing.
	exitOff := testNode(1, "", "tag:exit")
	e.UpsertNode(exitOff)
	if got := allows(web, exitOff, "8.8.8.8", 443); got {
		t.Error("internet still allowed on an exit node without exit routes")
	}
}

func TestUsesExit(t *testing.T) {
	e := NewEngine(mustParse(t, `{
	"tagOwners": {"tag:exit": [], "tag:exit-eu": [], "tag:web": [], "tag:eu": [], "tag:eve": [], "tag:lan": [], "tag:peer": []},
	"grants": [
		{"src": ["tag:web"], "dst": ["autogroup:internet"], "ip": ["tcp:443"]},
		{"src": ["tag:eve"], "dst": ["*"], "ip": ["*"]},
		{"src": ["tag:lan"], "dst": ["192.168.7.0/24"], "ip": ["*"]},
		{"src": ["tag:peer"], "dst": ["100.64.0.1"], "ip": ["*"]},
		{"src": ["tag:eu"], "dst": ["autogroup:internet"], "ip": ["*"], "via": ["tag:exit-eu"]},
	],
}`))
	exit := withRoutes(testNode(1, "", "tag:exit"), "0.0.0.0/0", "::/0")
	exitEU := withRoutes(testNode(2, "", "tag:exit-eu"), "0.0.0.0/0", "::/0")
	notExit := testNode(3, "", "tag:exit")
	lanRouter := withRoutes(testNode(9, "", "tag:exit"), "192.168.7.0/24", "0.0.0.0/0")
	for _, tc := range []struct {
		name       string
		viewer     *netmap.Node
		exit       *netmap.Node
		want       bool
		wantSubnet bool // UsesExit of lanRouter
	}{
		{"autogroup:internet", testNode(5, "", "tag:web"), exit, true, true},
		{"autogroup:internet, not an exit node", testNode(5, "", "tag:web"), notExit, false, true},
		{"* is not exit node use", testNode(7, "", "tag:eve"), exit, false, false},
		{"a CIDR outside the tailnet, through the exit node", testNode(6, "", "tag:lan"), exit, true, false},
		{"a tailnet address is not exit node use", testNode(8, "", "tag:peer"), exit, false, false},
		{"via: the named exit node", testNode(10, "", "tag:eu"), exitEU, true, false},
		{"via: not another", testNode(10, "", "tag:eu"), exit, false, false},
	} {
		if got := e.UsesExit(tc.viewer, tc.exit); got != tc.want {
			t.Errorf("%s: UsesExit = %v, want %v", tc.name, got, tc.want)
		}
		// lanRouter routes 192.168.7.0/24 as a subnet router: a grant of
		// that CIDR needs no exit routes.
		if got := e.UsesExit(tc.viewer, lanRouter); got != tc.wantSubnet {
			t.Errorf("%s: UsesExit(lan router) = %v, want %v", tc.name, got, tc.wantSubnet)
		}
	}
}

// TestDiffInternetAndVia: granting exit node use next to "*" opens a flow
// ("*" is not autogroup:internet), and dropping a grant's "via" widens it
// (every router may then forward it), which the diff shows as opened.
func TestDiffInternetAndVia(t *testing.T) {
	const hdr = `{"tagOwners": {"tag:web": [], "tag:router-eu": [], "tag:router-us": []}, "grants": [`
	star := hdr + `{"src": ["tag:web"], "dst": ["*"], "ip": ["*"]},`
	via := `{"src": ["tag:web"], "dst": ["10.2.0.0/24"], "ip": ["tcp:22"], "via": ["tag:router-eu"]}`
	for _, tc := range []struct {
		name           string
		old, new       string
		opened, closed bool
	}{
		{"internet granted", star + `]}`, star + `{"src": ["tag:web"], "dst": ["autogroup:internet"], "ip": ["*"]}]}`, true, false},
		{"via dropped", hdr + via + `]}`, hdr + `{"src": ["tag:web"], "dst": ["10.2.0.0/24"], "ip": ["tcp:22"]}]}`, true, false},
		{"via narrowed", hdr + `{"src": ["tag:web"], "dst": ["10.2.0.0/24"], "ip": ["tcp:22"], "via": ["tag:router-eu", "tag:router-us"]}]}`, hdr + via + `]}`, false, true},
		{"via unchanged", hdr + via + `]}`, hdr + via + `]}`, false, false},
	} {
		d := Diff(mustParse(t, tc.old), mustParse(t, tc.new))
		if (len(d.Opened) > 0) != tc.opened || (len(d.Closed) > 0) != tc.closed {
			t.Errorf("%s: opened %v, closed %v; want opened=%v closed=%v", tc.name, d.Opened, d.Closed, tc.opened, tc.closed)
		}
	}
}
