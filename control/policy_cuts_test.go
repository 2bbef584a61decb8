package control

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
	"meshd.dev/meshd/policy"
)

// cutsBefore: engineers reach web on 22 and 443 and the database; web
// reaches the database.
const cutsBefore = `{
	"groups": {"group:eng": ["alice@example.com"]},
	"tagOwners": {"tag:web": [], "tag:db": []},
	"grants": [
		{"src": ["group:eng"], "dst": ["tag:web"], "ip": ["tcp:22", "tcp:443"]},
		{"src": ["group:eng"], "dst": ["tag:db"], "ip": ["tcp:5432"]},
		{"src": ["tag:web"], "dst": ["tag:db"], "ip": ["tcp:5432"]},
	],
}
`

// cutsAfter takes SSH to web and the database away from engineers.
const cutsAfter = `{
	"groups": {"group:eng": ["alice@example.com"]},
	"tagOwners": {"tag:web": [], "tag:db": []},
	"grants": [
		{"src": ["group:eng"], "dst": ["tag:web"], "ip": ["tcp:443"]},
		{"src": ["tag:web"], "dst": ["tag:db"], "ip": ["tcp:5432"]},
	],
}
`

// TestPolicyCuts: the coordinator lists, for the nodes connected now, the
// access a proposed policy removes (and nothing it keeps, nothing for a
// node that is not connected), changes nothing, refuses an invalid
// proposal, and answers only an admin.
func TestPolicyCuts(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	ctx := context.Background()
	ac := adminClient(t, ts)
	if _, err := ac.SetPolicy(ctx, "before.hujson", []byte(cutsBefore)); err != nil {
		t.Fatal(err)
	}
	join := func(host string, o AuthKeyOptions, online bool) *testNode {
		n := newTestNode(t, ts.url, "")
		o.Preauthorized = true
		n.mustRegister(t, ts.key(t, o), host)
		if online {
			n.follow(t, n.mapRequest())
		}
		return n
	}
	alice := join("alice-laptop", AuthKeyOptions{User: "alice@example.com"}, true)
	web := join("web-1", AuthKeyOptions{Tags: []string{"tag:web"}}, true)
	db := join("db-1", AuthKeyOptions{Tags: []string{"tag:db"}}, true)
	join("db-2", AuthKeyOptions{Tags: []string{"tag:db"}}, false) // registered, never connected
	waitFor(t, "three nodes online", func() bool {
		ns, err := ts.Nodes(ctx)
		online := 0
		for _, n := range ns {
			if n.Online {
				online++
			}
		}
		return err == nil && online == 3
	})

	rep, err := ac.PolicyCuts(ctx, "after.hujson", []byte(cutsAfter))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, c := range rep.Cuts {
		got = append(got, c.String())
	}
	aliceIP, webIP, dbIP := alice.self.Addresses[0].Addr(), web.self.Addresses[0].Addr(), db.self.Addresses[0].Addr()
	want := []string{
		"alice-laptop (" + aliceIP.String() + ") -> db-1 (" + dbIP.String() + ") tcp:5432  [before.hujson:6]",
		"alice-laptop (" + aliceIP.String() + ") -> web-1 (" + webIP.String() + ") tcp:22  [before.hujson:5]",
	}
	if !slices.Equal(got, want) || rep.Total != 2 || rep.Connected != 3 || rep.From != "before.hujson" || rep.To != "after.hujson" {
		t.Fatalf("cuts from %s to %s, %d connected:\n%s\nwant (3 connected):\n%s", rep.From, rep.To, rep.Connected,
			strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

	// Nothing changed: the policy in force is still the first.
	if cur, err := ac.Policy(ctx); err != nil || cur.File != "before.hujson" {
		t.Fatalf("policy in force after the comparison: %q, %v", cur.File, err)
	}
	// The reverse change cuts nothing.
	if _, err := ac.SetPolicy(ctx, "after.hujson", []byte(cutsAfter)); err != nil {
		t.Fatal(err)
	}
	if rep, err := ac.PolicyCuts(ctx, "before.hujson", []byte(cutsBefore)); err != nil || len(rep.Cuts) != 0 {
		t.Fatalf("widening cuts %v, %v; want none", rep.Cuts, err)
	}

	// An invalid proposal is refused with its problems.
	_, err = ac.PolicyCuts(ctx, "bad.hujson", []byte(`{"grants": [{"src": ["group:nope"], "dst": ["*"], "ip": ["*"]}]}`))
	if !errors.Is(err, controlclient.ErrPolicyInvalid) || !strings.Contains(err.Error(), "bad.hujson:1:") {
		t.Fatalf("invalid proposal: %v; want policy_invalid with its position", err)
	}
	// Only an admin may ask: the answer maps who may reach whom.
	intruder, err := NewAdminClient(ts.url, "msadm-"+strings.Repeat("c", 32)+"-"+ts.Fingerprint())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := intruder.PolicyCuts(ctx, "after.hujson", []byte(cutsAfter)); !errors.Is(err, controlclient.ErrUnauthorized) {
		t.Fatalf("without the admin token: %v; want unauthorized", err)
	}
}

// BenchmarkPolicyCuts is the live comparison at its node cap: half the
// nodes are engineers' laptops, half inference servers; the change takes
// SSH away from every engineer, so every laptop-server pair is a cut.
func BenchmarkPolicyCuts(b *testing.B) {
	for _, n := range []int{200, maxCutNodes} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			var users []string
			nodes := make([]*netmap.Node, n)
			for i := range nodes {
				nodes[i] = benchNode(netmap.NodeID(i + 1))
				if i%2 == 0 {
					nodes[i].Tags, nodes[i].User = nil, fmt.Sprintf("u%d@example.com", i)
					users = append(users, fmt.Sprintf("%q", nodes[i].User))
				} else {
					nodes[i].Tags = []string{"tag:gpu"}
				}
			}
			pol := func(ports string) *policy.Policy {
				src := fmt.Sprintf(`{"groups": {"group:eng": [%s]}, "tagOwners": {"tag:gpu": [], "tag:prod": []},
					"grants": [{"src": ["group:eng"], "dst": ["tag:gpu"], "ip": [%s]}]}`, strings.Join(users, ", "), ports)
				p, err := policy.Parse("bench.hujson", []byte(src))
				if err != nil {
					b.Fatal(err)
				}
				return p
			}
			before, after := pol(`"tcp:22", "tcp:8000"`), pol(`"tcp:8000"`)
			var cuts []PolicyCut
			var total int
			for b.Loop() {
				var err error
				if cuts, total, err = computeCuts(context.Background(), before, after, nodes, nodes, maxListedCuts); err != nil {
					b.Fatal(err)
				}
			}
			if want := (n / 2) * (n / 2); total != want || len(cuts) != min(want, maxListedCuts) {
				b.Fatalf("%d cuts of %d, want %d", len(cuts), total, want)
			}
		})
	}
}
