package control

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
	"meshd.dev/meshd/policy"
)

// abPolicy lets tag:a nodes reach each other; tag:b nodes see nobody.
const abPolicy = `// tag:a is a closed group
{
	"tagOwners": {"tag:a": [], "tag:b": []},
	"grants": [{"src": ["tag:a"], "dst": ["tag:a"], "ip": ["*"]}],
}
`

// bcPolicy swaps the groups: tag:a reaches tag:b, on 22 only.
const bcPolicy = `{
	"tagOwners": {"tag:a": [], "tag:b": []},
	"grants": [{"src": ["tag:a"], "dst": ["tag:b"], "ip": ["tcp:22"]}],
	"tests": [{"src": "tag:a", "accept": ["tag:b:22"], "deny": ["tag:b:80", "tag:a:22"]}],
}
`

func adminClient(t testing.TB, ts *testServer) *AdminClient {
	t.Helper()
	tok, err := readFile(ts.AdminTokenPath())
	if err != nil {
		t.Fatal(err)
	}
	ac, err := NewAdminClient(ts.url, tok)
	if err != nil {
		t.Fatal(err)
	}
	return ac
}

func TestBootstrapPolicyText(t *testing.T) {
	p, err := policy.Parse("bootstrap", []byte(BootstrapPolicyText))
	if err != nil {
		t.Fatalf("BootstrapPolicyText does not parse: %v", err)
	}
	wide := false
	for _, pr := range p.Lint() {
		wide = wide || strings.Contains(pr.Msg, "wide") || strings.Contains(pr.Msg, "every")
	}
	if !wide {
		t.Errorf("lint does not flag the bootstrap text as a wide rule: %v", p.Lint())
	}
	diff := policy.Diff(policy.Bootstrap(), p)
	if len(diff.Opened) != 0 || len(diff.Closed) != 0 {
		t.Errorf("BootstrapPolicyText differs from the bootstrap default: %+v", diff)
	}
}

