package whois

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"meshd.dev/meshd/netmap"
)

func node(id netmap.NodeID, v4 string, mutate ...func(*netmap.Node)) *netmap.Node {
	a := netip.MustParseAddr(v4)
	n := &netmap.Node{
		ID: id, Hostname: fmt.Sprintf("n%d", id), DNSName: fmt.Sprintf("n%d.meshd.internal.", id),
		NodeKey:   netmap.NewNodePrivate().Public(),
		Addresses: []netip.Prefix{netip.PrefixFrom(a, 32)},
	}
	n.AllowedIPs = n.Addresses
	for _, m := range mutate {
		m(n)
	}
	return n
}

func mapOf(self *netmap.Node, peers ...*netmap.Node) *netmap.NetworkMap {
	nm := &netmap.NetworkMap{Self: *self, Peers: map[netmap.NodeID]*netmap.Node{}}
	for _, p := range peers {
		nm.Peers[p.ID] = p
	}
	return nm
}

func TestLookup(t *testing.T) {
	k8s := map[string][]json.RawMessage{"tailscale.com/cap/kubernetes": {json.RawMessage(`{"impersonate":{"groups":["admins"]}}`)}}
	self := node(1, "100.64.0.1", func(n *netmap.Node) { n.User = "me@example.com"; n.Capabilities = k8s })
	alice := node(2, "100.64.0.2", func(n *netmap.Node) {
		n.User = "alice@example.com"
		n.OS = "linux"
		n.Capabilities = k8s
		n.Addresses = append(n.Addresses, netip.MustParsePrefix("fd5e:5a1e:d::6440:2/128"))
	})
	svc := node(3, "100.64.0.3", func(n *netmap.Node) { n.User = "enroller@example.com"; n.Tags = []string{"tag:infer"} })
	router := node(4, "100.64.0.4", func(n *netmap.Node) {
		n.AllowedIPs = append(n.AllowedIPs, netip.MustParsePrefix("10.1.0.0/16"), netip.MustParsePrefix("10.1.2.0/24"))
	})
	narrow := node(5, "100.64.0.5", func(n *netmap.Node) { n.AllowedIPs = append(n.AllowedIPs, netip.MustParsePrefix("10.1.2.0/24")) })
	x := NewIndex(mapOf(self, alice, svc, router, narrow))

	tests := []struct {
		name     string
		ip       string
		wantID   netmap.NodeID
		wantUser string
		wantCaps int
		wantSelf bool
	}{
		{"user node v4", "100.64.0.2", 2, "alice@example.com", 1, false},
		{"user node v6", "fd5e:5a1e:d::6440:2", 2, "alice@example.com", 1, false},
		{"v4-mapped v6", "::ffff:100.64.0.2", 2, "alice@example.com", 1, false},
		{"tagged node has no user", "100.64.0.3", 3, "", 0, false},
		{"self has no caps", "100.64.0.1", 1, "me@example.com", 0, true},
		{"subnet route", "10.1.9.9", 4, "", 0, false},
		{"two routers for one prefix answer for neither", "10.1.2.3", 4, "", 0, false},
		{"unknown", "100.64.9.9", 0, "", 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, ok := x.Lookup(netip.MustParseAddr(tt.ip))
			if tt.wantID == 0 {
				if ok {
					t.Fatalf("found %+v", r)
				}
				return
			}
			if !ok {
				t.Fatal("not found")
			}
			if r.Node.ID != tt.wantID || r.User != tt.wantUser || len(r.Capabilities) != tt.wantCaps || r.Self != tt.wantSelf {
				t.Fatalf("got %+v", r)
			}
		})
	}
	r, _ := x.Lookup(netip.MustParseAddr("100.64.0.2"))
	if r.Node.OS != "linux" || r.Node.DNSName != "n2.meshd.internal." || len(r.Node.IPs) != 2 {
		t.Errorf("node fields: %+v", r.Node)
	}
	b, _ := json.Marshal(r)
	var back map[string]any
	json.Unmarshal(b, &back)
	if _, ok := back["capabilities"].(map[string]any)["tailscale.com/cap/kubernetes"]; !ok {
		t.Errorf("capability name not passed through unchanged: %s", b)
	}
}

