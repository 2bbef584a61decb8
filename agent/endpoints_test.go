package agent

import (
	"net/netip"
	"slices"
	"testing"

	"meshd.dev/meshd/netmap"
)

func pfx(s ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, x := range s {
		out = append(out, netip.MustParsePrefix(x))
	}
	return out
}

func aps(s ...string) []netip.AddrPort {
	var out []netip.AddrPort
	for _, x := range s {
		out = append(out, netip.MustParseAddrPort(x))
	}
	return out
}

func TestEndpointCandidates(t *testing.T) {
	locals := pfx("127.0.0.1/8", "::1/128", "198.18.1.2/24", "fe80::1/64", "100.64.0.5/32", "fd5e:5a1e:d::5/128", "2001:db8::2/64",
		"100.100.100.100/32", "fd5e:5a1e:d::53/128", "fd5e:5a1e:d::6440:9/128") // MagicDNS on the TUN; another tailnet address
	tailnet := pfx("100.64.0.5/32", "fd5e:5a1e:d::5/128")
	got := endpointCandidates(locals, 41641, tailnet, false)
	want := aps("198.18.1.2:41641", "[2001:db8::2]:41641")
	if !slices.Equal(got, want) {
		t.Errorf("without loopback: got %v, want %v", got, want)
	}
	got = endpointCandidates(locals, 7, tailnet, true)
	want = aps("127.0.0.1:7", "[::1]:7")
	if !slices.Equal(got, want) {
		t.Errorf("loopback only: got %v, want %v", got, want)
	}
}

func TestPickEndpoint(t *testing.T) {
	locals := pfx("198.18.1.2/24", "127.0.0.1/8")
	for _, tc := range []struct {
		cands []string
		want  string
	}{
		{nil, ""},
		{[]string{"203.0.113.9:1", "198.18.1.3:41641"}, "198.18.1.3:41641"},
		{[]string{"[2001:db8::3]:1", "203.0.113.9:2"}, "203.0.113.9:2"},
		{[]string{"127.0.0.1:5", "198.18.1.9:6"}, "198.18.1.9:6"},
		{[]string{"127.0.0.1:5", "[::1]:5"}, "127.0.0.1:5"},
		{[]string{"203.0.113.9:0"}, ""},
	} {
		got := pickEndpoint(locals, aps(tc.cands...))
		want := netip.AddrPort{}
		if tc.want != "" {
			want = netip.MustParseAddrPort(tc.want)
		}
		if got != want {
			t.Errorf("pickEndpoint(%v) = %v, want %v", tc.cands, got, want)
		}
	}
}

func TestTailnetRoutes(t *testing.T) {
	self := pfx("100.64.0.1/32", "fd5e:5a1e:d::1/128")
	p := testNode(2, "100.64.0.2")
	p.AllowedIPs = pfx("100.64.0.2/32", "fd5e:5a1e:d::2/128", "10.20.0.0/16", "0.0.0.0/0")
	nm := &netmap.NetworkMap{Peers: map[netmap.NodeID]*netmap.Node{2: &p}}
	got := tailnetRoutes(self, nm)
	want := pfx("100.64.0.0/10", "fd5e:5a1e:d::/48")
	if !slices.Equal(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	// Subnet and exit routes (routedMap left only the exit node's) go to
	// meshd's own table.
	if got, want := subnetRoutes(self, nm), pfx("0.0.0.0/0", "10.20.0.0/16"); !slices.Equal(got, want) {
		t.Fatalf("subnet routes %v, want %v", got, want)
	}
}

func TestResolvePeer(t *testing.T) {
	self := testNode(1, "100.64.0.1")
	p := testNode(2, "100.64.0.2")
	p.Hostname = "Inference-1"
	p.Addresses = append(pfx("fd5e:5a1e:d::2/128"), p.Addresses...)
	nm := &netmap.NetworkMap{Self: self, Peers: map[netmap.NodeID]*netmap.Node{2: &p}}
	for _, tc := range []struct{ host, want string }{
		{"inference-1", "100.64.0.2"},
		{"INFERENCE-1.", "100.64.0.2"},
		{"100.64.0.2", "100.64.0.2"},
		{"::ffff:100.64.0.2", "100.64.0.2"},
		{"100.64.0.9", ""},
		{"8.8.8.8", ""},
		{"example.com", ""},
	} {
		got, err := resolvePeer(nm, tc.host)
		if tc.want == "" {
			if err == nil {
				t.Errorf("resolvePeer(%q) = %v, want error", tc.host, got)
			}
			continue
		}
		if err != nil || got.String() != tc.want {
			t.Errorf("resolvePeer(%q) = %v, %v; want %s", tc.host, got, err, tc.want)
		}
	}
}
