package control

import (
	"net/netip"
	"slices"
	"testing"

	"meshd.dev/meshd/netmap"
)

func TestMapCarriesDNS(t *testing.T) {
	tests := []struct {
		name       string
		opts       netmap.DNSConfig
		wantSuffix string
		wantSearch []string
	}{
		{"default", netmap.DNSConfig{}, netmap.DefaultDNSSuffix, []string{netmap.DefaultDNSSuffix}},
		{"custom", netmap.DNSConfig{
			Suffix: "fleet.internal", SearchDomains: []string{"fleet.internal", "corp.example"},
			Routes: map[string][]netip.AddrPort{"corp.example": {netip.MustParseAddrPort("10.0.0.53:53")}},
		}, "fleet.internal", []string{"fleet.internal", "corp.example"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ts := startServer(t, ServerOptions{DNS: tt.opts})
			key := ts.key(t, AuthKeyOptions{Tags: []string{"tag:x"}, Reusable: true})
			a, b := newTestNode(t, ts.url, ""), newTestNode(t, ts.url, "")
			a.mustRegister(t, key, "gpu-1")
			b.mustRegister(t, key, "gpu-1") // clashes: gets a suffix, so a distinct name
			a.follow(t, a.mapRequest())
			m := a.waitMap(t, "b in map", func(m *netmap.NetworkMap) bool { return m.Peers[b.id] != nil })
			if want := "gpu-1." + tt.wantSuffix + "."; m.Self.DNSName != want {
				t.Errorf("self dns name %q, want %q", m.Self.DNSName, want)
			}
			if want := m.Peers[b.id].Hostname + "." + tt.wantSuffix + "."; m.Peers[b.id].DNSName != want || want == m.Self.DNSName {
				t.Errorf("peer dns name %q, want %q (distinct from self's)", m.Peers[b.id].DNSName, want)
			}
			if m.DNS.Suffix != tt.wantSuffix || !slices.Equal(m.DNS.SearchDomains, tt.wantSearch) {
				t.Errorf("dns config %+v", m.DNS)
			}
			if len(m.DNS.Routes) != len(tt.opts.Routes) {
				t.Errorf("routes %v, want %v", m.DNS.Routes, tt.opts.Routes)
			}
			nodes, err := ts.Nodes(t.Context())
			if err != nil {
				t.Fatal(err)
			}
			for _, n := range nodes {
				if n.DNSName != netmap.DNSName(n.Hostname, tt.wantSuffix) {
					t.Errorf("admin list: node %d dns name %q", n.ID, n.DNSName)
				}
			}
		})
	}
}

func TestServerRefusesBadDNS(t *testing.T) {
	for _, c := range []netmap.DNSConfig{
		{Suffix: "Bad_Suffix"},
		{Suffix: "ok.internal", Routes: map[string][]netip.AddrPort{"corp.example": nil}},
		{Suffix: "ok.internal", SearchDomains: []string{"-x.example"}},
	} {
		if _, err := NewServer(t.Context(), ServerOptions{StateDir: t.TempDir(), DNS: c}); err == nil {
			t.Errorf("NewServer accepted dns %+v", c)
		}
	}
}
