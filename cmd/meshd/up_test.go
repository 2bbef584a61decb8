package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"meshd.dev/meshd/agent/localapi"
)

// upBackend records `meshd up` requests and answers with state; WaitState
// answers after (or blocks when) the test says.
type upBackend struct {
	mu      sync.Mutex
	reqs    []localapi.UpRequest
	state   string
	after   string // WaitState's answer; "" blocks until the request ends
	upError error
}

func (b *upBackend) Up(_ context.Context, req localapi.UpRequest) (*localapi.Status, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.reqs = append(b.reqs, req)
	if b.upError != nil {
		return nil, b.upError
	}
	return &localapi.Status{BackendState: b.state, Self: &localapi.Node{ID: 9, Hostname: "gpu-9"}}, nil
}

func (b *upBackend) WaitState(ctx context.Context, from string) (*localapi.Status, error) {
	if b.after == "" {
		<-ctx.Done()
		return &localapi.Status{BackendState: from}, nil
	}
	return &localapi.Status{BackendState: b.after, Self: &localapi.Node{ID: 9, Hostname: "gpu-9"}}, nil
}

func (b *upBackend) Down(context.Context) error { return nil }
func (b *upBackend) Status(context.Context) (*localapi.Status, error) {
	return &localapi.Status{BackendState: b.state}, nil
}
func (b *upBackend) Drops(context.Context) (*localapi.Drops, error) { return &localapi.Drops{}, nil }

func serveUpBackend(t *testing.T, b *upBackend) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "meshd.sock")
	ln, err := localapi.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- localapi.Serve(ctx, ln, b) }()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	return sock
}

// TestUpRequestSources checks what `meshd up` tells the daemon: which
// settings were given at all (--advertise-tags= is "no tags", not "not
// given") and which came from the environment rather than the command line
// (MESHD_AUTHKEY may be ignored when not needed; --authkey may not).
func TestUpRequestSources(t *testing.T) {
	for _, tt := range []struct {
		name string
		env  map[string]string
		args []string
		want localapi.UpRequest
	}{
		{"nothing", nil, nil, localapi.UpRequest{}},
		{"authkey flag", nil, []string{"--authkey", "k"}, localapi.UpRequest{AuthKey: "k"}},
		{"authkey from the environment", map[string]string{"MESHD_AUTHKEY": "e"}, nil, localapi.UpRequest{AuthKey: "e", AuthKeyFromEnv: true}},
		{"flag beats the environment", map[string]string{"MESHD_AUTHKEY": "e"}, []string{"-authkey=k"}, localapi.UpRequest{AuthKey: "k"}},
		{"explicitly no tags", nil, []string{"--advertise-tags="}, localapi.UpRequest{Tags: []string{}, SetTags: true}},
		{"tags flag", nil, []string{"--advertise-tags", "tag:a, tag:b"}, localapi.UpRequest{Tags: []string{"tag:a", "tag:b"}, SetTags: true}},
		{"tags from the environment", map[string]string{"MESHD_ADVERTISE_TAGS": "tag:a"}, nil, localapi.UpRequest{Tags: []string{"tag:a"}, SetTags: true, TagsFromEnv: true}},
		{"force-reauth", map[string]string{"MESHD_HOSTNAME": "h"}, []string{"--force-reauth", "--authkey", "k"}, localapi.UpRequest{AuthKey: "k", ForceReauth: true, Hostname: "h"}},
		{"accept-dns=false", nil, []string{"--accept-dns=false"}, localapi.UpRequest{AcceptDNS: new(false)}},
		{"accept-dns", nil, []string{"--accept-dns"}, localapi.UpRequest{AcceptDNS: new(true)}},
		{"accept-dns from the environment", map[string]string{"MESHD_ACCEPT_DNS": "false"}, nil, localapi.UpRequest{AcceptDNS: new(false), AcceptDNSFromEnv: true}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			for _, k := range []string{"MESHD_AUTHKEY", "MESHD_ADVERTISE_TAGS", "MESHD_HOSTNAME", "MESHD_FORCE_REAUTH", "MESHD_COORDINATOR", "MESHD_ACCEPT_DNS"} {
				t.Setenv(k, tt.env[k])
			}
			b := &upBackend{state: localapi.StateRunning}
			sock := serveUpBackend(t, b)
			var stdout, stderr bytes.Buffer
			if code := run(context.Background(), append([]string{"up", "--socket", sock}, tt.args...), &stdout, &stderr); code != 0 {
				t.Fatalf("exit %d: %s", code, stderr.String())
			}
			if len(b.reqs) != 1 {
				t.Fatalf("%d requests", len(b.reqs))
			}
			got, want := b.reqs[0], tt.want
			if got.AuthKey != want.AuthKey || got.AuthKeyFromEnv != want.AuthKeyFromEnv || got.SetTags != want.SetTags || got.TagsFromEnv != want.TagsFromEnv ||
				got.ForceReauth != want.ForceReauth || got.Hostname != want.Hostname || !slices.Equal(got.Tags, want.Tags) ||
				(got.AcceptDNS == nil) != (want.AcceptDNS == nil) || got.AcceptDNS != nil && *got.AcceptDNS != *want.AcceptDNS || got.AcceptDNSFromEnv != want.AcceptDNSFromEnv {
				t.Errorf("request %+v, want %+v", got, want)
			}
		})
	}
}