// An address two nodes claim (a hostile or broken map) answers for neither.
func TestLookupClash(t *testing.T) {
	x := NewIndex(mapOf(node(1, "100.64.0.1"), node(2, "100.64.0.2"), node(3, "100.64.0.2")))
	if r, ok := x.Lookup(netip.MustParseAddr("100.64.0.2")); ok {
		t.Fatalf("clashing address answered: %+v", r)
	}
	if _, ok := x.Lookup(netip.MustParseAddr("100.64.0.1")); !ok {
		t.Fatal("self lost")
	}
}

func TestTableFollowsMaps(t *testing.T) {
	var tb Table
	if _, ok := tb.Lookup(netip.MustParseAddr("100.64.0.2")); ok {
		t.Fatal("answer before any map")
	}
	self := node(1, "100.64.0.1")
	tb.Set(mapOf(self, node(2, "100.64.0.2")))
	if _, ok := tb.Lookup(netip.MustParseAddr("100.64.0.2")); !ok {
		t.Fatal("peer not found")
	}
	// The policy stops showing the peer: it leaves the map, so whois forgets it.
	tb.Set(mapOf(self))
	if r, ok := tb.Lookup(netip.MustParseAddr("100.64.0.2")); ok {
		t.Fatalf("removed peer still answers: %+v", r)
	}
	tb.Set(nil)
	if _, ok := tb.Lookup(netip.MustParseAddr("100.64.0.1")); ok {
		t.Fatal("nil map answers")
	}
}

func BenchmarkLookup(b *testing.B) {
	const peers = 10000
	self := node(1, "100.64.0.1")
	var ps []*netmap.Node
	caps := map[string][]json.RawMessage{"meshd.dev/cap/job": {json.RawMessage(`{}`)}}
	for i := range peers {
		ip := netip.AddrFrom4([4]byte{100, 65 + byte(i>>16), byte(i >> 8), byte(i)})
		ps = append(ps, node(netmap.NodeID(i+2), ip.String(), func(n *netmap.Node) { n.Capabilities = caps }))
	}
	x := NewIndex(mapOf(self, ps...))
	var tb Table
	tb.Set(mapOf(self, ps...))
	addrs := make([]netip.Addr, 1024)
	for i := range addrs {
		addrs[i] = ps[(i*7919)%peers].Addresses[0].Addr()
	}
	b.Run("index/peers=10000", func(b *testing.B) {
		b.ReportAllocs()
		for i := 0; b.Loop(); i++ {
			if _, ok := x.Lookup(addrs[i&1023]); !ok {
				b.Fatal("miss")
			}
		}
	})
	b.Run("table/peers=10000", func(b *testing.B) {
		b.ReportAllocs()
		for i := 0; b.Loop(); i++ {
			if _, ok := tb.Lookup(addrs[i&1023]); !ok {
				b.Fatal("miss")
			}
		}
	})
	b.Run("build/peers=10000", func(b *testing.B) {
		nm := mapOf(self, ps...)
		b.ReportAllocs()
		for b.Loop() {
			NewIndex(nm)
		}
	})
}

func TestPeer(t *testing.T) {
	var tb Table
	tb.Set(mapOf(node(1, "100.64.0.1"), node(2, "100.64.0.2")))
	tests := []struct {
		remote string
		wantID netmap.NodeID
		err    string
	}{
		{"100.64.0.2:41000", 2, ""},
		{"[::ffff:100.64.0.2]:41000", 2, ""},
		{"100.64.0.1:41000", 0, "this node itself"},
		{"100.64.9.9:41000", 0, "not a node"},
		{"100.64.0.2", 0, "remote address"},
	}
	for _, tt := range tests {
		who, _, err := Peer(tb.Lookup, tt.remote)
		if tt.err != "" {
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("Peer(%q): err %v, want %q", tt.remote, err, tt.err)
			}
			continue
		}
		if err != nil || who.Node.ID != tt.wantID || who.Node.Name() != "n2.meshd.internal" {
			t.Errorf("Peer(%q) = %+v, %v", tt.remote, who, err)
		}
	}
}
