package agent

import (
	"net/netip"
	"strings"
	"testing"

	"meshd.dev/meshd/netmap"
)

func TestChooseMTU(t *testing.T) {
	eth := func(name string, mtu int) underlayLink {
		return underlayLink{name: name, mtu: mtu, up: true, hasGlobal: true}
	}
	lo := underlayLink{name: "lo", mtu: 65536, up: true, loopback: true, hasGlobal: true}
	// A GPU server: jumbo data fabric, 1500-byte management NIC, docker0
	// and another WireGuard tunnel.
	gpu := []underlayLink{
		lo, eth("mgmt0", 1500), eth("fabric0", 9000), eth("docker0", 1500),
		{name: "wg0", mtu: 1420, up: true, hasGlobal: true, tunnel: true},
	}
	routes := map[string]string{
		"10.9.0.5":   "fabric0", // peers on the fabric
		"10.9.1.7":   "fabric0",
		"192.0.2.10": "mgmt0", // the coordinator, and a peer, behind the management NIC
		"192.0.2.11": "mgmt0",
		"10.99.0.1":  "wg0", // a peer reached through the other tunnel
	}
	route := func(dst netip.Addr) (string, bool) {
		name, ok := routes[dst.String()]
		return name, ok
	}
	addrs := func(s ...string) []netip.Addr {
		var out []netip.Addr
		for _, a := range s {
			out = append(out, netip.MustParseAddr(a))
		}
		return out
	}
	tests := []struct {
		name   string
		links  []underlayLink
		route  routeFunc
		dsts   []netip.Addr
		want   int
		from   string
		reason string
	}{
		{"fabric peers get jumbo", gpu, route, addrs("192.0.2.10", "10.9.0.5", "192.0.2.11"), 8920, "fabric0", "fabric0, mgmt0"},
		{"management only", gpu, route, addrs("192.0.2.10", "192.0.2.11"), 1420, "mgmt0", "(mgmt0)"},
		{"through another tunnel", gpu, route, addrs("10.99.0.1"), 1340, "wg0", "(wg0)"},
		{"tunnel does not lower the fabric", gpu, route, addrs("10.99.0.1", "10.9.1.7"), 8920, "fabric0", "fabric0, wg0"},
		{"unrouted destinations fall back", gpu, route, addrs("198.51.100.1"), 1420, "mgmt0", "no route"},
		{"no destinations: smallest non-tunnel", gpu, route, nil, 1420, "mgmt0", "no route"},
		{"no route lookups", gpu, nil, addrs("10.9.0.5"), 1420, "mgmt0", "no route"},
		{"own tunnel ignored", []underlayLink{eth("meshd0", 1280), eth("ens1", 9000)}, nil, nil, 8920, "ens1", "no route"},
		{"down ignored", []underlayLink{{name: "eth1", mtu: 1400, hasGlobal: true}, eth("eth0", 1500)}, nil, nil, 1420, "eth0", "no route"},
		{"no address ignored in the fallback", []underlayLink{{name: "eth1", mtu: 1400, up: true}, eth("eth0", 1500)}, nil, nil, 1420, "eth0", "no route"},
		{"tiny link floors at 1280", []underlayLink{eth("wwan0", 1300)}, nil, nil, 1280, "wwan0", "no route"},
		{"nothing known", []underlayLink{lo}, nil, nil, 1280, "", "IPv6 minimum"},
		{"no links", nil, nil, nil, 1280, "", "IPv6 minimum"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := chooseMTU(tt.links, "meshd0", tt.route, tt.dsts)
			if c.mtu != tt.want || c.iface != tt.from || !strings.Contains(c.reason, tt.reason) {
				t.Fatalf("chooseMTU = %d from %q (%s), want %d from %q (%q)", c.mtu, c.iface, c.reason, tt.want, tt.from, tt.reason)
			}
		})
	}
}

func TestChooseMTULookupsBounded(t *testing.T) {
	links := []underlayLink{
		{name: "mgmt0", mtu: 1500, up: true, hasGlobal: true},
		{name: "fabric0", mtu: 9000, up: true, hasGlobal: true},
	}
	var dsts []netip.Addr
	for i := range 5000 {
		// Two endpoints per /24: one lookup per subnet.
		dsts = append(dsts, netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), 1}), netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), 2}))
	}
	lookups := 0
	all := func(netip.Addr) (string, bool) { lookups++; return "mgmt0", true }
	if c := chooseMTU(links, "meshd0", all, dsts); c.mtu != 1420 || lookups != maxRouteLookups {
		t.Fatalf("every peer behind mgmt0: mtu %d after %d lookups, want 1420 after %d", c.mtu, lookups, maxRouteLookups)
	}
	// The largest interface found ends the search.
	lookups = 0
	fabric := func(netip.Addr) (string, bool) { lookups++; return "fabric0", true }
	if c := chooseMTU(links, "meshd0", fabric, dsts); c.mtu != 8920 || lookups != 1 {
		t.Fatalf("fabric: mtu %d after %d lookups, want 8920 after 1", c.mtu, lookups)
	}
}

func TestMTUDests(t *testing.T) {
	nm := &netmap.NetworkMap{
		DERPMap: netmap.DERPMap{Regions: []netmap.DERPRegion{{ID: 1, Nodes: []netmap.DERPNode{{Host: "203.0.113.5"}, {Host: "derp.example.com"}}}}},
		Peers: map[netmap.NodeID]*netmap.Node{
			1: {Endpoints: []netip.AddrPort{netip.MustParseAddrPort("10.9.0.5:41641"), netip.MustParseAddrPort("[2001:db8::5]:41641")}},
			2: {},
		},
	}
	got := mtuDests(nm, "https://192.0.2.10:8443")
	want := []string{"192.0.2.10", "203.0.113.5", "10.9.0.5", "2001:db8::5"}
	if len(got) != len(want) {
		t.Fatalf("mtuDests = %v, want %v", got, want)
	}
	for i := range want {
		if got[i].String() != want[i] {
			t.Fatalf("mtuDests = %v, want %v", got, want)
		}
	}
	if got := mtuDests(nil, "https://coord.example.com"); len(got) != 0 {
		t.Fatalf("a coordinator named by DNS gave %v: names are not resolved under the agent's lock", got)
	}
}
