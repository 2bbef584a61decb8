package main

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"meshd.dev/meshd/agent/localapi"
)

// fakeDaemon is a local API backend whose status the test sets.
type fakeDaemon struct {
	mu sync.Mutex
	st localapi.Status
}

func (f *fakeDaemon) set(st localapi.Status) {
	f.mu.Lock()
	f.st = st
	f.mu.Unlock()
}

func (f *fakeDaemon) Up(context.Context, localapi.UpRequest) (*localapi.Status, error) {
	return nil, errors.New("not in this test")
}
func (f *fakeDaemon) Down(context.Context) error { return errors.New("not in this test") }
func (f *fakeDaemon) Status(context.Context) (*localapi.Status, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	st := f.st
	return &st, nil
}
func (f *fakeDaemon) Drops(context.Context) (*localapi.Drops, error) { return &localapi.Drops{}, nil }
func (f *fakeDaemon) MetricsHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("# TYPE meshd_peers gauge\nmeshd_peers 3\n"))
	})
}

// serveFake serves f's local API on a socket in a temporary directory.
func serveFake(t *testing.T, f *fakeDaemon) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "meshd.sock")
	ln, err := localapi.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- localapi.Serve(ctx, ln, f) }()
	t.Cleanup(func() { cancel(); <-done })
	return sock
}

// TestStatusExitCodes: `meshd status` (text and --json) exits 0 only
// while the node is running, warnings or not, and 1 with the state and
// its reason on stderr otherwise; no daemon is 1 too.
func TestStatusExitCodes(t *testing.T) {
	f := &fakeDaemon{}
	sock := serveFake(t, f)
	self := &localapi.Node{Hostname: "gpu-0"}
	for _, tt := range []struct {
		name string
		st   localapi.Status
		code int
		err  string // in stderr
	}{
		{"running", localapi.Status{BackendState: localapi.StateRunning, Self: self}, 0, ""},
		{"running with warnings", localapi.Status{BackendState: localapi.StateRunning, Self: self,
			Health: []localapi.HealthWarning{{Code: localapi.HealthNoRelay, Message: "no DERP relay connected"}}}, 0, ""},
		{"stopped", localapi.Status{BackendState: localapi.StateStopped, Self: self}, 1, "not running: Stopped"},
		{"starting", localapi.Status{BackendState: localapi.StateStarting, Self: self, Message: "coordinator: connecting to https://c"}, 1, "not running: Starting: coordinator: connecting"},
		{"logged out", localapi.Status{BackendState: localapi.StateNeedsLogin, Message: "not registered: run meshd up"}, 1, "not running: NeedsLogin: not registered"},
		{"approval", localapi.Status{BackendState: localapi.StateNeedsApproval, Self: self, Message: "waiting for approval by an admin: meshd admin nodes approve 3"}, 1, "NeedsApproval: waiting for approval"},
		{"expired", localapi.Status{BackendState: localapi.StateExpired, Self: self, Message: "expired: \x1b[31mre-enrol"}, 1, "not running: Expired: expired: [31mre-enrol"},
	} {
		f.set(tt.st)
		for _, args := range [][]string{{"status"}, {"status", "--json"}} {
			t.Run(tt.name+" "+strings.Join(args, " "), func(t *testing.T) {
				var out, errb bytes.Buffer
				code := run(context.Background(), append(args, "--socket", sock), &out, &errb)
				if code != tt.code {
					t.Fatalf("exit %d, want %d; stderr %q", code, tt.code, errb.String())
				}
				if tt.err != "" && !strings.Contains(errb.String(), tt.err) {
					t.Errorf("stderr %q, want %q", errb.String(), tt.err)
				}
				if strings.Contains(errb.String(), "\x1b") {
					t.Errorf("stderr carries a control character: %q", errb.String())
				}
				if tt.code == 0 && errb.Len() != 0 {
					t.Errorf("stderr %q on a running node", errb.String())
				}
			})
		}
	}
	var out, errb bytes.Buffer
	if code := run(context.Background(), []string{"status", "--socket", filepath.Join(t.TempDir(), "none.sock")}, &out, &errb); code != 1 || !strings.Contains(errb.String(), "no daemon") {
		t.Errorf("no daemon: exit %d, stderr %q; want 1, no daemon", code, errb.String())
	}
}

// TestStatusPrintsHealth: the text status prints each warning once (MTU
// problems stay on their per-peer line), and --json carries them all.
func TestStatusPrintsHealth(t *testing.T) {
	st := &localapi.Status{BackendState: localapi.StateRunning, Self: &localapi.Node{Hostname: "gpu-0"},
		Message: "coordinator unreachable, running on the last network map: dial tcp: refused",
		Health: []localapi.HealthWarning{
			{Code: localapi.HealthCoordinatorUnreachable, Message: "coordinator unreachable"},
			{Code: localapi.HealthMTUProblem, Message: "direct path drops full-size packets to gpu-2"},
			{Code: localapi.HealthClockSkew, Message: "this node's clock is 2m0s behind the coordinator's"},
		}}
	var b bytes.Buffer
	writeStatus(&b, st)
	out := b.String()
	if !strings.Contains(out, "# health: clock_skew: this node's clock is 2m0s behind") {
		t.Errorf("no clock skew line:\n%s", out)
	}
	if strings.Contains(out, "# health: mtu_problem") || strings.Contains(out, "# health: coordinator_unreachable") {
		t.Errorf("a warning printed twice:\n%s", out)
	}
}