// TestUpWaitsForApprovalCLI: `meshd up` says the node waits for an admin,
// waits, and says when it came up; with --timeout it gives up with exit 1
// and says the node comes up by itself later. A refused up exits 1 with the
// daemon's reason.
func TestUpWaitsForApprovalCLI(t *testing.T) {
	t.Setenv("MESHD_AUTHKEY", "")
	for _, tt := range []struct {
		name     string
		b        *upBackend
		args     []string
		code     int
		stdout   []string
		stderr   string
		tooShort time.Duration
	}{
		{name: "approved", b: &upBackend{state: localapi.StateNeedsApproval, after: localapi.StateRunning},
			stdout: []string{"waiting for approval by an admin: meshd admin nodes approve 9", "meshd: running as gpu-9"}},
		{name: "timeout", b: &upBackend{state: localapi.StateNeedsApproval}, args: []string{"--timeout", "200ms"}, code: 1,
			stdout: []string{"waiting for approval by an admin"}, stderr: "still waiting for approval by an admin after 200ms", tooShort: 200 * time.Millisecond},
		{name: "deleted while waiting", b: &upBackend{state: localapi.StateNeedsApproval, after: localapi.StateNeedsLogin}, code: 1,
			stdout: []string{"waiting for approval", "meshd: NeedsLogin"}},
		{name: "refused", b: &upBackend{upError: errors.New("this node is already registered (as gpu-9, node 9): --authkey only enrols a node")},
			args: []string{"--authkey", "k"}, code: 1, stderr: "--authkey only enrols a node"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			sock := serveUpBackend(t, tt.b)
			var stdout, stderr bytes.Buffer
			begin := time.Now()
			code := run(context.Background(), append([]string{"up", "--socket", sock}, tt.args...), &stdout, &stderr)
			if code != tt.code {
				t.Fatalf("exit %d, want %d; stdout %q stderr %q", code, tt.code, stdout.String(), stderr.String())
			}
			for _, w := range tt.stdout {
				if !strings.Contains(stdout.String(), w) {
					t.Errorf("stdout lacks %q:\n%s", w, stdout.String())
				}
			}
			if !strings.Contains(stderr.String(), tt.stderr) {
				t.Errorf("stderr lacks %q:\n%s", tt.stderr, stderr.String())
			}
			if d := time.Since(begin); d < tt.tooShort {
				t.Errorf("returned after %v, before the --timeout", d)
			}
		})
	}
}

