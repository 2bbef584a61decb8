package control

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"

	"meshd.dev/meshd/netmap"
)

// tagOwnerPolicy owns tag:dev by alice, tag:x and tag:ci by nobody (only
// the administrator applies them), and lets alice's devices reach tag:dev.
const tagOwnerPolicy = `{
	"tagOwners": {"tag:dev": ["alice@example.com"], "tag:x": [], "tag:ci": []},
	"grants": [{"src": ["alice@example.com"], "dst": ["tag:dev"], "ip": ["*"]}],
}`

// TestBootstrapTagsRecheckedWhenPolicySet: tags nodes gave themselves under
// the bootstrap default are checked against the owners when a policy is
// set. Those the owner may not hold are removed, logged, returned to the
// admin and told to the node in its map; tags from auth keys and from
// `admin nodes tag` stay.
func TestBootstrapTagsRecheckedWhenPolicySet(t *testing.T) {
	ctx := context.Background()
	var logs logBuffer
	dir := t.TempDir()
	ts := startServer(t, ServerOptions{StateDir: dir, Logger: logs.logger()})
	alice := ts.key(t, AuthKeyOptions{User: "alice@example.com", Reusable: true})
	bob := ts.key(t, AuthKeyOptions{User: "bob@example.com", Reusable: true})
	ci := ts.key(t, AuthKeyOptions{Tags: []string{"tag:ci"}, Reusable: true})
	xKey := ts.key(t, AuthKeyOptions{Tags: []string{"tag:x"}, Reusable: true})

	type node struct {
		*testNode
		key, host string
		asks      []string
		want      []string // tags after the policy
	}
	nodes := []*node{
		{key: alice, host: "laptop", asks: []string{"tag:x"}, want: nil},                   // alice may not hold tag:x
		{key: alice, host: "devbox", asks: []string{"tag:dev"}, want: []string{"tag:dev"}}, // she owns tag:dev
		{key: ci, host: "runner", asks: []string{"tag:x"}, want: []string{"tag:ci"}},       // tag:ci does not own tag:x
		{key: bob, host: "admin-tagged", asks: []string{"tag:dev"}, want: []string{"tag:x"}},
		{key: xKey, host: "keyed", want: []string{"tag:x"}},
	}
	for _, n := range nodes {
		n.testNode = newTestNode(t, ts.url, "")
		if _, err := n.register(ctx, n.key, n.host, n.asks...); err != nil {
			t.Fatalf("%s under bootstrap: %v", n.host, err)
		}
	}
	laptop, devbox, runner, adminTagged := nodes[0], nodes[1], nodes[2], nodes[3]
	if err := ts.TagNode(ctx, adminTagged.id, []string{"tag:x"}); err != nil {
		t.Fatal(err)
	}
	laptop.follow(t, laptop.mapRequest())
	devbox.follow(t, devbox.mapRequest())
	laptop.waitMap(t, "a bootstrap map", func(m *netmap.NetworkMap) bool {
		return m.PolicyBootstrap && slices.Equal(m.Self.Tags, []string{"tag:x"})
	})

	info, err := ts.ApplyPolicy(ctx, "owners.hujson", []byte(tagOwnerPolicy))
	if err != nil {
		t.Fatal(err)
	}
	stored, err := ts.Nodes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		for _, sn := range stored {
			if sn.ID == n.id && !slices.Equal(sn.Tags, n.want) {
				t.Errorf("%s: tags %v after the policy, want %v", n.host, sn.Tags, n.want)
			}
		}
	}
	var removed []string
	for _, r := range info.TagsRemoved {
		removed = append(removed, fmt.Sprintf("%s:%s", r.Hostname, strings.Join(r.Tags, ",")))
		if r.Reason == "" {
			t.Errorf("removal from %s has no reason", r.Hostname)
		}
	}
	if want := []string{"laptop:tag:x", "runner:tag:x"}; !slices.Equal(removed, want) {
		t.Errorf("policy set answer lists removals %v, want %v", removed, want)
	}
	for _, n := range []*node{laptop, runner} {
		if line := grepLine(logs.String(), fmt.Sprintf("removed tags the node gave itself that its owner may not hold under the policy\" node=%d ", n.id)); !strings.Contains(line, "removed=[tag:x]") {
			t.Errorf("no log line for %s's removed tag:\n%s", n.host, logs.String())
		}
	}

	// The node learns why, in its own map: back to alice's device with
	// a user's key expiry, and a notice naming the tag and the reason.
	m := laptop.waitMap(t, "laptop's tags re-checked", func(m *netmap.NetworkMap) bool {
		return !m.PolicyBootstrap && len(m.Self.Tags) == 0
	})
	if m.Self.User != "alice@example.com" || m.Self.KeyExpiry.IsZero() {
		t.Errorf("laptop without tags: user %q, key expiry %v; want alice's device with an expiry", m.Self.User, m.Self.KeyExpiry)
	}
	if len(m.Self.Notices) != 1 || !strings.Contains(m.Self.Notices[0], "tag:x removed by policy owners.hujson") ||
		!strings.Contains(m.Self.Notices[0], "alice@example.com does not own tag") {
		t.Errorf("laptop's notices: %q", m.Self.Notices)
	}
	// Peers never see another node's notices.
	dm := devbox.waitMap(t, "devbox sees the laptop as alice's", func(m *netmap.NetworkMap) bool {
		p := m.Peers[laptop.id]
		return p != nil && p.User == "alice@example.com"
	})
	if p := dm.Peers[laptop.id]; len(p.Notices) != 0 {
		t.Errorf("a peer entry carries the node's notices: %q", p.Notices)
	}

	// A restart under the stored policy removes nothing more, and the
	// notice stays until the node's identity changes again.
	logs = logBuffer{}
	ts.stop(t)
	ts = startServer(t, ServerOptions{StateDir: dir, Logger: logs.logger()})
	if strings.Contains(logs.String(), "removed tags") {
		t.Errorf("restart removed tags again:\n%s", logs.String())
	}
	after, _ := ts.Nodes(ctx)
	for _, sn := range after {
		if sn.ID == laptop.id && len(sn.Notices) != 1 {
			t.Errorf("laptop's notices after a restart: %q", sn.Notices)
		}
	}
}

// TestTagsRecheckedAtStartWithPolicyFlag: nodes that tagged themselves
// under bootstrap and a coordinator restarted with --policy: the tags are
// checked at start, before any node gets a map under the policy.
func TestTagsRecheckedAtStartWithPolicyFlag(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	ts := startServer(t, ServerOptions{StateDir: dir})
	n := newTestNode(t, ts.url, "")
	if _, err := n.register(ctx, ts.key(t, AuthKeyOptions{User: "bob@example.com"}), "b", "tag:dev"); err != nil {
		t.Fatal(err)
	}
	ts.stop(t)
	ts = startServer(t, ServerOptions{StateDir: dir, Policy: []byte(tagOwnerPolicy), PolicyFile: "owners.hujson"})
	nodes, err := ts.Nodes(ctx)
	if err != nil || len(nodes) != 1 || len(nodes[0].Tags) != 0 || nodes[0].User != "bob@example.com" || len(nodes[0].Notices) != 1 {
		t.Fatalf("after a start with --policy: %+v, %v", nodes, err)
	}
}
