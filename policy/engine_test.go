package policy

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"testing"

	"meshd.dev/meshd/netmap"
)

// fleet is a small tailnet covering every identity kind.
type fleet struct {
	a1, a2, b1, srv, other, aliceTagged, router *netmap.Node
	all                                         []*netmap.Node
}

func newFleet() fleet {
	f := fleet{
		a1:          testNode(1, "alice@example.com"),
		a2:          testNode(2, "Alice@Example.com"), // logins compare case-insensitively
		b1:          testNode(3, "bob@example.com"),
		srv:         testNode(4, "", "tag:srv"),
		other:       testNode(5, "", "tag:other"),
		aliceTagged: testNode(6, "alice@example.com", "tag:other"),
		router:      testNode(7, "", "tag:router"),
	}
	f.router.AllowedIPs = append(f.router.AllowedIPs, netip.MustParsePrefix("10.1.0.0/24"))
	f.all = []*netmap.Node{f.a1, f.a2, f.b1, f.srv, f.other, f.aliceTagged, f.router}
	return f
}

const fleetHeader = `{
	"groups": {"group:eng": ["alice@example.com"], "group:empty": []},
	"hosts": {"db": "100.64.0.4", "lan": "10.1.0.0/24"},
	"tagOwners": {"tag:srv": [], "tag:other": [], "tag:router": []},
`

func names(ns []*netmap.Node) []string {
	var out []string
	for _, n := range ns {
		out = append(out, n.Hostname)
	}
	return out
}

// TestSelectors checks every selector form, as a source and as a
// destination, against the compiled filters of real nodes.
func TestSelectors(t *testing.T) {
	f := newFleet()
	tests := []struct {
		sel     string
		asSrc   []*netmap.Node // who reaches tag:srv with src sel
		asDst   []*netmap.Node // whom alice's a1 reaches with dst sel (nil: not valid as dst)
		dstOnly bool
	}{
		{sel: "*", asSrc: f.all, asDst: f.all},
		{sel: "alice@example.com", asSrc: []*netmap.Node{f.a1, f.a2}, asDst: []*netmap.Node{f.a1, f.a2}},
		{sel: "ALICE@example.com", asSrc: []*netmap.Node{f.a1, f.a2}, asDst: []*netmap.Node{f.a1, f.a2}},
		{sel: "group:eng", asSrc: []*netmap.Node{f.a1, f.a2}, asDst: []*netmap.Node{f.a1, f.a2}},
		{sel: "Group:ENG", asSrc: []*netmap.Node{f.a1, f.a2}, asDst: []*netmap.Node{f.a1, f.a2}},
		{sel: "group:empty", asSrc: nil, asDst: nil},
		{sel: "tag:srv", asSrc: []*netmap.Node{f.srv}, asDst: []*netmap.Node{f.srv}},
		{sel: "TAG:Other", asSrc: []*netmap.Node{f.other, f.aliceTagged}, asDst: []*netmap.Node{f.other, f.aliceTagged}},
		{sel: "autogroup:member", asSrc: []*netmap.Node{f.a1, f.a2, f.b1}, asDst: []*netmap.Node{f.a1, f.a2, f.b1}},
		{sel: "autogroup:tagged", asSrc: []*netmap.Node{f.srv, f.other, f.aliceTagged, f.router}, asDst: []*netmap.Node{f.srv, f.other, f.aliceTagged, f.router}},
		{sel: "autogroup:self", dstOnly: true, asDst: []*netmap.Node{f.a1, f.a2}},
		{sel: "db", asSrc: []*netmap.Node{f.srv}, asDst: []*netmap.Node{f.srv}},
		{sel: "100.64.0.3", asSrc: []*netmap.Node{f.b1}, asDst: []*netmap.Node{f.b1}},
		{sel: "100.64.0.0/30", asSrc: []*netmap.Node{f.a1, f.a2, f.b1}, asDst: []*netmap.Node{f.a1, f.a2, f.b1}},
		// Subnet addresses are not any node's own: as sources they admit
		// traffic from the subnet (TestSubnetSource), not from a node.
		{sel: "10.1.0.7", asSrc: nil, asDst: []*netmap.Node{f.router}},
		{sel: "lan", asSrc: nil, asDst: []*netmap.Node{f.router}},
	}
	for _, tc := range tests {
		t.Run(tc.sel, func(t *testing.T) {
			if !tc.dstOnly {
				p := mustParse(t, fleetHeader+fmt.Sprintf(`"grants": [{"src": [%q], "dst": ["tag:srv"], "ip": ["*"]}]}`, tc.sel))
				e := NewEngine(p)
				e.SetNodes(f.all)
				var got []*netmap.Node
				for _, n := range f.all {
					if n != f.srv && reach4(t, e, n, f.srv, netmap.ProtoTCP, 80) {
						got = append(got, n)
					}
				}
				want := slices.DeleteFunc(slices.Clone(tc.asSrc), func(n *netmap.Node) bool { return n == f.srv })
				if !slices.Equal(names(got), names(want)) {
					t.Errorf("src %s: reach tag:srv = %v, want %v", tc.sel, names(got), names(want))
				}
			}
			p := mustParse(t, fleetHeader+fmt.Sprintf(`"grants": [{"src": ["alice@example.com"], "dst": [%q], "ip": ["443"]}]}`, tc.sel))
			e := NewEngine(p)
			e.SetNodes(f.all)
			var got []*netmap.Node
			for _, n := range f.all {
				if n == f.router && tc.sel != "*" && tc.sel != "autogroup:tagged" && tc.sel != "tag:router" {
					// The router is reached through its subnet, checked below.
					if rules := e.FilterFor(n, nil); len(rules) > 0 {
						got = append(got, n)
					}
					continue
				}
				if reach4(t, e, f.a1, n, netmap.ProtoTCP, 443) {
					got = append(got, n)
				}
			}
			if !slices.Equal(names(got), names(tc.asDst)) {
				t.Errorf("dst %s: alice reaches %v, want %v", tc.sel, names(got), names(tc.asDst))
			}
		})
	}
}

