package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"meshd.dev/meshd/control"
)

const cliGoodPolicy = `// ops may reach the GPU servers on 22
{
	"groups": {"group:ops": ["alice@example.com"]},
	"tagOwners": {"tag:gpu": []},
	"grants": [{"src": ["group:ops"], "dst": ["tag:gpu"], "ip": ["22"]}],
	"tests": [{"src": "alice@example.com", "accept": ["tag:gpu:22"], "deny": ["tag:gpu:80"]}],
}
`

const cliBadPolicy = `{
	"tagOwners": {"tag:gpu": []},
	"grants": [{"src": ["group:nobody"], "dst": ["tag:gpu"], "ip": ["22"]}],
}
`

func writeFile(t *testing.T, dir, name, text string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestAdminPolicyCommands(t *testing.T) {
	url, dir := startCoordinator(t)
	t.Setenv("MESHD_COORDINATOR", url)
	t.Setenv("MESHD_TOKEN_FILE", filepath.Join(dir, "admin.token"))
	files := t.TempDir()

	code, out, errOut := runAdmin(t, "policy", "get")
	if code != 0 || out != control.BootstrapPolicyText || !strings.Contains(errOut, control.BootstrapNotice) {
		t.Fatalf("get on a fresh coordinator: exit %d, stdout %q, stderr %q", code, out, errOut)
	}

	good := writeFile(t, files, "good.hujson", cliGoodPolicy)
	code, out, errOut = runAdmin(t, "policy", "set", good)
	if code != 0 || !strings.HasPrefix(out, "policy good.hujson in force: 1 rules, 1 tests passed") {
		t.Fatalf("set good: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	code, out, _ = runAdmin(t, "policy", "get")
	if code != 0 || out != cliGoodPolicy {
		t.Fatalf("get after set: exit %d, %q", code, out)
	}

	bad := writeFile(t, files, "bad.hujson", cliBadPolicy)
	code, out, errOut = runAdmin(t, "policy", "set", bad)
	if code != 1 || !strings.HasPrefix(errOut, "bad.hujson:3:") || strings.Contains(errOut, files) ||
		!strings.Contains(errOut, "bad.hujson rejected; the previous policy stays in force") {
		t.Fatalf("set bad: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	code, out, _ = runAdmin(t, "policy", "get", "--json")
	var p control.PolicyInfo
	if err := json.Unmarshal([]byte(out), &p); code != 0 || err != nil || p.File != "good.hujson" || p.Text != cliGoodPolicy || p.Bootstrap {
		t.Fatalf("get --json after a rejected set: exit %d, %+v, %v", code, p, err)
	}

	code, _, errOut = runAdmin(t, "policy", "set", filepath.Join(files, "missing.hujson"))
	if code != 1 || !strings.Contains(errOut, "missing.hujson") {
		t.Fatalf("set of a missing file: exit %d, %q", code, errOut)
	}
}

func TestCoordinatorPolicyFlag(t *testing.T) {
	files := t.TempDir()
	bad := writeFile(t, files, "bad.hujson", cliBadPolicy)
	var stdout, stderr bytes.Buffer
	code := run(context.Background(), []string{"coordinator", "--listen", "127.0.0.1:0", "--state-dir", t.TempDir(), "--policy", bad}, &stdout, &stderr)
	if code != 1 || !strings.Contains(stderr.String(), "bad.hujson:3:") || !strings.Contains(stderr.String(), "not starting") {
		t.Fatalf("coordinator --policy bad: exit %d, stderr %q", code, stderr.String())
	}

	good := writeFile(t, files, "good.hujson", cliGoodPolicy)
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"coordinator", "--listen", "127.0.0.1:0", "--state-dir", t.TempDir(), "--policy", good}, pw, io.Discard)
		pw.Close()
	}()
	sc := bufio.NewScanner(pr)
	var lines []string
	for len(lines) < 4 && sc.Scan() {
		lines = append(lines, sc.Text())
	}
	go io.Copy(io.Discard, pr)
	cancel()
	select {
	case code := <-done:
		if code != 0 {
			t.Errorf("coordinator exited %d after cancel", code)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("coordinator did not stop")
	}
	if len(lines) < 4 || !strings.HasPrefix(lines[3], "policy: good.hujson (1 rules, 1 tests") {
		t.Fatalf("start-up output %q: want the policy named", lines)
	}
}

// cliSSHPolicy has a "nodeAttrs" section, which meshd parses but does not
// enforce (line 5).
const cliSSHPolicy = `{
	"groups": {"group:ops": ["alice@example.com"]},
	"tagOwners": {"tag:gpu": ["group:ops"]},
	"grants": [{"src": ["group:ops"], "dst": ["tag:gpu"], "ip": ["22"]}],
	"nodeAttrs": [{"target": ["tag:gpu"], "attr": ["funnel"]}],
}
`

// TestPolicyWarningsSurface: a policy with a section meshd does not
// enforce is accepted with a FILE:LINE:COL warning naming the section,
// printed by admin policy set and by the coordinator started with it and
// logged by the coordinator; --strict rejects it and keeps the policy in
// force.
func TestPolicyWarningsSurface(t *testing.T) {
	files := t.TempDir()
	ssh := writeFile(t, files, "ssh.hujson", cliSSHPolicy)
	const warn = `ssh.hujson:5:2: warning: section "nodeAttrs" is not enforced`

	url, dir := startCoordinator(t)
	t.Setenv("MESHD_COORDINATOR", url)
	t.Setenv("MESHD_TOKEN_FILE", filepath.Join(dir, "admin.token"))
	good := writeFile(t, files, "good.hujson", cliGoodPolicy)
	if code, _, errOut := runAdmin(t, "policy", "set", good); code != 0 {
		t.Fatalf("set good: exit %d: %s", code, errOut)
	}
	code, out, errOut := runAdmin(t, "policy", "set", "--strict", ssh)
	if code != 1 || !strings.Contains(errOut, warn) || !strings.Contains(errOut, "rejected; the previous policy stays in force") {
		t.Fatalf("set --strict: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	if code, out, _ = runAdmin(t, "policy", "get"); code != 0 || out != cliGoodPolicy {
		t.Fatalf("after a --strict rejection the policy in force is %q", out)
	}
	code, out, errOut = runAdmin(t, "policy", "set", ssh)
	if code != 0 || !strings.Contains(errOut, warn) || !strings.HasPrefix(out, "policy ssh.hujson in force") {
		t.Fatalf("set: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	code, out, _ = runAdmin(t, "policy", "get", "--json")
	var p control.PolicyInfo
	if err := json.Unmarshal([]byte(out), &p); code != 0 || err != nil || len(p.Warnings) != 1 || !strings.HasPrefix(p.Warnings[0], warn) {
		t.Fatalf("get --json: exit %d, warnings %q, %v", code, p.Warnings, err)
	}

	// The coordinator started with it prints the warning and logs it.
	ctx, cancel := context.WithCancel(context.Background())
	var stderr syncBuffer
	pr, pw := io.Pipe()
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"coordinator", "--listen", "127.0.0.1:0", "--state-dir", t.TempDir(), "--policy", ssh}, pw, &stderr)
		pw.Close()
	}()
	sc := bufio.NewScanner(pr)
	for n := 0; n < 4 && sc.Scan(); n++ {
	}
	go io.Copy(io.Discard, pr)
	cancel()
	if code := <-done; code != 0 {
		t.Errorf("coordinator exited %d", code)
	}
	logged, printed := false, false
	for _, l := range strings.Split(stderr.String(), "\n") {
		printed = printed || strings.HasPrefix(l, warn)
		logged = logged || strings.Contains(l, "policy warning") && strings.Contains(l, "ssh.hujson:5:2")
	}
	if !printed || !logged {
		t.Fatalf("coordinator --policy: warning printed %v, logged %v:\n%s", printed, logged, stderr.String())
	}
}

// syncBuffer is a bytes.Buffer safe for a writer goroutine and a reader.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// coordinatorUntil runs `meshd coordinator` on dir until it prints a line
// starting with stop (then stops it) or exits, and returns its exit code,
// that line without the prefix ("" if it never came) and its stderr.
func coordinatorUntil(dir, stop string, args ...string) (code int, line, errOut string) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stderr syncBuffer
	pr, pw := io.Pipe()
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, append([]string{"coordinator", "--listen", "127.0.0.1:0", "--state-dir", dir}, args...), pw, &stderr)
		pw.Close()
	}()
	sc := bufio.NewScanner(pr)
	for sc.Scan() {
		if l, ok := strings.CutPrefix(sc.Text(), stop); ok && line == "" {
			line = l
			cancel()
		}
	}
	return <-done, line, stderr.String()
}

