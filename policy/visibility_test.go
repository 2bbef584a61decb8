package policy

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"meshd.dev/meshd/netmap"
)

// TestVisibilityKey: policies that differ only in what a filter says about
// packets keep the key; any change to who may reach whom changes it.
func TestVisibilityKey(t *testing.T) {
	const base = `{"src": ["group:eng"], "dst": ["tag:srv"], "ip": ["tcp:22"]},
		{"src": ["tag:srv"], "dst": ["db"], "ip": ["tcp:5432"]}`
	pol := func(grants string, groups ...string) string {
		g := `"group:eng": ["alice@example.com"]`
		if len(groups) > 0 {
			g = groups[0]
		}
		return `{"groups": {` + g + `}, "hosts": {"db": "100.64.0.4", "lan": "10.1.0.0/24"},
			"tagOwners": {"tag:srv": [], "tag:other": [], "tag:router": []},
			"grants": [` + grants + `]}`
	}
	tests := []struct {
		name  string
		other string
		same  bool
	}{
		{"identical", pol(base), true},
		{"other ports", pol(`{"src": ["group:eng"], "dst": ["tag:srv"], "ip": ["tcp:80", "tcp:443"]},
			{"src": ["tag:srv"], "dst": ["db"], "ip": ["tcp:5433"]}`), true},
		{"other protocols", pol(`{"src": ["group:eng"], "dst": ["tag:srv"], "ip": ["udp:22"]},
			{"src": ["tag:srv"], "dst": ["db"], "ip": ["*"]}`), true},
		{"rules reordered", pol(`{"src": ["tag:srv"], "dst": ["db"], "ip": ["tcp:5432"]},
			{"src": ["group:eng"], "dst": ["tag:srv"], "ip": ["tcp:22"]}`), true},
		{"a rule repeated", pol(base + `, {"src": ["group:eng"], "dst": ["tag:srv"], "ip": ["tcp:9"]}`), true},
		{"an app grant beside", pol(base + `, {"src": ["group:eng"], "dst": ["tag:srv"], "app": {"example.com/cap/x": [{}]}}`), true},
		{"a group named by its member", pol(`{"src": ["alice@example.com"], "dst": ["tag:srv"], "ip": ["tcp:22"]},
			{"src": ["tag:srv"], "dst": ["db"], "ip": ["tcp:5432"]}`), true},
		{"another source", pol(`{"src": ["autogroup:member"], "dst": ["tag:srv"], "ip": ["tcp:22"]},
			{"src": ["tag:srv"], "dst": ["db"], "ip": ["tcp:5432"]}`), false},
		{"another destination", pol(`{"src": ["group:eng"], "dst": ["tag:other"], "ip": ["tcp:22"]},
			{"src": ["tag:srv"], "dst": ["db"], "ip": ["tcp:5432"]}`), false},
		{"a rule fewer", pol(`{"src": ["group:eng"], "dst": ["tag:srv"], "ip": ["tcp:22"]}`), false},
		{"a group's members", pol(base, `"group:eng": ["bob@example.com"]`), false},
		{"a host's address", strings.Replace(pol(base), `"db": "100.64.0.4"`, `"db": "100.64.0.5"`, 1), false},
		{"via", pol(`{"src": ["group:eng"], "dst": ["tag:srv"], "ip": ["tcp:22"]},
			{"src": ["tag:srv"], "dst": ["lan"], "ip": ["tcp:5432"], "via": ["tag:router"]}`), false},
		{"via another router", pol(`{"src": ["group:eng"], "dst": ["tag:srv"], "ip": ["tcp:22"]},
			{"src": ["tag:srv"], "dst": ["lan"], "ip": ["tcp:5432"], "via": ["tag:other"]}`), false},
	}
	a := NewEngine(mustParse(t, pol(base)))
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := NewEngine(mustParse(t, tt.other))
			if same := a.VisibilityKey() == b.VisibilityKey(); same != tt.same {
				t.Fatalf("same key = %v; want %v", same, tt.same)
			}
			if tt.same {
				samePeers(t, newFleet().all, a, b)
			}
		})
	}
	via := `{"src": ["tag:srv"], "dst": ["lan"], "ip": ["tcp:1"], "via": ["tag:router"]}`
	if x, y := NewEngine(mustParse(t, pol(via))), NewEngine(mustParse(t, pol(strings.Replace(via, "tcp:1", "tcp:2", 1)))); x.VisibilityKey() != y.VisibilityKey() {
		t.Fatal("a via grant's ports changed its key")
	}
}

