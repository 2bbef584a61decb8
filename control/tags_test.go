package control

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/internal/tlspin"
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

// TestNodeSetsOwnTags checks re-tagging on the node's own request
// (`meshd up --advertise-tags` on an enrolled node), authenticated by the
// machine key alone, against the seed policy: allowed when the node's user
// or its current tags own the new tags, refused (naming the tag and the
// rule) otherwise, and the new tags replace the old ones.
func TestNodeSetsOwnTags(t *testing.T) {
	ts := startSeedServer(t, ServerOptions{NodeKeyExpiry: time.Hour})
	ctx := context.Background()
	set := func(n *testNode, tags ...string) (*netmap.SetTagsResponse, error) {
		return n.c.SetTags(ctx, netmap.SetTagsRequest{Tags: tags})
	}
	userKey := func(login string) string { return ts.key(t, AuthKeyOptions{User: login}) }

	// alice (group:ml-engineers) turns her box into an inference server.
	box := newTestNode(t, ts.url, "")
	reg := box.mustRegister(t, userKey("alice@example.com"), "box")
	resp, err := set(box, "tag:inference-server")
	if err != nil {
		t.Fatal(err)
	}
	got := resp.Node
	if !slices.Equal(got.Tags, []string{"tag:inference-server"}) || got.User != "" || !got.KeyExpiry.IsZero() ||
		got.ID != reg.Node.ID || !slices.Equal(got.Addresses, reg.Node.Addresses) {
		t.Fatalf("after re-tag: %+v; want tag:inference-server, no user, no expiry, same id and addresses", got)
	}
	stored, err := ts.store.Node(ctx, box.id)
	if err != nil || !slices.Equal(stored.Tags, got.Tags) || stored.User != "" || !stored.KeyExpiry.IsZero() {
		t.Fatalf("stored after re-tag: %+v %v", stored.Node, err)
	}
	if _, err := set(box, "tag:inference-server"); err != nil {
		t.Fatalf("same tags again: %v", err)
	}

	// As a tag:inference-server node it owns nothing: tag:prod is the
	// admin's, and tags never act for the user the node used to have.
	_, err = set(box, "tag:prod")
	wantErr(t, err, controlclient.ErrTagsForbidden)
	for _, want := range []string{`"tag:prod"`, `"tagOwners" at seed.hujson:`, "[autogroup:admin]"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("refusal %q does not say %s", err, want)
		}
	}
	_, err = set(box, "tag:training-cluster")
	wantErr(t, err, controlclient.ErrTagsForbidden)
	// Nor can it drop its tags to become a user's device again.
	_, err = set(box)
	wantErr(t, err, controlclient.ErrBadRequest)
	if !strings.Contains(err.Error(), "--force-reauth") {
		t.Errorf("untag refusal %q does not say how", err)
	}

	// A tenant node enrolled with the tenant's key becomes a GPU node: its
	// current tag owns the GPU tag. From there it cannot go back.
	gpu := newTestNode(t, ts.url, "")
	gpu.mustRegister(t, ts.key(t, AuthKeyOptions{Tags: []string{"tag:tenant-a"}}), "gpu")
	if resp, err = set(gpu, "tag:tenant-a-gpu"); err != nil || !slices.Equal(resp.Node.Tags, []string{"tag:tenant-a-gpu"}) {
		t.Fatalf("tenant node to GPU: %+v %v", resp, err)
	}
	_, err = set(gpu, "tag:tenant-a")
	wantErr(t, err, controlclient.ErrTagsForbidden)
	_, err = set(gpu, "tag:tenant-b-gpu")
	wantErr(t, err, controlclient.ErrTagsForbidden)

	// bob does not own tag:ci (alice does).
	bob := newTestNode(t, ts.url, "")
	bob.mustRegister(t, userKey("bob@example.com"), "bob")
	_, err = set(bob, "tag:ci")
	wantErr(t, err, controlclient.ErrTagsForbidden)
	if !strings.Contains(err.Error(), "user bob@example.com does not own tag \"tag:ci\"") {
		t.Errorf("refusal %q does not name the user and the tag", err)
	}
	if n, _ := ts.store.Node(ctx, bob.id); n.User != "bob@example.com" || len(n.Tags) != 0 || n.KeyExpiry.IsZero() {
		t.Errorf("refused re-tag changed the node: %+v", n.Node)
	}
	_, err = set(bob, "Not A Tag")
	wantErr(t, err, controlclient.ErrBadRequest)

	// Machines the coordinator does not accept get the usual refusals.
	_, err = set(newTestNode(t, ts.url, ts.Fingerprint()), "tag:ci")
	wantErr(t, err, controlclient.ErrNotRegistered)
	if err := ts.ExpireNode(ctx, bob.id); err != nil {
		t.Fatal(err)
	}
	_, err = set(bob, "tag:ci")
	wantErr(t, err, controlclient.ErrNodeExpired)
}

