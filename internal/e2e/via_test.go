package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/internal/netlab"
)

// policyVia lets tag:eu reach the subnet only through tag:router-eu and
// tag:us only through tag:router-us; the lab's one router is router-eu.
const policyVia = `// via lab
{
	"tagOwners": {"tag:router-eu": [], "tag:router-us": [], "tag:eu": [], "tag:us": []},
	"grants": [
		{"src": ["tag:eu"], "dst": ["198.19.77.0/24"], "ip": ["*"], "via": ["tag:router-eu"]},
		{"src": ["tag:us"], "dst": ["198.19.77.0/24"], "ip": ["*"], "via": ["tag:router-us"]},
		{"src": ["tag:us"], "dst": ["tag:router-eu"], "ip": ["icmp:*"]},
	],
	"autoApprovers": {"routes": {"198.19.77.0/24": ["tag:router-eu", "tag:router-us"]}},
}
`

// TestSubnetRouterVia: a grant's "via" is enforced by the router's filter.
// The client whose grant names the router reaches a plain host behind it;
// the client whose grant names another router (tag:router-us, absent) gets
// nothing through this one, although it may ping the router itself and
// routes the subnet to it with --accept-routes: "via" never widens a grant
// to other routers.
func TestSubnetRouterVia(t *testing.T) {
	t.Parallel()
	lab := netlab.New(t)
	e := &env{t: t, bin: buildMeshd(t), dir: t.TempDir()}
	hosts := lanHosts(lab, "coord", "router", "eu", "us")
	sub := lab.NewSegment("sub", netip.MustParsePrefix("198.19.77.0/24"))
	hosts["router"].Attach(sub)
	plain := lab.NewHost("plain")
	plainIP := plain.Attach(sub) // no default route: replies reach only the on-link router

	e.runCoordinator(hosts["coord"], "198.18.0.1:8443", "via lab", "--policy", writeTemp(t, "via.hujson", policyVia))
	nodes := map[string]*node{}
	for name, extra := range map[string][]string{
		"router": {"--advertise-routes", "198.19.77.0/24"},
		"eu":     {"--accept-routes"},
		"us":     {"--accept-routes"},
	} {
		tag := name
		if name == "router" {
			tag = "router-eu"
		}
		n := e.newNode(name, hosts[name], "--tun", "meshd0")
		nodes[name] = n
		e.startDaemon(n)
		args := append([]string{"up", "--authkey", e.key("--tags", "tag:"+tag), "--coordinator", e.coordURL, "--hostname", name}, extra...)
		if out, err := e.cli(n, args...); err != nil {
			t.Fatalf("meshd up %s: %v\n%s", name, err, out)
		}
	}
	ping := func(from string, to netip.Addr, timeout time.Duration) error {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		return hosts[from].Ping(ctx, to)
	}
	e.waitPeers(nodes["eu"], "router")
	waitFor(t, 20*time.Second, "eu pings the plain host through its via router", func() (bool, string) {
		err := ping("eu", plainIP, 2*time.Second)
		return err == nil, fmt.Sprint(err)
	})

	e.waitPeers(nodes["us"], "router")
	var routerIP netip.Addr
	for _, p := range e.status(nodes["us"]).Peers {
		if p.Hostname == "router" {
			routerIP = p.IPs[0]
		}
	}
	waitFor(t, 20*time.Second, "us pings the router itself", func() (bool, string) {
		err := ping("us", routerIP, 2*time.Second)
		return err == nil, fmt.Sprint(err)
	})
	if out := hosts["us"].MustRun("ip", "route", "show", "table", "5270"); !strings.Contains(out, "198.19.77.0/24") {
		t.Fatalf("us does not route the subnet to the router, so the test proves nothing:\n%s", out)
	}
	if err := ping("us", plainIP, 3*time.Second); err == nil {
		t.Fatal("a client whose grant names another router reached the subnet through this one")
	}
}
