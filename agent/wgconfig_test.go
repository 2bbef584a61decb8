package agent

import (
	"encoding/hex"
	"net/netip"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/netmap"
)

func TestUAPIDiff(t *testing.T) {
	k1, k2, k3 := netmap.NewNodePrivate().Public(), netmap.NewNodePrivate().Public(), netmap.NewNodePrivate().Public()
	hx := func(k netmap.NodePublic) string { return hex.EncodeToString(k[:]) }
	ep1 := netip.MustParseAddrPort("198.18.0.1:41641")
	ep2 := netip.MustParseAddrPort("198.18.0.2:41641")
	ips1 := []netip.Prefix{netip.MustParsePrefix("100.64.0.1/32")}
	ips1b := []netip.Prefix{netip.MustParsePrefix("100.64.0.1/32"), netip.MustParsePrefix("10.1.0.0/16")}
	peer := func(k netmap.NodePublic, ep netip.AddrPort, ips []netip.Prefix) wgPeer {
		return wgPeer{Key: k, Endpoint: ep, AllowedIPs: ips, Keepalive: true}
	}
	offline := func(p wgPeer) wgPeer { p.Keepalive = false; return p }
	set := func(ps ...wgPeer) map[netmap.NodePublic]wgPeer {
		m := map[netmap.NodePublic]wgPeer{}
		for _, p := range ps {
			m[p.Key] = p
		}
		return m
	}
	for _, tc := range []struct {
		name      string
		old, want map[netmap.NodePublic]wgPeer
		wantLines []string // must appear, in order
		notWant   []string
		empty     bool
	}{
		{name: "no change", old: set(peer(k1, ep1, ips1)), want: set(peer(k1, ep1, ips1)), empty: true},
		{name: "add", old: set(), want: set(peer(k1, ep1, ips1)),
			wantLines: []string{"public_key=" + hx(k1), "persistent_keepalive_interval=25", "endpoint=198.18.0.1:41641", "allowed_ip=100.64.0.1/32"},
			notWant:   []string{"update_only", "remove"}},
		{name: "add without endpoint", old: set(), want: set(peer(k1, netip.AddrPort{}, ips1)),
			wantLines: []string{"public_key=" + hx(k1), "allowed_ip=100.64.0.1/32"}, notWant: []string{"endpoint="}},
		{name: "add offline peer: no keepalive", old: set(), want: set(offline(peer(k1, ep1, ips1))),
			wantLines: []string{"public_key=" + hx(k1), "persistent_keepalive_interval=0", "allowed_ip=100.64.0.1/32"}},
		{name: "peer comes online", old: set(offline(peer(k1, ep1, ips1))), want: set(peer(k1, ep1, ips1)),
			wantLines: []string{"public_key=" + hx(k1), "update_only=true", "persistent_keepalive_interval=25"},
			notWant:   []string{"replace_allowed_ips", "endpoint="}},
		{name: "peer goes offline", old: set(peer(k1, ep1, ips1)), want: set(offline(peer(k1, ep1, ips1))),
			wantLines: []string{"public_key=" + hx(k1), "update_only=true", "persistent_keepalive_interval=0"},
			notWant:   []string{"replace_allowed_ips", "endpoint="}},
		{name: "remove", old: set(peer(k1, ep1, ips1)), want: set(),
			wantLines: []string{"public_key=" + hx(k1), "remove=true"}},
		{name: "endpoint change keeps allowed ips", old: set(peer(k1, ep1, ips1)), want: set(peer(k1, ep2, ips1)),
			wantLines: []string{"public_key=" + hx(k1), "update_only=true", "endpoint=198.18.0.2:41641"},
			notWant:   []string{"replace_allowed_ips", "remove"}},
		{name: "endpoint gone leaves roamed endpoint", old: set(peer(k1, ep1, ips1)), want: set(peer(k1, netip.AddrPort{}, ips1)), empty: true},
		{name: "allowed ips change", old: set(peer(k1, ep1, ips1)), want: set(peer(k1, ep1, ips1b)),
			wantLines: []string{"update_only=true", "replace_allowed_ips=true", "allowed_ip=100.64.0.1/32", "allowed_ip=10.1.0.0/16"},
			notWant:   []string{"endpoint="}},
		{name: "mixed: unchanged peer untouched", old: set(peer(k1, ep1, ips1), peer(k2, ep2, ips1)), want: set(peer(k1, ep1, ips1), peer(k3, ep2, ips1)),
			wantLines: []string{"public_key=" + hx(k3)}, notWant: []string{"public_key=" + hx(k1)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := uapiDiff(tc.old, tc.want)
			if tc.empty {
				if got != "" {
					t.Fatalf("want no change, got:\n%s", got)
				}
				return
			}
			rest := got
			for _, l := range tc.wantLines {
				i := strings.Index(rest, l+"\n")
				if i < 0 {
					t.Fatalf("missing %q (in order) in:\n%s", l, got)
				}
				rest = rest[i+len(l):]
			}
			for _, l := range tc.notWant {
				if strings.Contains(got, l) {
					t.Fatalf("unexpected %q in:\n%s", l, got)
				}
			}
		})
	}
}