// TestUpForegroundApproval runs the sidecar form against a coordinator
// that requires approval: `up --foreground` says the node waits, comes up
// when an admin approves it, and with --timeout stops (exit 1) when nobody
// does.
func TestUpForegroundApproval(t *testing.T) {
	cr := startCoordinatorArgs(t, "--require-approval")
	t.Setenv("MESHD_COORDINATOR", cr.url)
	t.Setenv("MESHD_TOKEN_FILE", filepath.Join(cr.dir, "admin.token"))
	t.Setenv("MESHD_AUTHKEY", "")
	code, out, errOut := runAdmin(t, "keys", "create", "--tags", "tag:side", "--reusable")
	if code != 0 {
		t.Fatalf("keys create: %d %s", code, errOut)
	}
	key := strings.TrimSpace(out)
	foreground := func(ctx context.Context, name string, extra ...string) (lines <-chan string, exit <-chan int) {
		dir := t.TempDir()
		args := append([]string{"up", "--foreground", "--authkey", key, "--hostname", name, "--state-dir", filepath.Join(dir, "state"),
			"--socket", filepath.Join(dir, "s.sock"), "--tun", "userspace", "--port", "0", "--loopback-only"}, extra...)
		pr, pw := io.Pipe()
		ch, done := make(chan string, 16), make(chan int, 1)
		go func() {
			done <- run(ctx, args, pw, io.Discard)
			pw.Close()
		}()
		go func() {
			sc := bufio.NewScanner(pr)
			for sc.Scan() {
				ch <- sc.Text()
			}
			close(ch)
		}()
		return ch, done
	}
	next := func(lines <-chan string, want string) string {
		t.Helper()
		select {
		case l := <-lines:
			if !strings.Contains(l, want) {
				t.Fatalf("output line %q, want %q", l, want)
			}
			return l
		case <-time.After(30 * time.Second):
			t.Fatalf("no output line %q", want)
		}
		return ""
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	lines, exit := foreground(ctx, "side")
	l := next(lines, "waiting for approval by an admin: meshd admin nodes approve ")
	id := l[strings.LastIndex(l, " ")+1:]
	if code, _, errOut := runAdmin(t, "nodes", "approve", id); code != 0 {
		t.Fatalf("approve: %d %s", code, errOut)
	}
	next(lines, "meshd: running as side")
	cancel()
	if code := <-exit; code != 0 {
		t.Fatalf("up --foreground exit %d after SIGTERM", code)
	}

	lines, exit = foreground(context.Background(), "impatient", "--timeout", "300ms")
	next(lines, "waiting for approval by an admin")
	select {
	case code := <-exit:
		if code != 1 {
			t.Fatalf("up --foreground --timeout exit %d, want 1", code)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("up --foreground --timeout 300ms did not give up")
	}
}

// TestUpHostnameCase: the coordinator lowercases names ("NodeA" becomes
// "nodea"). Neither the first `meshd up --hostname NodeA` nor a later one
// with the same name in any case (on the command line, from MESHD_HOSTNAME,
// after a daemon restart) prints a note about a hostname not applied: the
// user asked for no change. Another name is still refused.
func TestUpHostnameCase(t *testing.T) {
	url, cdir := startCoordinator(t)
	t.Setenv("MESHD_COORDINATOR", url)
	t.Setenv("MESHD_TOKEN_FILE", filepath.Join(cdir, "admin.token"))
	t.Setenv("MESHD_AUTHKEY", "")
	t.Setenv("MESHD_HOSTNAME", "")
	code, out, errOut := runAdmin(t, "keys", "create", "--tags", "tag:case", "--reusable")
	if code != 0 {
		t.Fatalf("keys create: %d %s", code, errOut)
	}
	key := strings.TrimSpace(out)
	dir := t.TempDir()
	sock := filepath.Join(dir, "meshd.sock")
	daemon := func() (stop func()) {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan int, 1)
		go func() {
			done <- run(ctx, []string{"daemon", "--state-dir", filepath.Join(dir, "state"), "--socket", sock,
				"--tun", "userspace", "--port", "0", "--loopback-only"}, io.Discard, io.Discard)
		}()
		return func() {
			cancel()
			if code := <-done; code != 0 {
				t.Errorf("daemon exit %d", code)
			}
		}
	}
	up := func(args ...string) (int, string) {
		t.Helper()
		var stdout, stderr bytes.Buffer
		// The daemon may still be creating its socket.
		for range 100 {
			stdout.Reset()
			stderr.Reset()
			code := run(context.Background(), append([]string{"up", "--socket", sock}, args...), &stdout, &stderr)
			if code == 0 || !strings.Contains(stderr.String(), "no daemon at") {
				return code, stdout.String() + stderr.String()
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Fatal("the daemon never listened")
		return 0, ""
	}
	stop := daemon()
	for _, step := range []struct {
		name string
		env  string // MESHD_HOSTNAME
		args []string
		fail string // "": must succeed without a note
	}{
		{name: "first up", args: []string{"--authkey", key, "--coordinator", url, "--hostname", "NodeA"}},
		{name: "same name on the command line", args: []string{"--hostname", "NodeA"}},
		{name: "same name, other case", args: []string{"--hostname", "NODEA"}},
		{name: "same name from the environment", env: "nodeA"},
		{name: "another name", args: []string{"--hostname", "NodeB"}, fail: "does not rename"},
		{name: "after a daemon restart"},
	} {
		t.Run(step.name, func(t *testing.T) {
			t.Setenv("MESHD_HOSTNAME", step.env)
			if step.name == "after a daemon restart" {
				stop()
				stop = daemon()
				step.args = []string{"--hostname", "NodeA"}
			}
			code, out := up(step.args...)
			if step.fail != "" {
				if code == 0 || !strings.Contains(out, step.fail) {
					t.Fatalf("exit %d, output %q; want a failure saying %q", code, out, step.fail)
				}
				return
			}
			if code != 0 || !strings.Contains(out, "meshd: running as nodea ") {
				t.Fatalf("exit %d, output %q; want running as nodea", code, out)
			}
			if strings.Contains(out, "note") || strings.Contains(out, "not applied") {
				t.Errorf("output %q has a note the user did not ask for", out)
			}
		})
	}
	stop()

	// The sidecar form: its first up prints the same.
	t.Run("foreground", func(t *testing.T) {
		t.Setenv("MESHD_HOSTNAME", "")
		fdir := t.TempDir()
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		var stdout syncBuffer
		done := make(chan int, 1)
		go func() {
			done <- run(ctx, []string{"up", "--foreground", "--authkey", key, "--coordinator", url, "--hostname", "SideCar",
				"--state-dir", filepath.Join(fdir, "state"), "--socket", filepath.Join(fdir, "s.sock"),
				"--tun", "userspace", "--port", "0", "--loopback-only"}, &stdout, io.Discard)
		}()
		deadline := time.Now().Add(30 * time.Second)
		for !strings.Contains(stdout.String(), "running as") && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		cancel()
		if code := <-done; code != 0 {
			t.Errorf("up --foreground exit %d", code)
		}
		out := stdout.String()
		if !strings.Contains(out, "meshd: running as sidecar ") || strings.Contains(out, "note") {
			t.Errorf("up --foreground output %q: want running as sidecar and no note", out)
		}
	})
}
