package netmap

import (
	"net/netip"
	"strings"
	"testing"
)

func TestDNSConfigValidate(t *testing.T) {
	ns := []netip.AddrPort{netip.MustParseAddrPort("10.0.0.53:53")}
	tests := []struct {
		name string
		c    DNSConfig
		err  string
	}{
		{"ok", DNSConfig{Suffix: "meshd.internal", SearchDomains: []string{"meshd.internal"}, Routes: map[string][]netip.AddrPort{"corp.example": ns}}, ""},
		{"empty suffix", DNSConfig{}, "empty domain"},
		{"upper", DNSConfig{Suffix: "Meshd.internal"}, "lowercase"},
		{"trailing dot", DNSConfig{Suffix: "meshd.internal."}, "labels"},
		{"dash", DNSConfig{Suffix: "-a.internal"}, "starts or ends"},
		{"long label", DNSConfig{Suffix: strings.Repeat("a", 64) + ".internal"}, "1-63"},
		{"long name", DNSConfig{Suffix: strings.Repeat("a.", 130) + "internal"}, "253"},
		{"route no resolvers", DNSConfig{Suffix: "x.internal", Routes: map[string][]netip.AddrPort{"corp.example": nil}}, "no resolvers"},
		{"route port 0", DNSConfig{Suffix: "x.internal", Routes: map[string][]netip.AddrPort{"corp.example": {netip.MustParseAddrPort("10.0.0.1:0")}}}, "not an IP:port"},
		{"bad search", DNSConfig{Suffix: "x.internal", SearchDomains: []string{"a..b"}}, "labels"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.c.Validate()
			if tt.err == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Fatalf("err %v, want %q", err, tt.err)
			}
		})
	}
}

func TestNodeDNSNameValidate(t *testing.T) {
	base := Node{ID: 1, NodeKey: NewNodePrivate().Public(), Addresses: []netip.Prefix{netip.MustParsePrefix("100.64.0.1/32")}}
	for name, ok := range map[string]bool{"": true, "a.meshd.internal.": true, "a.meshd.internal": false, "A.b.": false, "a..b.": false} {
		n := base
		n.DNSName = name
		if err := n.Validate(); (err == nil) != ok {
			t.Errorf("dns name %q: err %v, want ok=%v", name, err, ok)
		}
	}
}

func TestApplyKeepsDNSAcrossDeltas(t *testing.T) {
	self := Node{ID: 1, NodeKey: NewNodePrivate().Public(), Addresses: []netip.Prefix{netip.MustParsePrefix("100.64.0.1/32")}}
	var m NetworkMap
	dns := DNSConfig{Suffix: "meshd.internal"}
	if err := m.Apply(&MapResponse{Epoch: "e", Full: true, Self: &self, DNS: &dns}); err != nil {
		t.Fatal(err)
	}
	if err := m.Apply(&MapResponse{Epoch: "e", Version: 2, Self: &self}); err != nil {
		t.Fatal(err)
	}
	if m.DNS.Suffix != "meshd.internal" {
		t.Fatalf("delta without dns dropped it: %+v", m.DNS)
	}
	bad := DNSConfig{Suffix: "BAD"}
	if err := m.Apply(&MapResponse{Epoch: "e", Version: 3, DNS: &bad}); err == nil || m.DNS.Suffix != "meshd.internal" || m.Version != 2 {
		t.Fatalf("bad dns config: err %v, map %+v", err, m.DNS)
	}
}
