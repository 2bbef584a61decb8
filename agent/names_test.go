package agent

import (
	"encoding/json"
	"net/netip"
	"testing"

	"meshd.dev/meshd/netmap"
)

func TestNamesChanged(t *testing.T) {
	peer := func() *netmap.Node {
		return &netmap.Node{
			ID: 2, Hostname: "b", DNSName: "b.meshd.internal.", User: "alice@example.com",
			Addresses:    []netip.Prefix{netip.MustParsePrefix("100.64.0.2/32")},
			AllowedIPs:   []netip.Prefix{netip.MustParsePrefix("100.64.0.2/32")},
			Capabilities: map[string][]json.RawMessage{"tailscale.com/cap/kubernetes": {json.RawMessage(`{"g":1}`)}},
		}
	}
	base := func() *netmap.NetworkMap {
		return &netmap.NetworkMap{
			Self:  netmap.Node{ID: 1, Hostname: "a", DNSName: "a.meshd.internal."},
			Peers: map[netmap.NodeID]*netmap.Node{2: peer()},
			DNS:   netmap.DNSConfig{Suffix: "meshd.internal", Routes: map[string][]netip.AddrPort{"corp.example": {netip.MustParseAddrPort("10.0.0.53:53")}}},
		}
	}
	tests := []struct {
		name   string
		mutate func(*netmap.NetworkMap)
		want   bool
	}{
		{"clone", func(*netmap.NetworkMap) {}, false},
		{"endpoint patch", func(m *netmap.NetworkMap) {
			p := peer()
			p.Endpoints, p.Online = []netip.AddrPort{netip.MustParseAddrPort("198.18.0.2:41641")}, true
			m.Peers[2] = p
		}, false},
		{"peer renamed", func(m *netmap.NetworkMap) { p := peer(); p.DNSName = "c.meshd.internal."; m.Peers[2] = p }, true},
		{"peer tagged", func(m *netmap.NetworkMap) { p := peer(); p.Tags = []string{"tag:x"}; m.Peers[2] = p }, true},
		{"capability value", func(m *netmap.NetworkMap) {
			p := peer()
			p.Capabilities = map[string][]json.RawMessage{"tailscale.com/cap/kubernetes": {json.RawMessage(`{"g":2}`)}}
			m.Peers[2] = p
		}, true},
		{"route added", func(m *netmap.NetworkMap) {
			p := peer()
			p.AllowedIPs = append(p.AllowedIPs, netip.MustParsePrefix("10.1.0.0/16"))
			m.Peers[2] = p
		}, true},
		{"peer gone", func(m *netmap.NetworkMap) { delete(m.Peers, 2) }, true},
		{"peer replaced by another id", func(m *netmap.NetworkMap) { p := peer(); p.ID = 3; delete(m.Peers, 2); m.Peers[3] = p }, true},
		{"self renamed", func(m *netmap.NetworkMap) { m.Self.DNSName = "z.meshd.internal." }, true},
		{"split dns route", func(m *netmap.NetworkMap) {
			m.DNS.Routes = map[string][]netip.AddrPort{"corp.example": {netip.MustParseAddrPort("10.0.0.54:53")}}
		}, true},
		{"suffix", func(m *netmap.NetworkMap) { m.DNS.Suffix = "fleet.internal" }, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			prev := base()
			cur := prev.Clone()
			tt.mutate(cur)
			if got := namesChanged(prev, cur); got != tt.want {
				t.Fatalf("namesChanged = %v, want %v", got, tt.want)
			}
		})
	}
}