// TestSubnetDestination: a CIDR destination inside a router's subnet route
// compiles to that CIDR on the router only, and "*" covers routes too.
func TestSubnetDestination(t *testing.T) {
	f := newFleet()
	p := mustParse(t, fleetHeader+`"acls": [
		{"action": "accept", "src": ["group:eng"], "dst": ["10.1.0.128/25:5432"]},
		{"action": "accept", "src": ["bob@example.com"], "dst": ["*:22"]},
	]}`)
	e := NewEngine(p)
	e.SetNodes(f.all)
	rules := e.FilterFor(f.router, nil)
	if _, ok := ruleAllows(rules, f.a1.Addresses[0].Addr(), netip.MustParseAddr("10.1.0.200"), netmap.ProtoTCP, 5432); !ok {
		t.Errorf("alice cannot reach 10.1.0.200:5432 through the router: %+v", rules)
	}
	if _, ok := ruleAllows(rules, f.a1.Addresses[0].Addr(), netip.MustParseAddr("10.1.0.5"), netmap.ProtoTCP, 5432); ok {
		t.Errorf("alice reaches 10.1.0.5 outside 10.1.0.128/25")
	}
	if _, ok := ruleAllows(rules, f.b1.Addresses[0].Addr(), netip.MustParseAddr("10.1.0.5"), netmap.ProtoTCP, 22); !ok {
		t.Errorf("dst * does not cover the router's subnet route")
	}
	if r := e.FilterFor(f.srv, nil); len(r) != 1 || r[0].DstPorts[0].Net != f.srv.Addresses[0] {
		t.Errorf("srv rules = %+v, want only bob's * rule on its own address", r)
	}
}