// samePeers fails unless a and b, indexed over nodes, answer CanSee and
// Peers alike for every node.
func samePeers(t *testing.T, nodes []*netmap.Node, a, b *Engine) {
	t.Helper()
	a.SetNodes(nodes)
	b.SetNodes(nodes)
	for _, x := range nodes {
		if pa, pb := a.Peers(x), b.Peers(x); !slices.Equal(pa, pb) {
			t.Fatalf("same visibility key, but node %d's peers are %v under one and %v under the other", x.ID, pa, pb)
		}
		for _, y := range nodes {
			if a.CanSee(x, y) != b.CanSee(x, y) {
				t.Fatalf("same visibility key, but CanSee(%d, %d) differs", x.ID, y.ID)
			}
		}
	}
}

func TestGrantsCapabilities(t *testing.T) {
	for _, tt := range []struct {
		grants string
		want   bool
	}{
		{`{"src": ["*"], "dst": ["*"], "ip": ["*"]}`, false},
		{`{"src": ["*"], "dst": ["tag:srv"], "app": {"example.com/cap/x": [{}]}}`, true},
	} {
		e := NewEngine(mustParse(t, fleetHeader+`"grants": [`+tt.grants+`]}`))
		if got := e.GrantsCapabilities(); got != tt.want {
			t.Errorf("%s: GrantsCapabilities() = %v; want %v", tt.grants, got, tt.want)
		}
		e.SetNodes(newFleet().all)
		has := false
		for _, n := range newFleet().all {
			for _, r := range e.FilterFor(n, nil) {
				has = has || len(r.CapGrants) > 0
			}
		}
		if has && !tt.want {
			t.Errorf("%s: a filter grants capabilities, but GrantsCapabilities() = false", tt.grants)
		}
	}
}

// FuzzVisibilityKey: any two policies with the same visibility key give
// every node of a fleet covering every identity kind the same peers.
func FuzzVisibilityKey(f *testing.F) {
	f.Add([]byte{0, 3, 1}, []byte{0, 3, 2})
	f.Add([]byte{1, 6, 0, 4, 11, 3}, []byte{4, 11, 1, 1, 6, 2})
	f.Add([]byte{2, 12, 0}, []byte{9, 12, 5})
	f.Add([]byte{7, 13, 1}, []byte{7, 13, 4})
	sels := []string{"*", "alice@example.com", "group:eng", "tag:srv", "tag:other", "autogroup:member",
		"autogroup:tagged", "db", "100.64.0.3", "10.1.0.0/24", "group:empty", "tag:router", "autogroup:self", "lan"}
	ips := []string{`"ip": ["*"]`, `"ip": ["tcp:22"]`, `"ip": ["tcp:80", "udp:53"]`,
		`"app": {"example.com/cap/x": [{}]}`, `"ip": ["tcp:22"], "via": ["tag:router"]`, `"ip": ["icmp:*"]`}
	policyOf := func(b []byte) string {
		var grants []string
		for i := 0; i+2 < len(b) && len(grants) < 6; i += 3 {
			src, dst := sels[int(b[i])%len(sels)], sels[int(b[i+1])%len(sels)]
			grants = append(grants, fmt.Sprintf(`{"src": [%q], "dst": [%q], %s}`, src, dst, ips[int(b[i+2])%len(ips)]))
		}
		return fleetHeader + `"grants": [` + strings.Join(grants, ",") + `]}`
	}
	f.Fuzz(func(t *testing.T, x, y []byte) {
		px, err1 := Parse("x.hujson", []byte(policyOf(x)))
		py, err2 := Parse("y.hujson", []byte(policyOf(y)))
		if err1 != nil || err2 != nil {
			return // a combination the policy language refuses
		}
		a, b := NewEngine(px), NewEngine(py)
		if a.VisibilityKey() == b.VisibilityKey() {
			samePeers(t, newFleet().all, a, b)
		}
	})
}
