package policy

import (
	"net/netip"
	"os"
	"strings"
	"testing"

	"meshd.dev/meshd/netmap"
)

func loadSeed(t testing.TB) *Policy {
	t.Helper()
	b, err := os.ReadFile("testdata/seed.hujson")
	if err != nil {
		t.Fatal(err)
	}
	p, err := Parse("seed.hujson", b)
	if err != nil {
		t.Fatalf("seed policy rejected: %v", err)
	}
	return p
}

// TestSeedScenarios checks the scenarios against the compiled
// per-node filters, not just the policy's own tests.
func TestSeedScenarios(t *testing.T) {
	p := loadSeed(t)
	if w := p.Lint(); len(w) != 0 {
		t.Errorf("seed policy has lint warnings: %v", w)
	}
	alice := testNode(1, "alice@example.com")
	alice2 := testNode(2, "alice@example.com")
	bob := testNode(3, "bob@example.com")
	carol := testNode(4, "carol@tenant-a.example")
	dave := testNode(5, "dave@tenant-b.example")
	inf := testNode(10, "", "tag:inference-server")
	train := testNode(11, "", "tag:training-cluster")
	gpuA := testNode(12, "", "tag:tenant-a-gpu")
	gpuB := testNode(13, "", "tag:tenant-b-gpu")
	prod1 := testNode(14, "", "tag:prod")
	prod2 := testNode(15, "", "tag:prod")
	// alice's CI runner, tagged by alice: the coordinator may keep the
	// enrolling user on record, but a tagged node is not her device.
	ci := testNode(16, "alice@example.com", "tag:ci")
	metrics := testNode(17, "", "tag:prod")
	metrics.Hostname = "metrics-v4only"
	metrics.Addresses = []netip.Prefix{netip.MustParsePrefix("100.100.10.5/32"), netip.MustParsePrefix("fd7a:115c:a1e0::10:5/128")}
	metrics.AllowedIPs = metrics.Addresses
	all := []*netmap.Node{alice, alice2, bob, carol, dave, inf, train, gpuA, gpuB, prod1, prod2, ci, metrics}
	e := NewEngine(p)
	e.SetNodes(all)

	tcp, udp, icmp := netmap.ProtoTCP, netmap.ProtoUDP, netmap.ProtoICMPv4
	cases := []struct {
		src, dst *netmap.Node
		proto    uint8
		port     uint16
		want     bool
	}{
		{alice, inf, tcp, 22, true},
		{bob, inf, tcp, 50051, true},
		{bob, inf, udp, 4789, true},
		{alice, inf, icmp, 0, true},
		{alice, train, tcp, 22, true},
		{alice, train, tcp, 8080, true},
		{alice, train, tcp, 443, false},
		{bob, train, tcp, 6006, false},
		{carol, gpuA, tcp, 443, true},
		{carol, gpuB, tcp, 443, false},
		{carol, inf, tcp, 443, false},
		{dave, gpuB, tcp, 22, true},
		{dave, gpuA, tcp, 22, false},
		{prod1, prod2, tcp, 5432, true},
		{prod2, prod1, udp, 53, true},
		{prod1, inf, tcp, 443, false},
		{ci, inf, tcp, 22, false}, // tagged by alice: loses her access
		{ci, train, tcp, 22, false},
		{ci, alice, tcp, 22, false}, // nor is it one of her devices
		{alice, alice2, tcp, 22, true},
		{alice, bob, tcp, 22, false}, // autogroup:self is the user's own only
		{inf, metrics, tcp, 9090, true},
		{inf, metrics, tcp, 22, false},
		{alice, metrics, tcp, 9090, false},
		{inf, alice, tcp, 22, false}, // direction matters: no rule from servers to users
		{gpuA, carol, tcp, 22, false},
	}
	for _, c := range cases {
		if got := reach(t, e, c.src, c.dst, c.proto, c.port); got != c.want {
			t.Errorf("%s (%s%v) -> %s (%v) %s/%d: allowed=%v, want %v", c.src.Hostname, c.src.User, c.src.Tags, c.dst.Hostname, c.dst.Tags, protoName(c.proto), c.port, got, c.want)
		}
	}

	// Peer visibility: a node learns only about peers it can reach or that
	// can reach it.
	vis := []struct {
		a, b *netmap.Node
		want bool
	}{
		{alice, inf, true}, {inf, alice, true}, {carol, gpuA, true}, {carol, gpuB, false},
		{gpuA, gpuB, false}, {ci, inf, false}, {ci, alice, false}, {alice, alice2, true},
		{alice, bob, false}, {prod1, prod2, true}, {dave, inf, false}, {inf, metrics, true},
	}
	for _, v := range vis {
		if got := e.CanSee(v.a, v.b); got != v.want {
			t.Errorf("CanSee(%s, %s) = %v, want %v", v.a.Hostname, v.b.Hostname, got, v.want)
		}
	}

	// The app grant is delivered on inf's map entry for alice.
	caps := e.PeerCaps(inf, alice)
	if got := string(caps["meshd.dev/cap/kubernetes"][0]); got != `{"impersonate":{"groups":["system:masters"]}}` {
		t.Errorf("PeerCaps(inf, alice) = %q", got)
	}
	if c := e.PeerCaps(inf, carol); c != nil {
		t.Errorf("carol has caps on inf: %v", c)
	}
	if c := e.PeerCaps(alice, inf); c != nil {
		t.Errorf("caps flow the wrong way: %v", c)
	}

	// Every FilterRule names its rule, and only carries n's own addresses
	// as destinations.
	for _, n := range all {
		for _, r := range e.FilterFor(n, nil) {
			if !strings.HasPrefix(r.Origin, "seed.hujson:") {
				t.Errorf("rule for %s has origin %q", n.Hostname, r.Origin)
			}
			for _, dp := range r.DstPorts {
				if !containsPrefix(n.AllowedIPs, dp.Net) {
					t.Errorf("rule for %s has foreign destination %v", n.Hostname, dp.Net)
				}
			}
		}
	}
}

func containsPrefix(ps []netip.Prefix, p netip.Prefix) bool {
	for _, x := range ps {
		if x.Bits() <= p.Bits() && x.Contains(p.Addr()) {
			return true
		}
	}
	return false
}