// TestCoordinatorInitState: a coordinator whose database vanished refuses
// to start and says what to do; --init-state starts it over once, and is
// refused on the intact database it made.
func TestCoordinatorInitState(t *testing.T) {
	dir := t.TempDir()
	coordinator := func(args ...string) (int, string) {
		code, _, errOut := coordinatorUntil(dir, "admin token: ", args...)
		return code, errOut
	}
	if code, errOut := coordinator(); code != 0 {
		t.Fatalf("first start: exit %d: %s", code, errOut)
	}
	if err := os.Remove(filepath.Join(dir, "coordinator.db")); err != nil {
		t.Fatal(err)
	}
	code, errOut := coordinator()
	if code != 1 || !strings.Contains(errOut, "refusing to start") || !strings.Contains(errOut, "--init-state") {
		t.Fatalf("start without the database: exit %d, stderr %q", code, errOut)
	}
	if code, errOut = coordinator("--init-state"); code != 0 {
		t.Fatalf("--init-state: exit %d: %s", code, errOut)
	}
	if code, errOut = coordinator("--init-state"); code != 1 || !strings.Contains(errOut, "intact") {
		t.Fatalf("--init-state on the intact database: exit %d, stderr %q", code, errOut)
	}
}

// cliIgnoredSettingPolicy carries a Tailscale setting meshd ignores
// (line 2): it loads with a warning.
const cliIgnoredSettingPolicy = `{
	"randomizeClientPort": true,
	"grants": [{"src": ["autogroup:member"], "dst": ["autogroup:self"], "ip": ["*"]}],
}
`