func TestParseUAPIGet(t *testing.T) {
	k := netmap.NewNodePrivate().Public()
	text := "private_key=" + strings.Repeat("ab", 32) + "\nlisten_port=41641\n" +
		"public_key=" + hex.EncodeToString(k[:]) + "\npreshared_key=" + strings.Repeat("00", 32) +
		"\nprotocol_version=1\nendpoint=198.18.0.2:41641\nlast_handshake_time_sec=1700000000\nlast_handshake_time_nsec=5\n" +
		"tx_bytes=100\nrx_bytes=200\npersistent_keepalive_interval=0\nallowed_ip=100.64.0.2/32\n" +
		"public_key=" + strings.Repeat("cd", 32) + "\nlast_handshake_time_sec=0\nlast_handshake_time_nsec=0\ntx_bytes=0\nrx_bytes=0\n"
	st, err := parseUAPIGet(text)
	if err != nil {
		t.Fatal(err)
	}
	if st.ListenPort != 41641 || len(st.Peers) != 2 {
		t.Fatalf("got %+v", st)
	}
	p := st.Peers[k]
	if p.RxBytes != 200 || p.TxBytes != 100 || p.Endpoint.String() != "198.18.0.2:41641" || !p.LastHandshake.Equal(time.Unix(1700000000, 5)) {
		t.Fatalf("peer = %+v", p)
	}
	var k2 netmap.NodePublic
	hex.Decode(k2[:], []byte(strings.Repeat("cd", 32)))
	if !st.Peers[k2].LastHandshake.IsZero() {
		t.Error("never-handshaked peer has a handshake time")
	}
	for _, bad := range []string{
		"rx_bytes=1\n",
		"public_key=zz\n",
		"public_key=" + strings.Repeat("ab", 31) + "\n",
		"listen_port=70000\n",
		"no equals sign\n",
		"public_key=" + strings.Repeat("ab", 32) + "\nendpoint=nonsense\n",
	} {
		if _, err := parseUAPIGet(bad); err == nil {
			t.Errorf("parseUAPIGet(%q) succeeded", bad)
		}
	}
}

func FuzzParseUAPIGet(f *testing.F) {
	f.Add("listen_port=41641\npublic_key=" + strings.Repeat("ab", 32) + "\nendpoint=[::1]:5\nrx_bytes=3\n")
	f.Add("public_key=" + strings.Repeat("ab", 32) + "\nlast_handshake_time_sec=-1\nlast_handshake_time_nsec=99999999999\n")
	f.Fuzz(func(t *testing.T, s string) {
		st, err := parseUAPIGet(s)
		if err == nil && st == nil {
			t.Fatal("nil stats without error")
		}
	})
}

func TestWGPeersFromMap(t *testing.T) {
	self := testNode(1, "100.64.0.1")
	p := testNode(2, "100.64.0.2")
	p.AllowedIPs = append(p.AllowedIPs, netip.MustParsePrefix("10.0.0.0/8"))
	noIPs := testNode(3, "100.64.0.3")
	noIPs.AllowedIPs = nil
	nm := &netmap.NetworkMap{Self: self, Peers: map[netmap.NodeID]*netmap.Node{2: &p, 3: &noIPs}}
	got := wgPeersFromMap(nm, func([]netip.AddrPort) netip.AddrPort { return netip.AddrPort{} })
	if len(got) != 2 {
		t.Fatalf("got %d peers", len(got))
	}
	if g := got[p.NodeKey].AllowedIPs; len(g) != 2 || g[0].String() != "10.0.0.0/8" {
		t.Errorf("allowed ips not sorted/complete: %v", g)
	}
	if g := got[noIPs.NodeKey].AllowedIPs; len(g) != 1 || g[0] != noIPs.Addresses[0] {
		t.Errorf("peer without allowed ips should route its addresses: %v", g)
	}
}
