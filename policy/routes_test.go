package policy

import (
	"net/netip"
	"testing"

	"meshd.dev/meshd/netmap"
)

func TestAutoApproves(t *testing.T) {
	e := NewEngine(mustParse(t, `{
	"groups": {"group:net": ["alice@example.com"]},
	"tagOwners": {"tag:router": [], "tag:exit": [], "tag:other": []},
	"autoApprovers": {
		"routes": {"10.0.0.0/8": ["tag:router"], "192.168.0.0/16": ["group:net"]},
		"exitNode": ["tag:exit"],
	},
}`))
	router := &netmap.Node{ID: 1, Tags: []string{"tag:router"}}
	exit := &netmap.Node{ID: 2, Tags: []string{"tag:exit"}}
	alice := &netmap.Node{ID: 3, User: "alice@example.com"}
	aliceTagged := &netmap.Node{ID: 4, User: "alice@example.com", Tags: []string{"tag:other"}}
	for _, tc := range []struct {
		name  string
		n     *netmap.Node
		route string
		want  bool
	}{
		{"inside the prefix", router, "10.1.0.0/24", true},
		{"the prefix itself", router, "10.0.0.0/8", true},
		{"wider than the prefix", router, "10.0.0.0/7", false},
		{"outside", router, "172.16.0.0/12", false},
		{"exit route, not an exit approver", router, "0.0.0.0/0", false},
		{"exit approver", exit, "::/0", true},
		{"exit approver, subnet", exit, "10.1.0.0/24", false},
		{"group member", alice, "192.168.1.0/24", true},
		{"tagged device of a group member", aliceTagged, "192.168.1.0/24", false},
	} {
		if got := e.AutoApproves(tc.n, netip.MustParsePrefix(tc.route)); got != tc.want {
			t.Errorf("%s: AutoApproves(%v) = %v, want %v", tc.name, tc.route, got, tc.want)
		}
	}
}