// TestSubnetSource: a CIDR source admits packets from that subnet (relayed
// by its router), and makes the router and the destination see each other.
func TestSubnetSource(t *testing.T) {
	f := newFleet()
	e := NewEngineWith(mustParse(t, fleetHeader+`"grants": [{"src": ["lan"], "dst": ["tag:srv"], "ip": ["tcp:8443"]}]}`), f.all)
	rules := e.FilterFor(f.srv, nil)
	if _, ok := ruleAllows(rules, netip.MustParseAddr("10.1.0.7"), f.srv.Addresses[0].Addr(), netmap.ProtoTCP, 8443); !ok {
		t.Errorf("10.1.0.7 cannot reach srv: %+v", rules)
	}
	if _, ok := ruleAllows(rules, netip.MustParseAddr("10.2.0.7"), f.srv.Addresses[0].Addr(), netmap.ProtoTCP, 8443); ok {
		t.Error("10.2.0.7 outside lan reaches srv")
	}
	if !e.CanSee(f.router, f.srv) || !e.CanSee(f.srv, f.router) || e.CanSee(f.srv, f.a1) {
		t.Error("visibility: want router<->srv only")
	}
	if got := e.Peers(f.srv); !slices.Equal(got, []netmap.NodeID{f.router.ID}) {
		t.Errorf("Peers(srv) = %v, want the router", got)
	}
}

// TestGrantIPForms checks each "ip" form and the ACL "proto" field in the
// compiled rules.
func TestGrantIPForms(t *testing.T) {
	f := newFleet()
	tests := []struct {
		ip      string
		protos  []uint8
		ports   []netmap.PortRange
		aclForm string // the equivalent ACL dst ports and proto, if any
		aclProt string
	}{
		{ip: "*", protos: nil, ports: []netmap.PortRange{netmap.AllPorts}, aclForm: "*"},
		{ip: "22", protos: nil, ports: []netmap.PortRange{{First: 22, Last: 22}}, aclForm: "22"},
		{ip: "1000-2000", protos: nil, ports: []netmap.PortRange{{First: 1000, Last: 2000}}, aclForm: "1000-2000"},
		{ip: "tcp:443", protos: []uint8{6}, ports: []netmap.PortRange{{First: 443, Last: 443}}, aclForm: "443", aclProt: "tcp"},
		{ip: "udp:53,5353", protos: []uint8{17}, ports: []netmap.PortRange{{First: 53, Last: 53}, {First: 5353, Last: 5353}}, aclForm: "53,5353", aclProt: "udp"},
		{ip: "icmp:*", protos: []uint8{1, 58}, ports: []netmap.PortRange{netmap.AllPorts}, aclForm: "*", aclProt: "icmp"},
		{ip: "sctp:9899", protos: []uint8{132}, ports: []netmap.PortRange{{First: 9899, Last: 9899}}, aclForm: "9899", aclProt: "sctp"},
		{ip: "47:*", protos: []uint8{47}, ports: []netmap.PortRange{netmap.AllPorts}, aclForm: "*", aclProt: "gre"},
		{ip: "6:80-81,82", protos: []uint8{6}, ports: []netmap.PortRange{{First: 80, Last: 82}}, aclForm: "80-81,82", aclProt: "6"},
	}
	for _, tc := range tests {
		t.Run(tc.ip, func(t *testing.T) {
			check := func(p *Policy) {
				t.Helper()
				e := NewEngine(p)
				e.SetNodes(f.all)
				rules := e.FilterFor(f.srv, nil)
				if len(rules) != 1 {
					t.Fatalf("got %d rules, want 1: %+v", len(rules), rules)
				}
				r := rules[0]
				if !slices.Equal(r.IPProto, tc.protos) {
					t.Errorf("IPProto = %v, want %v", r.IPProto, tc.protos)
				}
				var want []netmap.NetPortRange
				for _, a := range f.srv.Addresses {
					for _, pr := range tc.ports {
						want = append(want, netmap.NetPortRange{Net: a, Ports: pr})
					}
				}
				if !reflect.DeepEqual(r.DstPorts, want) {
					t.Errorf("DstPorts = %v, want %v", r.DstPorts, want)
				}
				if !slices.Equal(r.SrcIPs, []netip.Prefix{f.a1.Addresses[0], f.a2.Addresses[0], f.a1.Addresses[1], f.a2.Addresses[1]}) {
					t.Errorf("SrcIPs = %v", r.SrcIPs)
				}
				if r.Origin != "test.hujson:5" {
					t.Errorf("Origin = %q, want test.hujson:5", r.Origin)
				}
			}
			check(mustParse(t, fleetHeader+fmt.Sprintf(`"grants": [{"src": ["group:eng"], "dst": ["tag:srv"], "ip": [%q]}]}`, tc.ip)))
			proto := ""
			if tc.aclProt != "" {
				proto = fmt.Sprintf(`, "proto": %q`, tc.aclProt)
			}
			check(mustParse(t, fleetHeader+fmt.Sprintf(`"acls": [{"action": "accept", "src": ["group:eng"], "dst": ["tag:srv:%s"]%s}]}`, tc.aclForm, proto)))
		})
	}
}

