package agent

import (
	"context"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/control"
)

// TestStatusShowsTagsRemovedByPolicy: a daemon enrolled with a user key and
// --advertise-tags tag:x under the bootstrap default loses tag:x when a
// policy where its user does not own it is set, and its status says why.
func TestStatusShowsTagsRemovedByPolicy(t *testing.T) {
	m := newTestMesh(t)
	ctx := context.Background()
	key, _, err := m.srv.CreateAuthKey(ctx, control.AuthKeyOptions{User: "alice@example.com", Preauthorized: true})
	if err != nil {
		t.Fatal(err)
	}
	a, err := startAgent(t, filepath.Join(t.TempDir(), "laptop"))
	if err != nil {
		t.Fatal(err)
	}
	st, err := a.Up(ctx, localapi.UpRequest{AuthKey: key, Coordinator: m.url, Hostname: "laptop", Tags: []string{"tag:x"}})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(st.Self.Tags, []string{"tag:x"}) {
		t.Fatalf("enrolled under bootstrap with tags %v", st.Self.Tags)
	}
	if _, err := m.srv.ApplyPolicy(ctx, "owners.hujson", []byte(`{
		"tagOwners": {"tag:x": ["bob@example.com"], "tag:test": []},
		"grants": [{"src": ["alice@example.com"], "dst": ["tag:test"], "ip": ["*"]}],
	}`)); err != nil {
		t.Fatal(err)
	}
	st = waitStatus(t, a.Agent, "tag:x removed", func(st *localapi.Status) bool {
		return st.Self != nil && len(st.Self.Tags) == 0 && len(st.Self.Notices) > 0
	})
	if n := st.Self.Notices[0]; !strings.Contains(n, "tag:x removed by policy owners.hujson") || !strings.Contains(n, "alice@example.com does not own tag") {
		t.Fatalf("notice %q", n)
	}
	if st.Self.User != "alice@example.com" {
		t.Fatalf("without tags the node is %q's, want alice's", st.Self.User)
	}
}