func TestAdminPolicySetGetReject(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	ctx := context.Background()
	ac := adminClient(t, ts)

	got, err := ac.Policy(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !got.Bootstrap || got.Text != BootstrapPolicyText {
		t.Fatalf("fresh coordinator: policy %+v, want the bootstrap default", got)
	}

	ka := ts.key(t, AuthKeyOptions{Tags: []string{"tag:a"}, Reusable: true})
	kb := ts.key(t, AuthKeyOptions{Tags: []string{"tag:b"}, Reusable: true})
	a1, a2, b1 := newTestNode(t, ts.url, ""), newTestNode(t, ts.url, ""), newTestNode(t, ts.url, "")
	a1.mustRegister(t, ka, "a1")
	a2.mustRegister(t, ka, "a2")
	b1.mustRegister(t, kb, "b1")
	for _, n := range []*testNode{a1, a2, b1} {
		n.follow(t, n.mapRequest())
	}
	for _, n := range []*testNode{a1, a2, b1} {
		n.waitMap(t, "everyone under bootstrap", func(m *netmap.NetworkMap) bool { return m.PolicyBootstrap && len(m.Peers) == 2 })
	}

	info, err := ac.SetPolicy(ctx, "/some/dir/ab.hujson", []byte(abPolicy))
	if err != nil {
		t.Fatal(err)
	}
	if info.Bootstrap || info.File != "ab.hujson" || info.Rules != 1 || info.ConnectedNodes != 3 || info.Text != abPolicy {
		t.Fatalf("set answered %+v", info)
	}
	a1.waitMap(t, "only a2", func(m *netmap.NetworkMap) bool {
		return !m.PolicyBootstrap && slices.Equal(peerIDs(m), []netmap.NodeID{a2.id})
	})
	b1.waitMap(t, "nobody", func(m *netmap.NetworkMap) bool {
		return len(m.Peers) == 0 && m.PacketFilter != nil && len(m.PacketFilter) == 0
	})
	if got, err := ac.Policy(ctx); err != nil || got.Text != abPolicy || got.File != "ab.hujson" || got.SHA256 != info.SHA256 || got.Bootstrap {
		t.Fatalf("get after set: %+v, %v", got, err)
	}

	// Every kind of bad policy is refused with FILE:LINE:COL (base name
	// only) and leaves ab.hujson in force.
	bad := []struct {
		name, src, want string
	}{
		{"syntax", "{\n\t\"grants\": [\n}", "bad.hujson:3:"},
		{"unknown group", "{\n\t\"grants\": [{\"src\": [\"group:nope\"], \"dst\": [\"*\"], \"ip\": [\"*\"]}],\n}", "bad.hujson:2:"},
		{"tag without owner", "{\n\t\"grants\": [{\"src\": [\"tag:x\"], \"dst\": [\"*\"], \"ip\": [\"*\"]}],\n}", "bad.hujson:2:"},
		{"failing test", "{\n\t\"tagOwners\": {\"tag:a\": []},\n\t\"tests\": [{\"src\": \"tag:a\", \"accept\": [\"tag:a:22\"]}],\n}", "bad.hujson:3:"},
		{"too large", strings.Repeat(" ", policy.MaxSize+1), "bad.hujson:1:1: policy is larger than"},
	}
	for _, tc := range bad {
		_, err := ac.SetPolicy(ctx, "/secret/path/bad.hujson", []byte(tc.src))
		if !errors.Is(err, controlclient.ErrPolicyInvalid) {
			t.Fatalf("%s: error %v, want controlclient.ErrPolicyInvalid", tc.name, err)
		}
		if msg := err.Error(); !strings.HasPrefix(msg, tc.want) || strings.Contains(msg, "/secret/path") {
			t.Errorf("%s: message %q, want it to start with %q and name only the base name", tc.name, msg, tc.want)
		}
		if cur := ts.CurrentPolicy(); cur.SHA256 != info.SHA256 {
			t.Fatalf("%s: the rejected policy replaced the one in force: %+v", tc.name, cur)
		}
	}
	// Still in force for the data plane: a new tag:b node stays invisible
	// to a1, a new tag:a node shows up.
	a3, b2 := newTestNode(t, ts.url, ""), newTestNode(t, ts.url, "")
	b2.mustRegister(t, kb, "b2")
	a3.mustRegister(t, ka, "a3")
	a1.waitMap(t, "a3 but not b2", func(m *netmap.NetworkMap) bool {
		return slices.Equal(peerIDs(m), []netmap.NodeID{a2.id, a3.id})
	})

	// Up to the limit is fine: a 3 MiB file (mostly comment) goes through
	// the admin API and comes back byte for byte.
	big := abPolicy + "// " + strings.Repeat("x", 3<<20) + "\n"
	if _, err := ac.SetPolicy(ctx, "big.hujson", []byte(big)); err != nil {
		t.Fatalf("3 MiB policy: %v", err)
	}
	if got, err := ac.Policy(ctx); err != nil || got.Text != big {
		t.Fatalf("get of the 3 MiB policy: %d bytes, %v", len(got.Text), err)
	}

	// A second good policy turns a1->a2 off and a1->b1 on, filters too.
	if _, err := ac.SetPolicy(ctx, "bc.hujson", []byte(bcPolicy)); err != nil {
		t.Fatal(err)
	}
	a1.waitMap(t, "b1 and b2, no a peers", func(m *netmap.NetworkMap) bool {
		return slices.Equal(peerIDs(m), []netmap.NodeID{b1.id, b2.id}) && len(m.PacketFilter) == 0
	})
	b1.waitMap(t, "a1, a2, a3 as sources on port 22", func(m *netmap.NetworkMap) bool {
		if len(m.Peers) != 3 || len(m.PacketFilter) == 0 {
			return false
		}
		for _, r := range m.PacketFilter {
			for _, d := range r.DstPorts {
				if d.Ports != (netmap.PortRange{First: 22, Last: 22}) {
					return false
				}
			}
		}
		return slices.Contains(m.PacketFilter[0].SrcIPs, a1.self.Addresses[0])
	})
}

func TestPolicySurvivesRestartAndFlagPrecedence(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	ts := startServer(t, ServerOptions{StateDir: dir})
	if _, err := ts.ApplyPolicy(ctx, "ab.hujson", []byte(abPolicy)); err != nil {
		t.Fatal(err)
	}
	k := ts.key(t, AuthKeyOptions{Tags: []string{"tag:b"}, Reusable: true})
	ts.stop(t)

	// Restart without --policy: the stored one is in force, before any
	// node connects.
	ts = startServerAt(t, ServerOptions{StateDir: dir}, "127.0.0.1:0")
	if cur := ts.CurrentPolicy(); cur.Bootstrap || cur.Text != abPolicy || cur.File != "ab.hujson" {
		t.Fatalf("after restart: %+v", cur)
	}
	n := newTestNode(t, ts.url, "")
	n.mustRegister(t, k, "b")
	n.follow(t, n.mapRequest())
	n.waitMap(t, "a map under the stored policy", func(m *netmap.NetworkMap) bool {
		return !m.PolicyBootstrap && m.PacketFilter != nil && len(m.PacketFilter) == 0
	})
	ts.stop(t)

	// --policy wins over the stored one and is stored.
	ts = startServerAt(t, ServerOptions{StateDir: dir, Policy: []byte(bcPolicy), PolicyFile: "/etc/meshd/bc.hujson"}, "127.0.0.1:0")
	if cur := ts.CurrentPolicy(); cur.Text != bcPolicy || cur.File != "bc.hujson" {
		t.Fatalf("with --policy: %+v", cur)
	}
	ts.stop(t)

	// An invalid --policy refuses to start, names the problem, and
	// leaves the stored policy alone.
	_, err := NewServer(ctx, ServerOptions{StateDir: dir, Logger: testLogger(t), Policy: []byte("{\"acls\": 7}"), PolicyFile: "broken.hujson"})
	var pe *PolicyError
	if !errors.As(err, &pe) || len(pe.Problems) == 0 || !strings.HasPrefix(pe.Problems[0], "broken.hujson:1:") {
		t.Fatalf("invalid --policy: %v, want a PolicyError at broken.hujson:1:", err)
	}
	ts = startServerAt(t, ServerOptions{StateDir: dir}, "127.0.0.1:0")
	if cur := ts.CurrentPolicy(); cur.Text != bcPolicy {
		t.Fatalf("after a refused --policy: %+v, want bc.hujson still", cur)
	}
}

const ownersPolicy = `{
	"groups": {"group:ops": ["carol@example.com"]},
	"tagOwners": {
		"tag:dev":   ["alice@example.com"],
		"tag:ops":   ["group:ops"],
		"tag:ci":    [],
		"tag:build": ["tag:ci"],
		"tag:prod":  [],
	},
	"grants": [{"src": ["tag:dev", "alice@example.com"], "dst": ["tag:dev"], "ip": ["*"]}],
}`

func TestTagOwnersEnforced(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	ctx := context.Background()
	if _, err := ts.ApplyPolicy(ctx, "owners.hujson", []byte(ownersPolicy)); err != nil {
		t.Fatal(err)
	}
	userKey := func(login string) string { return ts.key(t, AuthKeyOptions{User: login, Reusable: true}) }
	ciKey := ts.key(t, AuthKeyOptions{Tags: []string{"tag:ci"}, Reusable: true})
	tests := []struct {
		name    string
		key     string
		request []string
		ok      bool
	}{
		{"user owns tag", userKey("alice@example.com"), []string{"tag:dev"}, true},
		{"user owns tag, mixed case", userKey("Alice@Example.com"), []string{"tag:DEV"}, true},
		{"other user", userKey("bob@example.com"), []string{"tag:dev"}, false},
		{"group member", userKey("carol@example.com"), []string{"tag:ops"}, true},
		{"group member, tag of another owner", userKey("carol@example.com"), []string{"tag:ops", "tag:dev"}, false},
		{"tag owns tag", ciKey, []string{"tag:build"}, true},
		{"key's own tag", ciKey, []string{"tag:ci"}, true},
		{"empty owners: only admin keys", ciKey, []string{"tag:prod"}, false},
		{"undefined tag", userKey("alice@example.com"), []string{"tag:nope"}, false},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			n := newTestNode(t, ts.url, "")
			_, err := n.register(ctx, tc.key, fmt.Sprintf("n%d", i), tc.request...)
			if tc.ok && err != nil {
				t.Fatalf("refused: %v", err)
			}
			if !tc.ok {
				wantErr(t, err, controlclient.ErrTagsForbidden)
			}
		})
	}

	// The admin applies any tag the policy defines, never an undefined one.
	if _, _, err := ts.CreateAuthKey(ctx, AuthKeyOptions{Tags: []string{"tag:nope"}}); !errors.Is(err, controlclient.ErrTagsForbidden) {
		t.Fatalf("key with an undefined tag: %v", err)
	}
	alice, dev := newTestNode(t, ts.url, ""), newTestNode(t, ts.url, "")
	ra := alice.mustRegister(t, userKey("alice@example.com"), "alice-laptop")
	if _, err := dev.register(ctx, userKey("alice@example.com"), "dev", "tag:dev"); err != nil {
		t.Fatal(err)
	}
	alice.follow(t, alice.mapRequest())
	dev.follow(t, dev.mapRequest())
	alice.waitMap(t, "alice reaches tag:dev", hasPeer(dev.id))
	wantErr(t, ts.TagNode(ctx, alice.id, []string{"tag:nope"}), controlclient.ErrTagsForbidden)
	if err := ts.TagNode(ctx, alice.id, []string{"tag:prod"}); err != nil {
		t.Fatal(err)
	}
	// Re-tagged: a service now, it loses alice's access (tag:prod reaches
	// nothing) and keeps its addresses.
	m := alice.waitMap(t, "tagged alice sees nobody", func(m *netmap.NetworkMap) bool {
		return slices.Equal(m.Self.Tags, []string{"tag:prod"}) && len(m.Peers) == 0
	})
	if !slices.Equal(m.Self.Addresses, ra.Node.Addresses) {
		t.Fatalf("addresses after re-tag %v, before %v", m.Self.Addresses, ra.Node.Addresses)
	}
	nodes, err := ts.Nodes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		if n.ID == alice.id && (!slices.Equal(n.Addresses, ra.Node.Addresses) || n.User != "") {
			t.Fatalf("stored node after re-tag: %+v", n.Node)
		}
	}
	dev.waitMap(t, "dev no longer sees the re-tagged node", func(m *netmap.NetworkMap) bool { return m.Peers[alice.id] == nil })
}

