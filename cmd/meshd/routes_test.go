package main

import (
	"net/netip"
	"testing"

	"meshd.dev/meshd/agent/localapi"
)

func TestRoutesLine(t *testing.T) {
	p := func(ss ...string) []netip.Prefix {
		var out []netip.Prefix
		for _, s := range ss {
			out = append(out, netip.MustParsePrefix(s))
		}
		return out
	}
	for _, tc := range []struct {
		n    localapi.Node
		want string
	}{
		{localapi.Node{}, ""},
		{localapi.Node{AdvertisedRoutes: p("10.1.0.0/24")}, "10.1.0.0/24 pending approval"},
		{localapi.Node{AdvertisedRoutes: p("10.1.0.0/24"), ApprovedRoutes: p("10.1.0.0/24")}, "10.1.0.0/24 standby"},
		{localapi.Node{AdvertisedRoutes: p("10.1.0.0/24", "0.0.0.0/0"), ApprovedRoutes: p("10.1.0.0/24", "0.0.0.0/0"), PrimaryRoutes: p("10.1.0.0/24", "0.0.0.0/0")},
			"10.1.0.0/24 primary, 0.0.0.0/0 exit node"},
	} {
		if got := routesLine(&tc.n); got != tc.want {
			t.Errorf("routesLine(%+v) = %q, want %q", tc.n, got, tc.want)
		}
	}
}