func TestParsePorts(t *testing.T) {
	good := map[string][]netmap.PortRange{
		"*":            {netmap.AllPorts},
		"22":           {{First: 22, Last: 22}},
		"22,80":        {{First: 22, Last: 22}, {First: 80, Last: 80}},
		"1000-2000":    {{First: 1000, Last: 2000}},
		"80,81-90,82":  {{First: 80, Last: 90}},
		"0-65535":      {netmap.AllPorts},
		"443, 8443":    {{First: 443, Last: 443}, {First: 8443, Last: 8443}},
		"9000-9000,10": {{First: 10, Last: 10}, {First: 9000, Last: 9000}},
	}
	for in, want := range good {
		got, err := parsePorts(in)
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("parsePorts(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "0x16", "70000", "20-10", "*,22", "22,", "-5", "ssh", "22-", "1-2-3"} {
		if got, err := parsePorts(in); err == nil {
			t.Errorf("parsePorts(%q) = %v, want an error", in, got)
		}
	}
}

func TestParseProto(t *testing.T) {
	good := map[string][]uint8{
		"":          nil,
		"tcp":       {6},
		"UDP":       {17},
		"icmp":      {1, 58},
		"ipv6-icmp": {58},
		"sctp":      {132},
		"gre":       {47},
		"esp":       {50},
		"ah":        {51},
		"igmp":      {2},
		"6":         {6},
		"255":       {255},
	}
	for in, want := range good {
		got, err := parseProto(in)
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("parseProto(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"foo", "256", "-1", "tcp/udp"} {
		if _, err := parseProto(in); err == nil {
			t.Errorf("parseProto(%q): want an error", in)
		}
	}
}

// TestDenyByDefault: a policy with rules that match nothing denies, and an
// empty policy denies everything and shows no peers.
func TestDenyByDefault(t *testing.T) {
	f := newFleet()
	for _, src := range []string{`{}`, fleetHeader + `"grants": [{"src": ["tag:other"], "dst": ["tag:router"], "ip": ["22"]}]}`} {
		e := NewEngine(mustParse(t, src))
		e.SetNodes(f.all)
		if r := e.FilterFor(f.srv, nil); r == nil || len(r) != 0 {
			t.Errorf("FilterFor(srv) = %#v, want an empty non-nil slice (deny all)", r)
		}
		if e.CanSee(f.a1, f.srv) || len(e.Peers(f.a1)) != 0 {
			t.Errorf("alice sees peers under %s", src)
		}
	}
}

// TestBootstrap: no policy at all means every node reaches every node.
func TestBootstrap(t *testing.T) {
	f := newFleet()
	p := Bootstrap()
	if !p.IsBootstrap() {
		t.Fatal("IsBootstrap = false")
	}
	e := NewEngine(p)
	e.SetNodes(f.all)
	for _, a := range f.all {
		for _, b := range f.all {
			if a != b && !reach(t, e, a, b, netmap.ProtoTCP, 12345) {
				t.Errorf("bootstrap: %s cannot reach %s", a.Hostname, b.Hostname)
			}
		}
		if got := len(e.Peers(a)); got != len(f.all)-1 {
			t.Errorf("bootstrap: %s sees %d peers, want %d", a.Hostname, got, len(f.all)-1)
		}
	}
	if r := e.FilterFor(f.a1, nil); r[0].Origin != BootstrapOrigin {
		t.Errorf("origin = %q", r[0].Origin)
	}
	if err := e.CheckTags("", nil, []string{"tag:anything"}); err != nil {
		t.Errorf("bootstrap CheckTags: %v", err)
	}
	if w := p.Lint(); len(w) == 0 {
		t.Error("bootstrap policy is not flagged as a wide rule")
	}
}

// TestCapGrants: "app" grants compile into CapGrants for the destination
// and PeerCaps for the control server to put on the peer entry.
func TestCapGrants(t *testing.T) {
	f := newFleet()
	p := mustParse(t, fleetHeader+`"grants": [
		{"src": ["group:eng"], "dst": ["tag:srv"], "app": {"meshd.dev/cap/kubernetes": [{"impersonate": {"groups": ["system:masters"]}}]}},
		{"src": ["autogroup:member"], "dst": ["tag:srv"], "app": {"meshd.dev/cap/kubernetes": [{"impersonate": {"groups": ["viewers"]}}], "meshd.dev/cap/ssh": [{}]}},
	]}`)
	e := NewEngine(p)
	e.SetNodes(f.all)
	got := e.PeerCaps(f.srv, f.a1)
	want := map[string][]string{
		"meshd.dev/cap/kubernetes": {`{"impersonate":{"groups":["system:masters"]}}`, `{"impersonate":{"groups":["viewers"]}}`},
		"meshd.dev/cap/ssh":        {`{}`},
	}
	if len(got) != len(want) {
		t.Fatalf("PeerCaps = %v", got)
	}
	for k, vs := range want {
		for i, v := range vs {
			if string(got[k][i]) != v {
				t.Errorf("PeerCaps[%s][%d] = %s, want %s", k, i, got[k][i], v)
			}
		}
	}
	if c := e.PeerCaps(f.srv, f.b1); len(c["meshd.dev/cap/kubernetes"]) != 1 {
		t.Errorf("bob's caps = %v, want only the viewers grant", c)
	}
	if c := e.PeerCaps(f.srv, f.aliceTagged); c != nil {
		t.Errorf("a tagged node got alice's caps: %v", c)
	}
	rules := e.FilterFor(f.srv, nil)
	if len(rules) != 2 || len(rules[0].CapGrants) != 1 || len(rules[0].DstPorts) != 0 {
		t.Fatalf("FilterFor = %+v, want two capability-only rules", rules)
	}
	if !slices.Equal(rules[0].CapGrants[0].Dsts, f.srv.Addresses) {
		t.Errorf("cap dsts = %v", rules[0].CapGrants[0].Dsts)
	}
	// A capability grant makes the peers visible to each other (the
	// destination must know who holds it) but opens no ports.
	if !e.CanSee(f.srv, f.b1) || reach(t, e, f.b1, f.srv, netmap.ProtoTCP, 443) {
		t.Error("cap grant: want visible and no ports open")
	}
}

// TestIncrementalMatchesFull drives an engine through random joins, leaves
// and re-tags, and after each step compares its answers with a freshly
// built engine: the incremental index must never be stale.
func TestIncrementalMatchesFull(t *testing.T) {
	p := mustParse(t, `{
		"groups": {"group:a": ["u0@x.com", "u1@x.com"], "group:b": ["u2@x.com"]},
		"hosts": {"net": "100.64.0.0/28"},
		"tagOwners": {"tag:t0": [], "tag:t1": [], "tag:t2": []},
		"grants": [
			{"src": ["group:a"], "dst": ["tag:t0"], "ip": ["*"]},
			{"src": ["tag:t0"], "dst": ["tag:t1", "u2@x.com"], "ip": ["tcp:22"]},
			{"src": ["autogroup:member"], "dst": ["autogroup:self"], "ip": ["*"]},
			{"src": ["net"], "dst": ["tag:t2"], "ip": ["443"]},
			{"src": ["autogroup:tagged"], "dst": ["group:b"], "ip": ["udp:53"]},
			// Same sources as rules above: the compiled source sets are shared.
			{"src": ["group:a"], "dst": ["tag:t2"], "ip": ["udp:1"]},
			{"src": ["u0@x.com", "u1@x.com"], "dst": ["tag:t1"], "ip": ["udp:2"]},
			{"src": ["autogroup:member"], "dst": ["tag:t0", "tag:t1"], "ip": ["tcp:3"]},
		],
		"acls": [{"action": "accept", "src": ["u3@x.com"], "dst": ["net:80"]}],
	}`)
	rng := rand.New(rand.NewPCG(1, 2))
	randNode := func(id int) *netmap.Node {
		if rng.IntN(2) == 0 {
			return testNode(id, fmt.Sprintf("u%d@x.com", rng.IntN(4)))
		}
		return testNode(id, "", fmt.Sprintf("tag:t%d", rng.IntN(3)))
	}
	live := map[int]*netmap.Node{}
	inc := NewEngine(p)
	for step := range 300 {
		id := 1 + rng.IntN(20)
		switch op := rng.IntN(3); {
		case op < 2:
			n := randNode(id)
			live[id] = n
			inc.UpsertNode(n)
		default:
			delete(live, id)
			inc.RemoveNode(netmap.NodeID(id))
		}
		var all []*netmap.Node
		for _, n := range live {
			all = append(all, n)
		}
		full := NewEngine(p)
		full.SetNodes(all)
		for _, n := range all {
			if got, want := inc.FilterFor(n, nil), full.FilterFor(n, nil); !reflect.DeepEqual(got, want) {
				t.Fatalf("step %d: node %d: incremental filter\n%+v\nfull\n%+v", step, n.ID, got, want)
			}
			var brute []netmap.NodeID
			for _, m := range all {
				if m != n && full.CanSee(n, m) {
					brute = append(brute, m.ID)
				}
			}
			slices.Sort(brute)
			if got := inc.Peers(n); !slices.Equal(got, brute) && !(len(got) == 0 && len(brute) == 0) {
				t.Fatalf("step %d: Peers(%d) = %v, CanSee says %v", step, n.ID, got, brute)
			}
		}
	}
}

// TestFilterForSyncsNodeList: FilterFor with the node list picks up joins,
// leaves and re-tags without an explicit SetNodes.
func TestFilterForSyncsNodeList(t *testing.T) {
	f := newFleet()
	p := mustParse(t, fleetHeader+`"grants": [{"src": ["tag:other"], "dst": ["tag:srv"], "ip": ["22"]}]}`)
	e := NewEngine(p)
	if !reach(t, NewEngineWith(p, f.all), f.other, f.srv, netmap.ProtoTCP, 22) {
		t.Fatal("tag:other cannot reach tag:srv")
	}
	if rules := e.FilterFor(f.srv, f.all); len(rules) != 1 || len(rules[0].SrcIPs) != 4 {
		t.Fatalf("rules = %+v, want sources of the two tag:other nodes", rules)
	}
	// Re-tag: other becomes tag:router, keeping its addresses.
	retagged := *f.other
	retagged.Tags = []string{"tag:router"}
	all := slices.Clone(f.all)
	all[slices.Index(all, f.other)] = &retagged
	if rules := e.FilterFor(f.srv, all); len(rules) != 1 || len(rules[0].SrcIPs) != 2 {
		t.Fatalf("after re-tag rules = %+v, want only aliceTagged's addresses", rules)
	}
	// Leave.
	all = slices.DeleteFunc(all, func(n *netmap.Node) bool { return n == f.aliceTagged })
	if rules := e.FilterFor(f.srv, all); len(rules) != 0 {
		t.Fatalf("after leave rules = %+v, want none", rules)
	}
}

// NewEngineWith is a test shorthand.
func NewEngineWith(p *Policy, all []*netmap.Node) *Engine {
	e := NewEngine(p)
	e.SetNodes(all)
	return e
}