// TestSetPolicyPeerListsMatchCanSee checks the indexed paths (PeerLister)
// of a policy change and of a full map against a CanSee per pair, through
// engine -> engine, engine -> bootstrap and bootstrap -> engine changes.
func TestSetPolicyPeerListsMatchCanSee(t *testing.T) {
	h := newHub("e1", nil, 0, func() time.Time { return time.Unix(0, 0) })
	const n = 40
	for id := netmap.NodeID(1); id <= n; id++ {
		h.upsert(hubNode(id, fmt.Sprintf("tag:tenant%d", int(id)%5)))
	}
	type sub struct {
		s *session
		m *netmap.NetworkMap
	}
	subs := map[netmap.NodeID]sub{}
	for id := netmap.NodeID(1); id <= n; id += 3 {
		s, m := subscribeMap(t, h, id)
		subs[id] = sub{s, m}
	}
	cross := `{"tagOwners": {"tag:tenant0": [], "tag:tenant1": [], "tag:tenant2": [], "tag:tenant3": [], "tag:tenant4": []},
		"grants": [{"src": ["tag:tenant1"], "dst": ["tag:tenant2"], "ip": ["22"]}, {"src": ["tag:tenant3"], "dst": ["tag:tenant3"], "ip": ["*"]}]}`
	steps := []struct {
		name string
		pol  Policy
	}{
		{"tenants", mustEngine(t, tenantPolicy(5))},
		{"cross", mustEngine(t, cross)},
		{"bootstrap", nil},
		{"tenants again", mustEngine(t, tenantPolicy(5))},
	}
	for _, st := range steps {
		h.setPolicy(st.pol)
		for id, sb := range subs {
			drain(t, sb.s, sb.m)
			var want []netmap.NodeID
			for _, o := range h.allLocked() {
				if o.ID != id && h.policy.CanSee(h.nodes[id], o) {
					want = append(want, o.ID)
				}
			}
			if got := peerIDs(sb.m); !slices.Equal(got, want) {
				t.Fatalf("%s: node %d sees %v, CanSee says %v", st.name, id, got, want)
			}
			// A full map (new stream) lists the same peers.
			h.mu.Lock()
			full := h.fullLocked(h.nodes[id])
			h.mu.Unlock()
			fm := &netmap.NetworkMap{}
			if err := fm.Apply(decodeMsg(t, full)); err != nil {
				t.Fatal(err)
			}
			if got := peerIDs(fm); !slices.Equal(got, want) {
				t.Fatalf("%s: node %d's full map lists %v, CanSee says %v", st.name, id, got, want)
			}
		}
	}
}

