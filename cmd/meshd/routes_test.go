package main

import (
	"net/netip"
	"strings"
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

// TestPolicyExplainRouted: explain names the routed path and the
// autoApprovers that concern a destination outside the tailnet, and says
// nothing of routes for a tailnet address.
func TestPolicyExplainRouted(t *testing.T) {
	file := writePolicy(t, "p.hujson", `{
  "tagOwners": {"tag:router": [], "tag:client": []},
  "grants": [{"src": ["tag:client"], "dst": ["10.1.0.0/24", "100.64.0.9"], "ip": ["*"]}],
  "autoApprovers": {"routes": {"10.0.0.0/8": ["tag:router"]}},
}
`)
	code, out, _ := runPolicy(t, "explain", file, "--src", "tag:client", "--dst", "10.1.0.5:22")
	if code != 0 || !strings.Contains(out, "routed:  10.1.0.5:22 is outside the tailnet") || !strings.Contains(out, "approve routes 10.0.0.0/8 by tag:router at "+file+":4:32") {
		t.Errorf("explain routed: exit %d\n%s", code, out)
	}
	code, out, _ = runPolicy(t, "explain", file, "--src", "tag:client", "--dst", "172.16.0.1:22")
	if code != 1 || !strings.Contains(out, "no autoApprovers entry covers it") {
		t.Errorf("explain routed, not approvable: exit %d\n%s", code, out)
	}
	code, out, _ = runPolicy(t, "explain", file, "--src", "tag:client", "--dst", "100.64.0.9:22")
	if code != 0 || strings.Contains(out, "routed:") {
		t.Errorf("explain tailnet address: exit %d\n%s", code, out)
	}
}

// TestPolicyExplainInternetAndVia: explain says when a destination is in
// autogroup:internet, allows it only under a grant of autogroup:internet
// ("*" is not exit node use), and names a grant's via routers.
func TestPolicyExplainInternetAndVia(t *testing.T) {
	file := writePolicy(t, "p.hujson", `{
  "tagOwners": {"tag:exit-eu": [], "tag:router-eu": [], "tag:eu": [], "tag:lan": []},
  "grants": [
    {"src": ["tag:eu"], "dst": ["autogroup:internet"], "ip": ["tcp:443"], "via": ["tag:exit-eu"]},
    {"src": ["tag:eu"], "dst": ["10.2.0.0/24"], "ip": ["tcp:22"], "via": ["tag:router-eu"]},
  ],
}
`)
	code, out, _ := runPolicy(t, "explain", file, "--src", "tag:eu", "--dst", "8.8.8.8:443")
	if code != 0 || !strings.Contains(out, "allowed: tag:eu -> 8.8.8.8:443 (tcp) by the rule at "+file+":4") ||
		!strings.Contains(out, "it is in autogroup:internet") || !strings.Contains(out, "(via): "+file+":4: tag:exit-eu") {
		t.Errorf("explain internet via: exit %d\n%s", code, out)
	}
	code, out, _ = runPolicy(t, "explain", file, "--src", "tag:eu", "--dst", "10.2.0.7:22")
	if code != 0 || strings.Contains(out, "autogroup:internet") || !strings.Contains(out, "(via): "+file+":5: tag:router-eu") {
		t.Errorf("explain subnet via: exit %d\n%s", code, out)
	}
	code, out, _ = runPolicy(t, "explain", file, "--src", "tag:lan", "--dst", "8.8.8.8:443")
	if code != 1 || !strings.Contains(out, "denied:") || strings.Contains(out, "(via)") {
		t.Errorf("explain internet, no grant: exit %d\n%s", code, out)
	}
}
