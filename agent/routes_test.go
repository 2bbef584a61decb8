package agent

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/netmap"
)

func TestPlanRouting(t *testing.T) {
	routes := func(ss ...string) *[]netip.Prefix { p := pfx(ss...); return &p }
	yes, no := true, false
	str := func(s string) *string { return &s }
	router := localapi.RoutePrefs{AdvertiseRoutes: pfx("10.1.0.0/24")}
	for _, tc := range []struct {
		name      string
		cur       localapi.RoutePrefs
		flags     *localapi.RouteFlags
		userspace bool
		want      localapi.RoutePrefs
		changed   bool
		err       string
	}{
		{name: "no flags", cur: router, want: router},
		{name: "advertise", flags: &localapi.RouteFlags{AdvertiseRoutes: routes("10.1.0.0/24")}, want: router, changed: true},
		{name: "withdraw", cur: router, flags: &localapi.RouteFlags{AdvertiseRoutes: routes()}, changed: true},
		{name: "same again", cur: router, flags: &localapi.RouteFlags{AdvertiseRoutes: routes("10.1.0.0/24")}, err: "change nothing"},
		{name: "same from env", cur: router, flags: &localapi.RouteFlags{AdvertiseRoutes: routes("10.1.0.0/24"), FromEnv: true}, want: router},
		{name: "host bits", flags: &localapi.RouteFlags{AdvertiseRoutes: routes("10.1.0.1/24")}, err: "host bits"},
		{name: "tailnet range", flags: &localapi.RouteFlags{AdvertiseRoutes: routes("100.64.0.0/10")}, err: "tailnet"},
		{name: "default as a subnet", flags: &localapi.RouteFlags{AdvertiseRoutes: routes("0.0.0.0/0")}, err: "--advertise-exit-node"},
		{name: "netstack router", flags: &localapi.RouteFlags{AdvertiseRoutes: routes("10.1.0.0/24")}, userspace: true, err: "netstack"},
		{name: "netstack accepts", flags: &localapi.RouteFlags{AcceptRoutes: &yes}, userspace: true, want: localapi.RoutePrefs{AcceptRoutes: true}, changed: true},
		{name: "netstack exit node", flags: &localapi.RouteFlags{ExitNode: str("exit")}, userspace: true, err: "kernel TUN"},
		{name: "lan access alone", flags: &localapi.RouteFlags{ExitNodeAllowLANAccess: &yes}, err: "only with --exit-node"},
		{name: "exit and offer", flags: &localapi.RouteFlags{ExitNode: str("exit"), AdvertiseExitNode: &yes}, err: "cannot use an exit node and offer"},
		{name: "snat off", cur: router, flags: &localapi.RouteFlags{SNATSubnetRoutes: &no}, want: localapi.RoutePrefs{AdvertiseRoutes: pfx("10.1.0.0/24"), NoSNAT: true}, changed: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, changed, err := planRouting(tc.cur, tc.flags, tc.userspace)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil || changed != tc.changed || !equalPrefs(got, tc.want) {
				t.Fatalf("= %+v, %v, %v; want %+v, %v", got, changed, err, tc.want, tc.changed)
			}
		})
	}
}

// TestRoutedMap: a peer's subnet routes are used only with --accept-routes,
// exit routes only of the --exit-node, and a route into the tailnet's
// ranges never (a hostile coordinator must not redirect tailnet
// addresses); the map itself is left alone.
func TestRoutedMap(t *testing.T) {
	r := testNode(2, "100.64.0.2")
	r.Hostname = "router"
	r.AllowedIPs = append(slices.Clone(r.Addresses), pfx("10.1.0.0/24", "100.64.0.0/24", "0.0.0.0/0")...)
	r.PrimaryRoutes = pfx("0.0.0.0/0", "10.1.0.0/24", "100.64.0.0/24")
	plain := testNode(3, "100.64.0.3")
	nm := &netmap.NetworkMap{Self: testNode(1, "100.64.0.1"), Peers: map[netmap.NodeID]*netmap.Node{2: &r, 3: &plain}}
	for _, tc := range []struct {
		name  string
		prefs localapi.RoutePrefs
		want  []netip.Prefix
	}{
		{"nothing accepted", localapi.RoutePrefs{}, r.Addresses},
		{"accept routes", localapi.RoutePrefs{AcceptRoutes: true}, append(slices.Clone(r.Addresses), pfx("10.1.0.0/24")...)},
		{"exit node by name", localapi.RoutePrefs{ExitNode: "router"}, append(slices.Clone(r.Addresses), pfx("0.0.0.0/0")...)},
		{"exit node by IP", localapi.RoutePrefs{ExitNode: "100.64.0.2"}, append(slices.Clone(r.Addresses), pfx("0.0.0.0/0")...)},
		{"another exit node", localapi.RoutePrefs{ExitNode: "100.64.0.3"}, r.Addresses},
	} {
		got := routedMap(nm, tc.prefs)
		if !slices.Equal(got.Peers[2].AllowedIPs, tc.want) {
			t.Errorf("%s: router AllowedIPs %v, want %v", tc.name, got.Peers[2].AllowedIPs, tc.want)
		}
		if got.Peers[3] != &plain {
			t.Errorf("%s: a peer without routes was copied", tc.name)
		}
	}
	if len(r.AllowedIPs) != len(r.Addresses)+3 {
		t.Fatalf("the map's node was modified: %v", r.AllowedIPs)
	}
}

func TestTableRoutes(t *testing.T) {
	self := pfx("100.64.0.1/32")
	nm := &netmap.NetworkMap{Peers: map[netmap.NodeID]*netmap.Node{}}
	locals := func() ([]netip.Prefix, error) {
		return pfx("198.19.99.5/24", "127.0.0.1/8", "100.64.0.1/32", "fe80::1/64"), nil
	}
	// An exit node that is not in the map still gets the default routes:
	// traffic fails closed in WireGuard rather than leaking to the LAN.
	routes, throws := tableRoutes(self, nm, localapi.RoutePrefs{ExitNode: "gone"}, locals)
	if !slices.Equal(routes, pfx("0.0.0.0/0", "::/0")) || throws != nil {
		t.Fatalf("routes %v throws %v", routes, throws)
	}
	_, throws = tableRoutes(self, nm, localapi.RoutePrefs{ExitNode: "gone", ExitNodeAllowLANAccess: true}, locals)
	if !slices.Equal(throws, pfx("198.19.99.0/24")) {
		t.Fatalf("throws %v", throws)
	}
	if routes, _ := tableRoutes(self, nm, localapi.RoutePrefs{}, locals); len(routes) != 0 {
		t.Fatalf("routes without an exit node: %v", routes)
	}
}