// TestSetPolicyQuietForUnaffectedNodes: a policy change sends frames only to
// nodes whose peers, filter or bootstrap state change.
func TestSetPolicyQuietForUnaffectedNodes(t *testing.T) {
	h := newHub("e1", nil, 0, time.Now)
	for id := netmap.NodeID(1); id <= 6; id++ {
		h.upsert(hubNode(id, fmt.Sprintf("tag:tenant%d", int(id)%3)))
	}
	sessions := map[netmap.NodeID]*session{}
	maps := map[netmap.NodeID]*netmap.NetworkMap{}
	for id := netmap.NodeID(1); id <= 6; id++ {
		sessions[id], maps[id] = subscribeMap(t, h, id)
	}
	h.setPolicy(mustEngine(t, tenantPolicy(3)))
	for id, s := range sessions {
		if n := drain(t, s, maps[id]); n == 0 {
			t.Fatalf("bootstrap -> tenants: node %d got no update", id)
		}
	}
	// Same rules, new engine: nothing to say to anyone.
	h.setPolicy(mustEngine(t, tenantPolicy(3)))
	for id, s := range sessions {
		if n := drain(t, s, maps[id]); n != 0 {
			t.Fatalf("identical policy: node %d got %d frames", id, n)
		}
	}
	// tenant0 may now also reach tenant1: tenants 0 and 1 hear about it
	// (nodes 3, 6 and 1, 4), tenant2 (nodes 2, 5) does not.
	wider := tenantPolicy(3)
	wider = strings.Replace(wider, `"grants": [`, `"grants": [{"src": ["tag:tenant0"], "dst": ["tag:tenant1"], "ip": ["22"]},`, 1)
	h.setPolicy(mustEngine(t, wider))
	for id, s := range sessions {
		n := drain(t, s, maps[id])
		if affected := id%3 != 2; affected != (n > 0) {
			t.Fatalf("tenant0 -> tenant1 added: node %d got %d frames (affected %v)", id, n, affected)
		}
	}
	if got := peerIDs(maps[1]); !slices.Equal(got, []netmap.NodeID{3, 4, 6}) {
		t.Fatalf("node 1 (tenant1) sees %v, want its tenant (4) and tenant0 (3, 6)", got)
	}
}