// TestNodeSetsOwnTagsNeedsApproval: a node waiting for approval cannot
// re-tag itself (it is not in the tailnet yet).
func TestNodeSetsOwnTagsNeedsApproval(t *testing.T) {
	ts := startSeedServer(t, ServerOptions{RequireApproval: true})
	n := newTestNode(t, ts.url, "")
	n.mustRegister(t, ts.key(t, AuthKeyOptions{User: "alice@example.com"}), "pending")
	_, err := n.c.SetTags(context.Background(), netmap.SetTagsRequest{Tags: []string{"tag:ci"}})
	wantErr(t, err, controlclient.ErrNotAuthorized)
}

// TestNodeSetsOwnTagsBootstrapRefused: with no policy loaded nobody owns a
// tag, so a node cannot give itself one (the allow-all default would make
// every tag free for the taking); the admin still can.
func TestNodeSetsOwnTagsBootstrapRefused(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	ctx := context.Background()
	n := newTestNode(t, ts.url, "")
	n.mustRegister(t, ts.key(t, AuthKeyOptions{User: "alice@example.com"}), "laptop")
	_, err := n.c.SetTags(ctx, netmap.SetTagsRequest{Tags: []string{"tag:prod"}})
	wantErr(t, err, controlclient.ErrTagsForbidden)
	if !strings.Contains(err.Error(), "no policy is loaded") {
		t.Errorf("refusal %q does not say why", err)
	}
	if sn, _ := ts.store.Node(ctx, n.id); sn.User != "alice@example.com" || len(sn.Tags) != 0 {
		t.Fatalf("refused re-tag changed the node: %+v", sn.Node)
	}
	if err := ts.TagNode(ctx, n.id, []string{"tag:prod"}); err != nil {
		t.Fatalf("admin tagging under the bootstrap default: %v", err)
	}
	// Asking for the tags it has is no change, and no error.
	if resp, err := n.c.SetTags(ctx, netmap.SetTagsRequest{Tags: []string{"tag:prod"}}); err != nil || !slices.Equal(resp.Node.Tags, []string{"tag:prod"}) {
		t.Fatalf("same tags under the bootstrap default: %+v %v", resp, err)
	}
}

