package control

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/netmap"
)

// auditLog reads the whole audit log through the admin API.
func auditLog(t *testing.T, ac *AdminClient, since time.Time) []AuditEvent {
	t.Helper()
	var out []AuditEvent
	if err := ac.AuditLog(context.Background(), since, func(e AuditEvent) bool { out = append(out, e); return true }); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestAuditLogRecordsActions: each admin action, key use, registration,
// self re-tag, policy change (with its diff), node deletion and a session
// event another component reports lands in the audit log, in order, with
// its actor and time, and the API gives it back from a time on.
func TestAuditLogRecordsActions(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	ctx := context.Background()
	ac := adminClient(t, ts)
	start := time.Now()

	nk, err := ac.CreateAuthKey(ctx, AuthKeyOptions{Tags: []string{"tag:a"}})
	if err != nil {
		t.Fatal(err)
	}
	n := newTestNode(t, ts.url, "")
	n.mustRegister(t, nk.Key, "gpu-1")
	// Registering again without a key and without a change (a daemon
	// restart) records nothing.
	n.mustRegister(t, "", "gpu-1")
	if err := ac.TagNode(ctx, n.id, []string{"tag:b"}); err != nil {
		t.Fatal(err)
	}
	if _, err := ac.SetPolicy(ctx, "ab.hujson", []byte(abPolicy)); err != nil {
		t.Fatal(err)
	}
	if err := ac.RevokeAuthKey(ctx, nk.ID); err != nil {
		t.Fatal(err)
	}
	// What the SSH server or the Kubernetes proxy would report.
	if err := ts.Audit(ctx, AuditEvent{Actor: NodeActor(&n.self), Action: AuditSessionStart, Target: "ssh:alice@gpu-1",
		Details: json.RawMessage(`{"login":"alice@example.com","user":"root"}`)}); err != nil {
		t.Fatal(err)
	}
	if err := ac.ExpireNode(ctx, n.id); err != nil {
		t.Fatal(err)
	}
	if err := ac.DeleteNode(ctx, n.id); err != nil {
		t.Fatal(err)
	}
	// A rejected action records nothing.
	if err := ac.DeleteNode(ctx, n.id); err == nil {
		t.Fatal("deleting a deleted node succeeded")
	}

	evs := auditLog(t, ac, time.Time{})
	node := fmt.Sprintf("node:%d", n.id)
	want := []struct{ kind, action, target string }{
		{ActorAdmin, AuditKeyCreate, nk.ID},
		{ActorNode, AuditKeyUse, nk.ID},
		{ActorNode, AuditNodeRegister, node},
		{ActorAdmin, AuditNodeTags, node},
		{ActorAdmin, AuditPolicySet, "ab.hujson"},
		{ActorAdmin, AuditKeyRevoke, nk.ID},
		{ActorNode, AuditSessionStart, "ssh:alice@gpu-1"},
		{ActorAdmin, AuditNodeExpire, node},
		{ActorAdmin, AuditNodeDelete, node},
	}
	var got []string
	for _, e := range evs {
		got = append(got, e.Actor.Kind+" "+e.Action+" "+e.Target)
	}
	var wantS []string
	for _, w := range want {
		wantS = append(wantS, w.kind+" "+w.action+" "+w.target)
	}
	if strings.Join(got, "\n") != strings.Join(wantS, "\n") {
		t.Fatalf("audit log:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(wantS, "\n"))
	}
	for i, e := range evs {
		if e.Time.Before(start.Add(-time.Second)) || e.Time.After(time.Now()) || (i > 0 && e.ID <= evs[i-1].ID) {
			t.Errorf("event %d: time %v, id %d", i, e.Time, e.ID)
		}
		switch e.Actor.Kind {
		case ActorAdmin:
			if !strings.HasPrefix(e.Actor.Addr, "127.0.0.1:") {
				t.Errorf("admin event %s without the request's address: %+v", e.Action, e.Actor)
			}
		case ActorNode:
			if e.Actor.NodeID != n.id || e.Actor.Hostname != "gpu-1" {
				t.Errorf("node event %s: actor %+v", e.Action, e.Actor)
			}
		}
	}
	// Details: the re-tag says before and after; the policy change its
	// diff against the bootstrap default (everything closed but tag:a to
	// tag:a).
	var tags auditChange
	json.Unmarshal(evs[3].Details, &tags)
	if fmt.Sprint(tags.Before) != "map[hostname:gpu-1 id:1 tags:[tag:a]]" || fmt.Sprint(tags.After) != "map[hostname:gpu-1 id:1 tags:[tag:b]]" {
		t.Errorf("re-tag details: %s", evs[3].Details)
	}
	var pol policyChange
	if err := json.Unmarshal(evs[4].Details, &pol); err != nil || pol.Diff == nil || len(pol.Diff.Closed) == 0 || len(pol.Diff.Opened) != 0 || pol.SHA256 == "" || pol.Rules != 1 {
		t.Errorf("policy details: %s (%v)", evs[4].Details, err)
	}
	if !strings.Contains(string(evs[6].Details), `"login":"alice@example.com"`) {
		t.Errorf("session details: %s", evs[6].Details)
	}

	// From a time on.
	later := auditLog(t, ac, evs[5].Time)
	if len(later) != 4 || later[0].ID != evs[5].ID {
		t.Errorf("since event 5's time: %d events starting at %d", len(later), later[0].ID)
	}
}

// TestAuditPolicyDiff: a second policy's event carries what it opens and
// closes compared with the first.
func TestAuditPolicyDiff(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	ctx := context.Background()
	ac := adminClient(t, ts)
	for _, p := range []struct{ name, text string }{{"ab.hujson", abPolicy}, {"bc.hujson", bcPolicy}} {
		if _, err := ac.SetPolicy(ctx, p.name, []byte(p.text)); err != nil {
			t.Fatal(err)
		}
	}
	evs := auditLog(t, ac, time.Time{})
	var pol policyChange
	if len(evs) != 2 || json.Unmarshal(evs[1].Details, &pol) != nil || pol.Diff == nil {
		t.Fatalf("events: %+v", evs)
	}
	if pol.Replaced != "ab.hujson" || len(pol.Diff.Opened) != 1 || pol.Diff.Opened[0].Dst != "tag:b" || pol.Diff.Opened[0].Ports != "22" ||
		len(pol.Diff.Closed) != 1 || pol.Diff.Closed[0].Dst != "tag:a" {
		t.Errorf("diff of bc against ab: %s", evs[1].Details)
	}
}

// TestAuditRejectsBadEvents: an event without an action or with details
// that are not a JSON object is refused.
func TestAuditRejectsBadEvents(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	for _, e := range []AuditEvent{
		{},
		{Action: "x", Details: json.RawMessage(`[1]`)},
		{Action: "x", Details: json.RawMessage(`{`)},
	} {
		if err := ts.Audit(context.Background(), e); err == nil {
			t.Errorf("Audit(%+v) accepted", e)
		}
	}
}

// TestAuditAppendOnlyAPI: the admin API has no way to change or remove an
// event: every other method on the audit path, and any path below it, is
// refused, and the log is unchanged afterwards.
func TestAuditAppendOnlyAPI(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	ac := adminClient(t, ts)
	ts.key(t, AuthKeyOptions{Tags: []string{"tag:a"}})
	before := auditLog(t, ac, time.Time{})
	if len(before) != 1 {
		t.Fatalf("events: %+v", before)
	}
	tok, err := readFile(ts.AdminTokenPath())
	if err != nil {
		t.Fatal(err)
	}
	for _, method := range []string{http.MethodPost, http.MethodPut, http.MethodPatch, http.MethodDelete} {
		for _, path := range []string{"/admin/v1/audit", fmt.Sprintf("/admin/v1/audit/%d", before[0].ID)} {
			code := rawAdmin(t, ac, method, path, strings.TrimSpace(tok), `{"action":"forged","actor":{"kind":"admin"}}`)
			if code < 400 {
				t.Errorf("%s %s with the admin token: %d", method, path, code)
			}
		}
	}
	after := auditLog(t, ac, time.Time{})
	if len(after) != 1 || after[0].Action != AuditKeyCreate {
		t.Fatalf("after the attempts: %+v", after)
	}
}

// TestAuditNotForNodes: a node, with its machine key and even its auth
// key as a bearer token, can neither read the audit log nor write to it;
// neither can an unauthenticated client.
func TestAuditNotForNodes(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	ac := adminClient(t, ts)
	key := ts.key(t, AuthKeyOptions{Tags: []string{"tag:a"}, Reusable: true})
	n := newTestNode(t, ts.url, "")
	n.mustRegister(t, key, "n1")
	hc := machineHTTP(t, ts.Fingerprint(), n.mk)
	for _, tc := range []struct {
		method, path, token string
	}{
		{http.MethodGet, "/admin/v1/audit", ""},
		{http.MethodGet, "/admin/v1/audit", key},
		{http.MethodGet, "/admin/v1/audit?since=2000-01-01T00:00:00Z", "Bearer"},
		{http.MethodPost, "/admin/v1/audit", key},
		{http.MethodPost, "/machine/audit", ""},
	} {
		req, _ := http.NewRequest(tc.method, ts.url+tc.path, strings.NewReader(`{"action":"forged"}`))
		if tc.token != "" {
			req.Header.Set("Authorization", "Bearer "+tc.token)
		}
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body := make([]byte, 512)
		m, _ := resp.Body.Read(body)
		resp.Body.Close()
		if resp.StatusCode < 400 || strings.Contains(string(body[:m]), AuditKeyCreate) {
			t.Errorf("node: %s %s (token %q): %d %s", tc.method, tc.path, tc.token, resp.StatusCode, body[:m])
		}
	}
	// Unauthenticated: no client certificate, no token.
	if code := rawAdmin(t, ac, http.MethodGet, "/admin/v1/audit", "", ""); code != http.StatusUnauthorized {
		t.Errorf("unauthenticated read: %d", code)
	}
	for _, e := range auditLog(t, ac, time.Time{}) {
		if e.Action == "forged" {
			t.Fatalf("a forged event got in: %+v", e)
		}
	}
}

// rawAdmin sends method path with body to the admin API with token (none
// if empty) over ac's pinned connection, which has no client certificate,
// and returns the status.
func rawAdmin(t *testing.T, ac *AdminClient, method, path, token, body string) int {
	t.Helper()
	req, err := http.NewRequest(method, ac.base.JoinPath(path).String(), strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := ac.hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// TestAuditNodeRetagsItself: a node re-tagging itself and rotating its
// node key are recorded with the node as actor, before and after; a policy
// applied in process (no admin request) is the coordinator's.
func TestAuditNodeRetagsItself(t *testing.T) {
	ts := startSeedServer(t, ServerOptions{})
	ac := adminClient(t, ts)
	box := newTestNode(t, ts.url, "")
	box.mustRegister(t, ts.key(t, AuthKeyOptions{User: "alice@example.com"}), "box")
	if _, err := box.c.SetTags(context.Background(), netmap.SetTagsRequest{Tags: []string{"tag:inference-server"}}); err != nil {
		t.Fatal(err)
	}
	evs := auditLog(t, ac, time.Time{})
	if len(evs) == 0 || evs[0].Action != AuditPolicySet || evs[0].Actor.Kind != ActorCoordinator {
		t.Fatalf("first event: %+v", evs)
	}
	old := box.rotate()
	if err := box.c.Update(context.Background(), box.mapRequest()); err != nil {
		t.Fatal(err)
	}
	evs = auditLog(t, ac, time.Time{})
	rot := evs[len(evs)-1]
	if rot.Action != AuditNodeKeyRotate || rot.Actor.NodeID != box.id ||
		string(rot.Details) != fmt.Sprintf(`{"before":%q,"after":%q}`, old.Public().String(), box.nk.Public().String()) {
		t.Fatalf("rotation event: %+v %s", rot, rot.Details)
	}
	last := evs[len(evs)-2]
	if last.Action != AuditNodeTags || last.Actor.Kind != ActorNode || last.Actor.NodeID != box.id ||
		string(last.Details) != `{"before":{"tags":null},"after":{"tags":["tag:inference-server"]}}` {
		t.Fatalf("re-tag event: %+v %s", last, last.Details)
	}
}
