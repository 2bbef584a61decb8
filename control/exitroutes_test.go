package control

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"testing"

	"meshd.dev/meshd/netmap"
)

// TestExitRoutesPerViewer: an exit node's default routes are in a peer's
// AllowedIPs (and PrimaryRoutes) only for the clients the policy grants
// autogroup:internet through it: "*" is not exit node use, and a "via"
// grant gives only the exit nodes it names. A policy change granting or
// revoking it updates an exit node's entry for a client that sees it
// either way.
func TestExitRoutesPerViewer(t *testing.T) {
	ts := startServer(t, ServerOptions{clock: newClock()}) // silent-router checks never fire
	ctx := context.Background()
	policy := func(eveInternet bool) string {
		extra := ""
		if eveInternet {
			extra = `{"src": ["tag:eve"], "dst": ["autogroup:internet"], "ip": ["*"]},`
		}
		return fmt.Sprintf(`{
		"tagOwners": {"tag:exit": [], "tag:exit-eu": [], "tag:web": [], "tag:eve": [], "tag:eu": []},
		"grants": [
			{"src": ["tag:web"], "dst": ["autogroup:internet"], "ip": ["*"]},
			{"src": ["tag:eve"], "dst": ["*"], "ip": ["*"]},
			{"src": ["tag:eu"], "dst": ["autogroup:internet"], "ip": ["*"], "via": ["tag:exit-eu"]},
			%s
		],
		"autoApprovers": {"exitNode": ["tag:exit", "tag:exit-eu"]},
	}`, extra)
	}
	if _, err := ts.ApplyPolicy(ctx, "p.hujson", []byte(policy(false))); err != nil {
		t.Fatal(err)
	}
	key := func(tag string) string {
		return ts.key(t, AuthKeyOptions{Tags: []string{tag}, Preauthorized: true})
	}
	ex, _ := routedNode(t, ts, key("tag:exit"), "ex", "0.0.0.0/0", "::/0")
	exEU, _ := routedNode(t, ts, key("tag:exit-eu"), "ex-eu", "0.0.0.0/0", "::/0")
	web, _ := routedNode(t, ts, key("tag:web"), "web")
	eve, _ := routedNode(t, ts, key("tag:eve"), "eve")
	eu, _ := routedNode(t, ts, key("tag:eu"), "eu")
	exitRoutes := prefixes("0.0.0.0/0", "::/0")

	// routes says how viewer's map has peer: "exit" with its exit routes
	// in AllowedIPs and PrimaryRoutes, "plain" with its addresses only,
	// "absent" not at all.
	routes := func(nm *netmap.NetworkMap, peer *testNode) string {
		p := nm.Peers[peer.id]
		switch {
		case p == nil:
			return "absent"
		case slices.Equal(p.PrimaryRoutes, exitRoutes) && slices.Equal(p.AllowedIPs, append(slices.Clone(p.Addresses), exitRoutes...)):
			return "exit"
		case len(p.PrimaryRoutes) == 0 && slices.Equal(p.AllowedIPs, p.Addresses) && slices.Equal(p.ApprovedRoutes, exitRoutes):
			return "plain"
		}
		return fmt.Sprintf("unexpected %+v", p)
	}
	check := func(what string, viewer *testNode, want map[*testNode]string) {
		t.Helper()
		viewer.waitMap(t, what, func(nm *netmap.NetworkMap) bool {
			for peer, w := range want {
				if routes(nm, peer) != w {
					return false
				}
			}
			return true
		})
	}
	check("web uses both exit nodes", web, map[*testNode]string{ex: "exit", exEU: "exit"})
	check("eve's * is no exit node use", eve, map[*testNode]string{ex: "plain", exEU: "plain"})
	check("eu uses only the via exit node", eu, map[*testNode]string{ex: "absent", exEU: "exit"})

	// A policy change that only grants exit node use changes eve's entries.
	if _, err := ts.ApplyPolicy(ctx, "p.hujson", []byte(policy(true))); err != nil {
		t.Fatal(err)
	}
	check("eve granted autogroup:internet", eve, map[*testNode]string{ex: "exit", exEU: "exit"})
	check("web unchanged", web, map[*testNode]string{ex: "exit", exEU: "exit"})
	if _, err := ts.ApplyPolicy(ctx, "p.hujson", []byte(policy(false))); err != nil {
		t.Fatal(err)
	}
	check("eve's autogroup:internet revoked", eve, map[*testNode]string{ex: "plain", exEU: "plain"})

	// A client joining now gets its full map tailored too.
	eve2, _ := routedNode(t, ts, key("tag:eve"), "eve2")
	check("a new client without exit node use", eve2, map[*testNode]string{ex: "plain", exEU: "plain"})
	// An exit node joining now reaches the connected clients tailored.
	ex2, _ := routedNode(t, ts, key("tag:exit"), "ex2", "0.0.0.0/0", "::/0")
	check("a new exit node, for web", web, map[*testNode]string{ex2: "exit"})
	check("a new exit node, for eve", eve, map[*testNode]string{ex2: "plain"})
	check("a new exit node, for eu", eu, map[*testNode]string{ex2: "absent"})
	// The hub's own node keeps its exit routes: only entries are tailored.
	if n := ts.hub.get(ex.id); !slices.Contains(n.AllowedIPs, netip.MustParsePrefix("0.0.0.0/0")) {
		t.Fatalf("hub's exit node lost its exit routes: %+v", n)
	}
}