// TestSetTagsWatchersSeeChange checks that peers get the re-tagged node in
// their maps, and lose it when the new tag takes it out of their view.
func TestSetTagsWatchersSeeChange(t *testing.T) {
	ts := startSeedServer(t, ServerOptions{})
	ctx := context.Background()
	// carol (tenant-a) sees tenant-a GPUs only.
	carol := newTestNode(t, ts.url, "")
	carol.mustRegister(t, ts.key(t, AuthKeyOptions{User: "carol@tenant-a.example"}), "carol")
	carol.follow(t, carol.mapRequest())
	gpu := newTestNode(t, ts.url, "")
	gpu.mustRegister(t, ts.key(t, AuthKeyOptions{Tags: []string{"tag:tenant-a"}}), "gpu")
	if _, err := gpu.c.SetTags(ctx, netmap.SetTagsRequest{Tags: []string{"tag:tenant-a-gpu"}}); err != nil {
		t.Fatal(err)
	}
	carol.waitMap(t, "the new tenant-a GPU", func(m *netmap.NetworkMap) bool {
		p := m.Peers[gpu.id]
		return p != nil && slices.Equal(p.Tags, []string{"tag:tenant-a-gpu"})
	})
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

// FuzzSetTagsRequest sends arbitrary bodies to /machine/tags of a real
// coordinator as an enrolled machine: every answer is a success or a 4xx
// JSON error with a code, and a refused request leaves the node as it was.
func FuzzSetTagsRequest(f *testing.F) {
	s, err := NewServer(context.Background(), ServerOptions{StateDir: f.TempDir(), KeepAliveInterval: time.Hour})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { s.Close() })
	if _, err := s.ApplyPolicy(context.Background(), "p.hujson", []byte(`{"tagOwners": {"tag:a": ["alice@example.com"], "tag:b": ["tag:a"], "tag:c": []}}`)); err != nil {
		f.Fatal(err)
	}
	key, _, err := s.CreateAuthKey(context.Background(), AuthKeyOptions{User: "alice@example.com", Reusable: true})
	if err != nil {
		f.Fatal(err)
	}
	_, mk, _ := ed25519.GenerateKey(rand.Reader)
	cert, err := tlspin.SelfSigned(mk, "fuzz", nil)
	if err != nil {
		f.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(cert.Certificate[0])
	mpub, _ := netmap.MachinePublicFromEd25519(mk.Public().(ed25519.PublicKey))
	nk := netmap.NewNodePrivate()
	proof, err := controlclient.SealNodeKeyProof(nk, mpub, ptr(s.chal.issue(mpub, time.Now())))
	if err != nil {
		f.Fatal(err)
	}
	if _, err := s.register(context.Background(), mpub, netmap.RegisterRequest{Version: netmap.ProtocolVersion, NodeKey: nk.Public(), Hostname: "fuzz", AuthKey: key, NodeKeyProof: proof}); err != nil {
		f.Fatal(err)
	}
	h := s.Handler()
	f.Add([]byte(`{"version":1,"tags":["tag:a"]}`))
	f.Add([]byte(`{"version":1,"tags":["tag:b"]}`))
	f.Add([]byte(`{"version":1,"tags":["tag:c"]}`))
	f.Add([]byte(`{"version":1,"tags":[]}`))
	f.Add([]byte(`{"version":0,"tags":["tag:a"]}`))
	f.Add([]byte(`{"version":1,"tags":["TAG:A","tag:a"," tag:b "]}`))
	f.Add([]byte(`{"version":1,"tags":["tag:"]}`))
	f.Add([]byte(`{"version":1,"tags":"tag:a"}`))
	f.Add([]byte(`{"version":1,"tags":["tag:a"],"user":"x"}`))
	f.Add([]byte(`[`))
	f.Fuzz(func(t *testing.T, body []byte) {
		before, err := s.store.NodeByMachine(context.Background(), mpub)
		if err != nil {
			t.Fatal(err)
		}
		req := httptest.NewRequest(http.MethodPost, "/machine/tags", bytes.NewReader(body))
		req.TLS = &tls.ConnectionState{PeerCertificates: []*x509.Certificate{leaf}}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		raw, _ := io.ReadAll(rec.Body)
		if rec.Code == http.StatusOK {
			var resp netmap.SetTagsResponse
			if err := json.Unmarshal(raw, &resp); err != nil || len(resp.Node.Tags) == 0 {
				t.Fatalf("200 with body %q: want the re-tagged node", raw)
			}
			return
		}
		var eb controlclient.ErrorBody
		if err := json.Unmarshal(raw, &eb); err != nil || eb.Code == "" || eb.Error == "" || rec.Code >= 500 {
			t.Fatalf("status %d with body %q: want a 4xx JSON error with a code", rec.Code, raw)
		}
		after, err := s.store.NodeByMachine(context.Background(), mpub)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(before.Tags, after.Tags) || before.User != after.User || !before.KeyExpiry.Equal(after.KeyExpiry) {
			t.Fatalf("refused request (%s) changed the node: %+v -> %+v", eb.Code, before.Node, after.Node)
		}
		if errors.Is(&controlclient.APIError{Code: eb.Code}, controlclient.ErrTagsForbidden) && !strings.Contains(eb.Error, "tagOwners") {
			t.Fatalf("tags refusal %q does not name the rule", eb.Error)
		}
	})
}