// TestPolicyStrictEverywhere: a construct meshd accepts with a warning is
// an error under --strict on every path a policy enters by: policy check,
// admin policy set, and the coordinator's --policy or stored policy with
// --policy-strict (which refuses to start and stores nothing).
func TestPolicyStrictEverywhere(t *testing.T) {
	files := t.TempDir()
	warned := writeFile(t, files, "warned.hujson", cliIgnoredSettingPolicy)
	const warn = `warned.hujson:2:2: warning: setting "randomizeClientPort" is ignored`

	if code, out, _ := runCLI("policy", "check", warned); code != 0 || !strings.Contains(out, warn) {
		t.Fatalf("policy check: exit %d, %q; want 0 with the warning", code, out)
	}
	if code, out, errOut := runCLI("policy", "check", "--strict", warned); code != 1 || !strings.Contains(out, warn) {
		t.Fatalf("policy check --strict: exit %d, %q %q; want 1 with the warning", code, out, errOut)
	}

	url, dir := startCoordinator(t)
	t.Setenv("MESHD_COORDINATOR", url)
	t.Setenv("MESHD_TOKEN_FILE", filepath.Join(dir, "admin.token"))
	if code, _, errOut := runAdmin(t, "policy", "set", "--strict", warned); code != 1 || !strings.Contains(errOut, warn) {
		t.Fatalf("admin policy set --strict: exit %d, %q; want 1 with the warning", code, errOut)
	}

	state := t.TempDir()
	code, _, errOut := coordinatorUntil(state, "policy: ", "--policy", warned, "--policy-strict")
	if code != 1 || !strings.Contains(errOut, warn) || !strings.Contains(errOut, "--policy-strict is set: not starting") {
		t.Fatalf("coordinator --policy --policy-strict: exit %d, stderr %q", code, errOut)
	}
	if code, line, errOut := coordinatorUntil(state, "policy: "); code != 0 || !strings.HasPrefix(line, "none loaded") {
		t.Fatalf("after the refusal: exit %d, policy %q (%s); want none stored", code, line, errOut)
	}
	if code, line, errOut := coordinatorUntil(state, "policy: ", "--policy", warned); code != 0 || !strings.HasPrefix(line, "warned.hujson") {
		t.Fatalf("coordinator --policy: exit %d, policy %q (%s)", code, line, errOut)
	}
	code, _, errOut = coordinatorUntil(state, "policy: ", "--policy-strict")
	if code != 1 || !strings.Contains(errOut, warn) {
		t.Fatalf("coordinator --policy-strict on the stored policy: exit %d, stderr %q", code, errOut)
	}
}

// TestPolicyDiffLive: --live compares the policy in force on the
// coordinator with a file and asks the coordinator what it would cut
// (control's TestPolicyCuts checks the cuts between connected nodes).
func TestPolicyDiffLive(t *testing.T) {
	files := t.TempDir()
	url, dir := startCoordinator(t)
	t.Setenv("MESHD_COORDINATOR", url)
	t.Setenv("MESHD_TOKEN_FILE", filepath.Join(dir, "admin.token"))
	good := writeFile(t, files, "good.hujson", cliGoodPolicy)
	if code, _, errOut := runAdmin(t, "policy", "set", good); code != 0 {
		t.Fatalf("set good: exit %d: %s", code, errOut)
	}
	narrower := writeFile(t, files, "none.hujson", `{"tagOwners": {"tag:gpu": []}}`)
	code, out, errOut := runCLI("policy", "diff", "--live", narrower)
	if code != 0 || !strings.Contains(out, "closed by "+narrower) || !strings.Contains(out, "no access in use-able now is cut: 0 node(s) connected") {
		t.Fatalf("policy diff --live: exit %d\nstdout %s\nstderr %s", code, out, errOut)
	}
	bad := writeFile(t, files, "bad.hujson", cliBadPolicy)
	if code, out, _ := runCLI("policy", "diff", "--live", bad); code != 1 || !strings.Contains(out, "bad.hujson:3:") {
		t.Fatalf("policy diff --live on an invalid file: exit %d, %q", code, out)
	}
	// The connection flags from the environment do not disturb an offline
	// diff; on the command line without --live they are an error.
	if code, out, errOut := runCLI("policy", "diff", good, narrower); code != 0 || !strings.Contains(out, "closed by") {
		t.Fatalf("offline diff with MESHD_COORDINATOR set: exit %d, %q %q", code, out, errOut)
	}
	if code, _, errOut := runCLI("policy", "diff", "--coordinator", "https://elsewhere:8443", good, narrower); code != 2 || !strings.Contains(errOut, "only with --live") {
		t.Fatalf("offline diff with --coordinator: exit %d, %q; want 2", code, errOut)
	}
	t.Setenv("MESHD_TOKEN_FILE", "")
	if code, _, errOut := runCLI("policy", "diff", "--live", narrower); code != 2 || !strings.Contains(errOut, "token") {
		t.Fatalf("policy diff --live without a token: exit %d, %q", code, errOut)
	}
}
