package control

import (
	"context"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
)

// startSeedServer runs a coordinator with the seed policy
// (policy/testdata/seed.hujson) in force.
func startSeedServer(t *testing.T, opts ServerOptions) *testServer {
	t.Helper()
	ts := startServer(t, opts)
	seed, err := os.ReadFile("../policy/testdata/seed.hujson")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ts.ApplyPolicy(context.Background(), "seed.hujson", seed); err != nil {
		t.Fatal(err)
	}
	return ts
}

// TestRegistrationTagsReplaceOwnedKeyTags checks the multi-tenant part of
// the seed policy: a tenant's enrolment key (tag:tenant-a) owns the
// tenant's GPU tag, so a node advertising the GPU tag becomes a GPU node,
// not a GPU node that also carries the enrolment tag. Tags the key merely
// carries still join the requested ones.
func TestRegistrationTagsReplaceOwnedKeyTags(t *testing.T) {
	ts := startSeedServer(t, ServerOptions{})
	ctx := context.Background()
	tenantA := ts.key(t, AuthKeyOptions{Tags: []string{"tag:tenant-a"}, Reusable: true})
	twoTags := ts.key(t, AuthKeyOptions{Tags: []string{"tag:tenant-a", "tag:prod"}, Reusable: true})
	alice := ts.key(t, AuthKeyOptions{User: "alice@example.com", Reusable: true})
	for _, tc := range []struct {
		name     string
		key      string
		request  []string
		want     []string
		wantUser string
		refused  string // substring of the ErrTagsForbidden message
	}{
		{name: "key tags only", key: tenantA, want: []string{"tag:tenant-a"}},
		{name: "owned tag replaces the key's", key: tenantA, request: []string{"tag:tenant-a-gpu"}, want: []string{"tag:tenant-a-gpu"}},
		{name: "owned tag replaces every key tag", key: twoTags, request: []string{"tag:tenant-a-gpu"}, want: []string{"tag:tenant-a-gpu"}},
		{name: "carried tag joins", key: twoTags, request: []string{"tag:prod"}, want: []string{"tag:prod", "tag:tenant-a"}},
		{name: "carried and owned tags: as requested", key: tenantA, request: []string{"tag:tenant-a", "tag:tenant-a-gpu"}, want: []string{"tag:tenant-a", "tag:tenant-a-gpu"}},
		{name: "another tenant's tag", key: tenantA, request: []string{"tag:tenant-b-gpu"},
			refused: `tag "tag:tenant-b-gpu" is not owned by the tags tag:tenant-a ("tagOwners" at seed.hujson:`},
		{name: "user owns the tag", key: alice, request: []string{"tag:inference-server"}, want: []string{"tag:inference-server"}},
		{name: "user key, no tags", key: alice, wantUser: "alice@example.com"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newTestNode(t, ts.url, "")
			resp, err := n.register(ctx, tc.key, "n", tc.request...)
			if tc.refused != "" {
				wantErr(t, err, controlclient.ErrTagsForbidden)
				if !strings.Contains(err.Error(), tc.refused) {
					t.Fatalf("refusal %q does not say %q", err, tc.refused)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(resp.Node.Tags, tc.want) || resp.Node.User != tc.wantUser {
				t.Fatalf("registered with tags %v user %q; want %v %q", resp.Node.Tags, resp.Node.User, tc.want, tc.wantUser)
			}
		})
	}
}

// TestAdminRetagKeyExpiry checks that admin re-tagging keeps the key expiry
// rules in both directions: tagged nodes never expire, a node returned to
// a user expires NodeKeyExpiry from then, like a device enrolled with the
// user's key, and peers see both changes.
func TestAdminRetagKeyExpiry(t *testing.T) {
	const expiry = 2 * time.Hour
	ts := startServer(t, ServerOptions{NodeKeyExpiry: expiry})
	ctx := context.Background()
	a, b := newTestNode(t, ts.url, ""), newTestNode(t, ts.url, "")
	ra := a.mustRegister(t, ts.key(t, AuthKeyOptions{Tags: []string{"tag:gpu"}}), "a")
	b.mustRegister(t, ts.key(t, AuthKeyOptions{User: "bob@example.com"}), "b")
	b.follow(t, b.mapRequest())
	b.waitMap(t, "a", hasPeer(a.id))

	before := time.Now()
	if err := ts.UntagNode(ctx, a.id, " alice@example.com "); err != nil {
		t.Fatal(err)
	}
	m := b.waitMap(t, "a returned to alice", func(m *netmap.NetworkMap) bool {
		p := m.Peers[a.id]
		return p != nil && p.User == "alice@example.com" && len(p.Tags) == 0
	})
	p := m.Peers[a.id]
	if p.KeyExpiry.Before(before.Add(expiry)) || p.KeyExpiry.After(time.Now().Add(expiry)) {
		t.Fatalf("user node key expiry %v; want %v from the untag", p.KeyExpiry, expiry)
	}
	if !slices.Equal(p.Addresses, ra.Node.Addresses) {
		t.Errorf("addresses %v after untag; want %v", p.Addresses, ra.Node.Addresses)
	}
	users, _ := ts.Users(ctx)
	if !slices.ContainsFunc(users, func(u User) bool { return u.Login == "alice@example.com" }) {
		t.Errorf("users %v lack the new owner", users)
	}

	if err := ts.TagNode(ctx, a.id, []string{"tag:gpu"}); err != nil {
		t.Fatal(err)
	}
	m = b.waitMap(t, "a tagged again", func(m *netmap.NetworkMap) bool {
		p := m.Peers[a.id]
		return p != nil && slices.Equal(p.Tags, []string{"tag:gpu"})
	})
	if p := m.Peers[a.id]; !p.KeyExpiry.IsZero() || p.User != "" {
		t.Fatalf("tagged node: user %q expiry %v; want none, never", p.User, p.KeyExpiry)
	}

	wantErr(t, ts.UntagNode(ctx, a.id, ""), controlclient.ErrBadRequest)
	wantErr(t, ts.UntagNode(ctx, a.id, "bad login"), controlclient.ErrBadRequest)
	wantErr(t, ts.UntagNode(ctx, 9999, "alice@example.com"), controlclient.ErrNotFound)
	ac := adminClient(t, ts)
	if err := ac.UntagNode(ctx, a.id, "carol@example.com"); err != nil {
		t.Fatalf("admin API untag: %v", err)
	}
	if n, _ := ts.store.Node(ctx, a.id); n.User != "carol@example.com" || n.KeyExpiry.IsZero() {
		t.Fatalf("after admin API untag: %+v", n.Node)
	}
}
