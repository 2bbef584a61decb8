package control

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
)

const sshTestPolicy = `{
	"groups": {"group:eng": ["alice@example.com"]},
	"tagOwners": {"tag:gpu": [], "tag:vendor": [], "tag:recorder": []},
	"grants": [{"src": ["*"], "dst": ["*"], "ip": ["*"]}],
	"ssh": [
		{"action": "accept", "src": ["group:eng"], "dst": ["tag:gpu"], "users": ["autogroup:nonroot"]},
		{"action": "check", "src": ["tag:vendor"], "dst": ["tag:gpu"], "users": ["vendor"], "checkPeriod": "1h",
		 "recorder": ["tag:recorder"], "enforceRecorder": true},
	],
}`

// TestSSHAuthorize: the coordinator decides each login from the policy,
// for the destination node that asks; a node cannot approve, nor wait on
// or learn about another node's check.
func TestSSHAuthorize(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	ts.SetPolicy(mustEngine(t, sshTestPolicy))
	ctx := context.Background()
	reg := func(name string, o AuthKeyOptions) *testNode {
		n := newTestNode(t, ts.url, ts.Fingerprint())
		n.mustRegister(t, ts.key(t, o), name)
		return n
	}
	gpu := reg("gpu", AuthKeyOptions{Tags: []string{"tag:gpu"}})
	alice := reg("alice", AuthKeyOptions{User: "alice@example.com"})
	vendor := reg("vendor", AuthKeyOptions{Tags: []string{"tag:vendor"}})
	addr := func(n *testNode) netmap.SSHAuthRequest {
		return netmap.SSHAuthRequest{CallerAddr: n.self.Addresses[0].Addr()}
	}
	ask := func(n *testNode, req netmap.SSHAuthRequest, user string) *netmap.SSHAuthResponse {
		t.Helper()
		req.LocalUser = user
		r, err := n.c.SSHAuthorize(ctx, req)
		if err != nil {
			t.Fatalf("SSHAuthorize: %v", err)
		}
		return r
	}

	if r := ask(gpu, addr(alice), "alice"); r.Action != netmap.SSHAccept || r.Caller.User != "alice@example.com" || r.Caller.NodeID != alice.id {
		t.Errorf("alice as alice: %+v", r)
	}
	for _, tc := range []struct {
		name  string
		asker *testNode
		req   netmap.SSHAuthRequest
		user  string
		want  string
	}{
		{"nonroot excludes root", gpu, addr(alice), "root", "no ssh rule"},
		{"an address no node holds", gpu, netmap.SSHAuthRequest{CallerAddr: netipMust("100.64.99.99")}, "alice", "not a node"},
		{"the node itself", gpu, addr(gpu), "root", "not a node"},
		{"a bad user name", gpu, addr(alice), "-oProxyCommand=x", "not a local user name"},
		{"the rule names another destination", alice, addr(gpu), "alice", "no ssh rule"},
		{"no recorder online: enforced", gpu, addr(vendor), "vendor", "must be recorded"},
	} {
		if r := ask(tc.asker, tc.req, tc.user); r.Action != netmap.SSHReject || !strings.Contains(r.Message, tc.want) {
			t.Errorf("%s: %+v, want a refusal saying %q", tc.name, r, tc.want)
		}
	}

	// With a recorder the vendor's login waits for an admin.
	rec := reg("rec", AuthKeyOptions{Tags: []string{"tag:recorder"}})
	r := ask(gpu, addr(vendor), "vendor")
	if r.Action != netmap.SSHCheck || r.CheckID == "" || !strings.Contains(r.Message, "meshd admin ssh approve "+r.CheckID) ||
		len(r.Recorders) != 1 || r.Recorders[0].Addr() != rec.self.Addresses[0].Addr() || !r.EnforceRecorder {
		t.Fatalf("vendor: %+v", r)
	}
	// Another node (here the caller itself) cannot wait on the check,
	// which tells it nothing.
	if w, err := vendor.c.SSHWait(ctx, r.CheckID); err != nil || w.Approved || w.Pending {
		t.Fatalf("the vendor waits on gpu's check: %+v, %v", w, err)
	}
	// Nodes have no way to approve: the admin API wants the admin token.
	bad, err := NewAdminClient(ts.url, "msadm-"+strings.Repeat("a", 43)+"-"+ts.Fingerprint())
	if err != nil {
		t.Fatal(err)
	}
	if err := bad.ApproveSSH(ctx, r.CheckID); !errors.Is(err, controlclient.ErrUnauthorized) {
		t.Fatalf("approve with a wrong token: %v", err)
	}
	waited := make(chan *netmap.SSHWaitResponse, 1)
	go func() {
		w, err := gpu.c.SSHWait(ctx, r.CheckID)
		if err != nil {
			t.Error(err)
		}
		waited <- w
	}()
	select {
	case w := <-waited:
		t.Fatalf("the wait ended before any approval: %+v", w)
	case <-time.After(200 * time.Millisecond):
	}
	if cs, err := ts.SSHChecks(ctx); err != nil || len(cs) != 1 || cs[0].ID != r.CheckID || cs[0].LocalUser != "vendor" || cs[0].Caller.NodeID != vendor.id {
		t.Fatalf("SSHChecks: %+v", cs)
	}
	if err := ts.ApproveSSH(ctx, r.CheckID); err != nil {
		t.Fatal(err)
	}
	if w := <-waited; w == nil || !w.Approved {
		t.Fatalf("wait after approval: %+v", w)
	}
	if err := ts.ApproveSSH(ctx, r.CheckID); err == nil {
		t.Fatal("a second approval of the same check succeeded")
	}
	if err := ts.ApproveSSH(ctx, "nosuchcheck"); !errors.Is(err, controlclient.ErrNotFound) {
		t.Fatalf("approve an unknown check: %v", err)
	}
	// Within checkPeriod the same caller, node and user pass at once.
	if r := ask(gpu, addr(vendor), "vendor"); r.Action != netmap.SSHAccept {
		t.Fatalf("vendor again within checkPeriod: %+v", r)
	}
	// Every decision and the approval are in the audit log, the logins as
	// done by the node that asked.
	evs, err := ts.AuditLog(ctx, time.Time{}, 1000)
	if err != nil {
		t.Fatal(err)
	}
	var logins, approvals int
	for _, e := range evs {
		switch e.Action {
		case AuditSSHLogin:
			logins++
			if e.Actor.Kind != ActorNode || e.Target != nodeTarget(e.Actor.NodeID) {
				t.Errorf("ssh.login by %+v about %s, want the node that asked", e.Actor, e.Target)
			}
		case AuditSSHApprove:
			approvals++
		}
	}
	if logins < 3 || approvals != 1 {
		t.Fatalf("audit log has %d ssh.login and %d ssh.approve events, want at least 3 and exactly 1", logins, approvals)
	}
}

