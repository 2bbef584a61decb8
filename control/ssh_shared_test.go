package control

import (
	"context"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/netmap"
)

// sshUnrecordedPolicy is sshTestPolicy without a recorder required.
var sshUnrecordedPolicy = strings.Replace(sshTestPolicy, `"enforceRecorder": true`, `"enforceRecorder": false`, 1)

// TestSSHApprovalAcrossReplicas: a check made on replica B is listed on
// replica A, approved there, and the node waiting on B proceeds; the
// approval's checkPeriod holds on B too.
func TestSSHApprovalAcrossReplicas(t *testing.T) {
	ctx := context.Background()
	rs := startReplicas(t, 2, ServerOptions{})
	a, b := rs[0], rs[1]
	if _, err := b.ApplyPolicy(ctx, "ssh.hujson", []byte(sshUnrecordedPolicy)); err != nil {
		t.Fatal(err)
	}
	reg := func(name string, o AuthKeyOptions) *testNode {
		n := newTestNode(t, b.url, b.Fingerprint())
		n.mustRegister(t, b.key(t, o), name)
		return n
	}
	gpu := reg("gpu", AuthKeyOptions{Tags: []string{"tag:gpu"}})
	vendor := reg("vendor", AuthKeyOptions{Tags: []string{"tag:vendor"}})
	req := netmap.SSHAuthRequest{CallerAddr: vendor.self.Addresses[0].Addr(), LocalUser: "vendor"}
	r, err := gpu.c.SSHAuthorize(ctx, req)
	if err != nil || r.Action != netmap.SSHCheck {
		t.Fatalf("vendor on B: %+v, %v", r, err)
	}
	// `meshd admin ssh list` on A shows B's check.
	if cs, err := a.SSHChecks(ctx); err != nil || len(cs) != 1 || cs[0].ID != r.CheckID || cs[0].NodeID != gpu.id {
		t.Fatalf("A's list of checks: %+v, %v", cs, err)
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
		t.Fatalf("the wait on B ended before any approval: %+v", w)
	case <-time.After(200 * time.Millisecond):
	}
	if err := a.ApproveSSH(ctx, r.CheckID); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	select {
	case w := <-waited:
		if w == nil || !w.Approved {
			t.Fatalf("the wait on B after A's approval: %+v", w)
		}
		t.Logf("the wait on B ended %v after the approval on A", time.Since(start))
	case <-time.After(10 * time.Second):
		// sshWaitPoll is 25s: within 10s only the change feed wakes it.
		t.Fatal("the wait on B did not end within 10s of the approval on A")
	}
	if r, err := gpu.c.SSHAuthorize(ctx, req); err != nil || r.Action != netmap.SSHAccept {
		t.Fatalf("vendor on B again within the checkPeriod granted on A: %+v, %v", r, err)
	}
}

// TestSSHApprovalSurvivesRestart: on SQLite a pending check, its
// approval and the checkPeriod it grants outlive a coordinator restart.
func TestSSHApprovalSurvivesRestart(t *testing.T) {
	ctx := context.Background()
	opts := ServerOptions{StateDir: t.TempDir()}
	ts := startServer(t, opts)
	if _, err := ts.ApplyPolicy(ctx, "ssh.hujson", []byte(sshUnrecordedPolicy)); err != nil {
		t.Fatal(err)
	}
	reg := func(name string, o AuthKeyOptions) *testNode {
		n := newTestNode(t, ts.url, ts.Fingerprint())
		n.mustRegister(t, ts.key(t, o), name)
		return n
	}
	gpu := reg("gpu", AuthKeyOptions{Tags: []string{"tag:gpu"}})
	vendor := reg("vendor", AuthKeyOptions{Tags: []string{"tag:vendor"}})
	req := netmap.SSHAuthRequest{CallerAddr: vendor.self.Addresses[0].Addr(), LocalUser: "vendor"}
	r, err := gpu.c.SSHAuthorize(ctx, req)
	if err != nil || r.Action != netmap.SSHCheck {
		t.Fatalf("vendor: %+v, %v", r, err)
	}
	restart := func() {
		t.Helper()
		ts.stop(t)
		ts = startServerAt(t, opts, ts.addr)
	}
	restart()
	if cs, err := ts.SSHChecks(ctx); err != nil || len(cs) != 1 || cs[0].ID != r.CheckID {
		t.Fatalf("checks after a restart: %+v, %v", cs, err)
	}
	if err := ts.ApproveSSH(ctx, r.CheckID); err != nil {
		t.Fatalf("approving a check made before the restart: %v", err)
	}
	restart()
	if w, err := gpu.c.SSHWait(ctx, r.CheckID); err != nil || !w.Approved {
		t.Fatalf("wait after the approval and a restart: %+v, %v", w, err)
	}
	if r, err := gpu.c.SSHAuthorize(ctx, req); err != nil || r.Action != netmap.SSHAccept {
		t.Fatalf("within the checkPeriod after a restart: %+v, %v", r, err)
	}
}
