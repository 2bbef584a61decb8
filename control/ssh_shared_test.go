package control

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/control/controlclient"
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

// TestSSHSessionEnd: a node's report of a session's end is in the audit
// log as done by, and about, that node; a node cannot attach another
// node's approval, a machine that is not enrolled reports nothing, bad
// fields are refused, and a flood stops at the rate limit.
func TestSSHSessionEnd(t *testing.T) {
	clk := newClock()
	ts := startServer(t, ServerOptions{clock: clk})
	ts.SetPolicy(mustEngine(t, sshUnrecordedPolicy))
	ctx := context.Background()
	reg := func(name string, o AuthKeyOptions) *testNode {
		n := newTestNode(t, ts.url, ts.Fingerprint())
		n.mustRegister(t, ts.key(t, o), name)
		return n
	}
	gpu := reg("gpu", AuthKeyOptions{Tags: []string{"tag:gpu"}})
	vendor := reg("vendor", AuthKeyOptions{Tags: []string{"tag:vendor"}})
	r, err := gpu.c.SSHAuthorize(ctx, netmap.SSHAuthRequest{CallerAddr: vendor.self.Addresses[0].Addr(), LocalUser: "vendor"})
	if err != nil || r.Action != netmap.SSHCheck {
		t.Fatalf("vendor: %+v, %v", r, err)
	}
	end := netmap.SSHSessionEnd{
		SessionID: "s1", CheckID: r.CheckID, Caller: r.Caller, LocalUser: "vendor",
		Kind: netmap.SSHSessionShell, Duration: 90 * time.Second, ExitStatus: 3,
	}
	sessionEnds := func() []AuditEvent {
		t.Helper()
		evs, err := ts.AuditLog(ctx, time.Time{}, 10000)
		if err != nil {
			t.Fatal(err)
		}
		var out []AuditEvent
		for _, e := range evs {
			if e.Action == AuditSessionEnd {
				out = append(out, e)
			}
		}
		return out
	}
	if err := gpu.c.SSHSessionEnd(ctx, end); err != nil {
		t.Fatal(err)
	}
	evs := sessionEnds()
	if len(evs) != 1 || evs[0].Actor.Kind != ActorNode || evs[0].Actor.NodeID != gpu.id || evs[0].Target != nodeTarget(gpu.id) {
		t.Fatalf("session.end events: %+v", evs)
	}
	for _, want := range []string{`"session":"s1"`, `"check":"` + r.CheckID + `"`, `"duration":"1m30s"`, `"exit_status":3`, `"kind":"shell"`} {
		if !strings.Contains(string(evs[0].Details), want) {
			t.Errorf("details %s lack %s", evs[0].Details, want)
		}
	}

	// The vendor node cannot report a session on gpu: it has no field to
	// name gpu, and gpu's live approval is refused.
	if err := vendor.c.SSHSessionEnd(ctx, end); !errors.Is(err, controlclient.ErrBadRequest) {
		t.Fatalf("vendor reports a session with gpu's check: %v", err)
	}
	stranger := newTestNode(t, ts.url, ts.Fingerprint())
	if err := stranger.c.SSHSessionEnd(ctx, end); !errors.Is(err, controlclient.ErrNotRegistered) {
		t.Fatalf("a machine that is not enrolled reports a session: %v", err)
	}
	for _, tc := range []struct {
		name string
		mod  func(*netmap.SSHSessionEnd)
	}{
		{"no session id", func(e *netmap.SSHSessionEnd) { e.SessionID = "" }},
		{"a long session id", func(e *netmap.SSHSessionEnd) { e.SessionID = strings.Repeat("a", 65) }},
		{"a session id with a newline", func(e *netmap.SSHSessionEnd) { e.SessionID = "a\nb" }},
		{"a check id with a quote", func(e *netmap.SSHSessionEnd) { e.CheckID = `a"b` }},
		{"a bad user", func(e *netmap.SSHSessionEnd) { e.LocalUser = "-oProxyCommand" }},
		{"an unknown kind", func(e *netmap.SSHSessionEnd) { e.Kind = "x11" }},
		{"a negative duration", func(e *netmap.SSHSessionEnd) { e.Duration = -time.Second }},
		{"an exit status past 255", func(e *netmap.SSHSessionEnd) { e.ExitStatus = 256 }},
		{"an exit status below -1", func(e *netmap.SSHSessionEnd) { e.ExitStatus = -2 }},
	} {
		e := end
		tc.mod(&e)
		if err := gpu.c.SSHSessionEnd(ctx, e); !errors.Is(err, controlclient.ErrBadRequest) {
			t.Errorf("%s: %v, want a bad request", tc.name, err)
		}
	}
	if n := len(sessionEnds()); n != 1 {
		t.Fatalf("%d session.end events after refused reports, want 1", n)
	}

	// A flood: the burst passes (one was spent above), then the limit.
	end.CheckID = ""
	var ok, limited int
	for i := range 2 * sshEndBurst {
		end.SessionID = fmt.Sprint("f", i)
		switch err := gpu.c.SSHSessionEnd(ctx, end); {
		case err == nil:
			ok++
		case errors.Is(err, controlclient.ErrRateLimited):
			limited++
		default:
			t.Fatal(err)
		}
	}
	if ok != sshEndBurst-1 || limited != sshEndBurst+1 {
		t.Fatalf("flood of %d: %d recorded, %d limited; want %d and %d", 2*sshEndBurst, ok, limited, sshEndBurst-1, sshEndBurst+1)
	}
	// Another node has a budget of its own; time refills gpu's.
	if err := vendor.c.SSHSessionEnd(ctx, netmap.SSHSessionEnd{SessionID: "v", LocalUser: "root", Kind: netmap.SSHSessionExec}); err != nil {
		t.Fatalf("another node during gpu's flood: %v", err)
	}
	clk.Advance(sshEndEvery)
	if err := gpu.c.SSHSessionEnd(ctx, end); err != nil {
		t.Fatalf("after %v: %v", sshEndEvery, err)
	}
	if n := len(sessionEnds()); n != 1+sshEndBurst-1+2 {
		t.Fatalf("%d session.end events, want %d", n, 1+sshEndBurst-1+2)
	}
}
