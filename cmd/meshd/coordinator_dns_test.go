package main

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func TestDNSRouteFlag(t *testing.T) {
	tests := []struct {
		values []string
		want   map[string][]netip.AddrPort
		err    string
	}{
		{[]string{"corp.example=10.0.0.53"}, map[string][]netip.AddrPort{"corp.example": {netip.MustParseAddrPort("10.0.0.53:53")}}, ""},
		{[]string{"Corp.Example.=10.0.0.53:5353,[fd00::53]:53,fd00::54"}, map[string][]netip.AddrPort{"corp.example": {
			netip.MustParseAddrPort("10.0.0.53:5353"), netip.MustParseAddrPort("[fd00::53]:53"), netip.MustParseAddrPort("[fd00::54]:53")}}, ""},
		{[]string{"a.example=10.0.0.1", "b.example=10.0.0.2"}, map[string][]netip.AddrPort{
			"a.example": {netip.MustParseAddrPort("10.0.0.1:53")}, "b.example": {netip.MustParseAddrPort("10.0.0.2:53")}}, ""},
		{[]string{"corp.example"}, nil, "want DOMAIN="},
		{[]string{"corp.example="}, nil, "want DOMAIN="},
		{[]string{"corp.example=resolver"}, nil, "not an IP"},
		{[]string{"bad_domain=10.0.0.1"}, nil, "lowercase"},
		{[]string{"a.example=10.0.0.1", "a.example=10.0.0.2"}, nil, "given twice"},
	}
	for _, tt := range tests {
		var f dnsRouteFlag
		var err error
		for _, v := range tt.values {
			if err = f.Set(v); err != nil {
				break
			}
		}
		if tt.err != "" {
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("%q: err %v, want %q", tt.values, err, tt.err)
			}
			continue
		}
		if err != nil || len(f.routes) != len(tt.want) {
			t.Errorf("%q: routes %v, err %v; want %v", tt.values, f.routes, err, tt.want)
			continue
		}
		for d, rs := range tt.want {
			if !slices.Equal(f.routes[d], rs) {
				t.Errorf("%q: %s -> %v, want %v", tt.values, d, f.routes[d], rs)
			}
		}
	}
}