func netipMust(s string) netip.Addr { return netip.MustParseAddr(s) }

// TestSSHCheckExpiry: an approval lasts checkPeriod, and a login nobody
// approves expires after sshCheckTimeout, on the coordinator's clock.
func TestSSHCheckExpiry(t *testing.T) {
	clk := newClock()
	ts := startServer(t, ServerOptions{clock: clk})
	ts.SetPolicy(mustEngine(t, strings.Replace(sshTestPolicy, `"enforceRecorder": true`, `"enforceRecorder": false`, 1)))
	ctx := context.Background()
	reg := func(name string, o AuthKeyOptions) *testNode {
		n := newTestNode(t, ts.url, ts.Fingerprint())
		n.mustRegister(t, ts.key(t, o), name)
		return n
	}
	gpu := reg("gpu", AuthKeyOptions{Tags: []string{"tag:gpu"}})
	vendor := reg("vendor", AuthKeyOptions{Tags: []string{"tag:vendor"}})
	req := netmap.SSHAuthRequest{CallerAddr: vendor.self.Addresses[0].Addr(), LocalUser: "vendor"}
	ask := func() *netmap.SSHAuthResponse {
		t.Helper()
		r, err := gpu.c.SSHAuthorize(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	r := ask()
	if r.Action != netmap.SSHCheck {
		t.Fatalf("first login: %+v", r)
	}
	// Nobody approves: after the timeout the wait says so.
	clk.Advance(sshCheckTimeout)
	if w, err := gpu.c.SSHWait(ctx, r.CheckID); err != nil || w.Approved || w.Pending || w.Message == "" {
		t.Fatalf("wait after the timeout: %+v, %v", w, err)
	}
	if err := ts.ApproveSSH(ctx, r.CheckID); !errors.Is(err, controlclient.ErrNotFound) {
		t.Fatalf("approving an expired check: %v", err)
	}
	// Approved: accepted for checkPeriod (1h), then checked again.
	r = ask()
	if err := ts.ApproveSSH(ctx, r.CheckID); err != nil {
		t.Fatal(err)
	}
	clk.Advance(59 * time.Minute)
	if r := ask(); r.Action != netmap.SSHAccept {
		t.Fatalf("within checkPeriod: %+v", r)
	}
	clk.Advance(2 * time.Minute)
	if r := ask(); r.Action != netmap.SSHCheck {
		t.Fatalf("after checkPeriod: %+v", r)
	}
}