// TestWait: meshd wait's loop returns as soon as the node runs (and the
// peer answers), keeps asking through no daemon, other states and ping
// failures, and on timeout says what it still waited for. It runs in a
// synctest bubble, so the intervals and timeouts are virtual.
func TestWait(t *testing.T) {
	type step struct {
		at      time.Duration // from the start
		st      *localapi.Status
		err     error
		pingErr error
	}
	running := &localapi.Status{BackendState: localapi.StateRunning}
	starting := &localapi.Status{BackendState: localapi.StateStarting, Message: "coordinator: connecting"}
	noDaemon := errors.New("wrapped: " + localapi.ErrNoDaemon.Error())
	for _, tt := range []struct {
		name    string
		peer    string
		steps   []step
		timeout time.Duration
		ready   time.Duration // when wait returns ready; 0: it times out
		why     string        // the reason on timeout
	}{
		{"ready at once", "", []step{{0, running, nil, nil}}, time.Minute, time.Nanosecond, ""},
		{"daemon starts later", "", []step{{0, nil, noDaemon, nil}, {3 * time.Second, starting, nil, nil}, {7 * time.Second, running, nil, nil}}, time.Minute, 7250 * time.Millisecond, ""},
		{"never runs", "", []step{{0, starting, nil, nil}}, 10 * time.Second, 0, "not running: Starting: coordinator: connecting"},
		{"peer answers later", "gpu-2", []step{{0, running, nil, errors.New("no pong")}, {5 * time.Second, running, nil, nil}}, time.Minute, 5250 * time.Millisecond, ""},
		{"peer never answers", "gpu-2", []step{{0, running, nil, errors.New("no pong")}}, 10 * time.Second, 0, "peer gpu-2 not reachable: no pong"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				start := time.Now()
				cur := func() step {
					e := time.Since(start)
					s := tt.steps[0]
					for _, x := range tt.steps {
						if e >= x.at {
							s = x
						}
					}
					return s
				}
				w := waiter{
					status: func(context.Context) (*localapi.Status, error) {
						s := cur()
						if s.err != nil {
							return nil, s.err
						}
						return s.st, nil
					},
					peer:     tt.peer,
					interval: 250 * time.Millisecond,
					ping:     func(context.Context, string) error { return cur().pingErr },
				}
				ctx, cancel := context.WithTimeout(context.Background(), tt.timeout)
				defer cancel()
				why := w.wait(ctx)
				took := time.Since(start)
				if tt.ready != 0 {
					if why != "" {
						t.Fatalf("not ready: %s", why)
					}
					if took > tt.ready {
						t.Errorf("ready after %v, want by %v", took, tt.ready)
					}
					return
				}
				if why == "" || !strings.Contains(why, tt.why) {
					t.Errorf("reason %q, want %q", why, tt.why)
				}
				if took != tt.timeout {
					t.Errorf("gave up after %v, want %v", took, tt.timeout)
				}
			})
		})
	}
}

// TestWaitCLI: the command itself against a fake daemon: exit 0 and
// "ready" on a running node, exit 1 naming the state after --timeout, and
// exit 2 for a negative timeout.
func TestWaitCLI(t *testing.T) {
	f := &fakeDaemon{}
	sock := serveFake(t, f)
	f.set(localapi.Status{BackendState: localapi.StateRunning})
	var out, errb bytes.Buffer
	if code := run(context.Background(), []string{"wait", "--timeout", "5s", "--socket", sock}, &out, &errb); code != 0 || !strings.Contains(out.String(), "ready") {
		t.Fatalf("running: exit %d, out %q, err %q", code, out.String(), errb.String())
	}
	f.set(localapi.Status{BackendState: localapi.StateStopped})
	out.Reset()
	errb.Reset()
	if code := run(context.Background(), []string{"wait", "--timeout", "300ms", "--socket", sock}, &out, &errb); code != 1 || !strings.Contains(errb.String(), "not running: Stopped") {
		t.Fatalf("stopped: exit %d, err %q", code, errb.String())
	}
	if code := run(context.Background(), []string{"wait", "--timeout", "-1s", "--socket", sock}, &out, &errb); code != 2 {
		t.Fatalf("negative timeout: exit %d", code)
	}
}

// TestMetricsCLI: meshd metrics prints what the daemon's /v0/metrics
// serves, and says when there is no daemon.
func TestMetricsCLI(t *testing.T) {
	sock := serveFake(t, &fakeDaemon{})
	var out, errb bytes.Buffer
	if code := run(context.Background(), []string{"metrics", "--socket", sock}, &out, &errb); code != 0 || !strings.Contains(out.String(), "meshd_peers 3") {
		t.Fatalf("exit %d, out %q, err %q", code, out.String(), errb.String())
	}
	errb.Reset()
	if code := run(context.Background(), []string{"metrics", "--socket", filepath.Join(t.TempDir(), "x.sock")}, &out, &errb); code != 1 || !strings.Contains(errb.String(), "no daemon") {
		t.Fatalf("no daemon: exit %d, err %q", code, errb.String())
	}
}
