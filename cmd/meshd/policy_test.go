package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"meshd.dev/meshd/control"
	"meshd.dev/meshd/policy"
)

// The compiled policy is what the coordinator's policy seam takes.
var _ control.Policy = (*policy.Engine)(nil)

// runPolicy runs `meshd policy ARGS...` and returns its exit code and output.
func runPolicy(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := run(context.Background(), append([]string{"policy"}, args...), &stdout, &stderr)
	return code, stdout.String(), stderr.String()
}

func writePolicy(t *testing.T, name, body string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

const seedPolicy = "../../policy/testdata/seed.hujson"

func TestPolicyCheck(t *testing.T) {
	code, out, _ := runPolicy(t, "check", seedPolicy)
	if code != 0 || !strings.Contains(out, "valid: 7 rule(s), 7 test(s) pass, 0 warning(s)") {
		t.Errorf("check seed: exit %d, output %q", code, out)
	}

	bad := writePolicy(t, "bad.hujson", `{
	"tagOwners": {"tag:srv": []},
	"grants": [
		{"src": ["group:missing"], "dst": ["tag:srv"], "ip": ["99999"]},
	],
}`)
	code, out, stderr := runPolicy(t, "check", bad)
	if code != 1 {
		t.Errorf("check bad: exit %d, want 1", code)
	}
	for _, want := range []string{bad + `:4:12: src: unknown group "group:missing"`, bad + `:4:57: ip: "99999" is not a port number 0-65535`} {
		if !strings.Contains(out, want) {
			t.Errorf("check bad: output lacks %q:\n%s", want, out)
		}
	}
	if !strings.Contains(stderr, "policy rejected: 2 problem(s)") {
		t.Errorf("stderr = %q", stderr)
	}

	failing := writePolicy(t, "failing.hujson", `{
	"tagOwners": {"tag:srv": []},
	"grants": [{"src": ["alice@example.com"], "dst": ["tag:srv"], "ip": ["22"]}],
	"tests": [
		{"src": "alice@example.com", "accept": ["tag:srv:443"]},
	],
}`)
	code, out, _ = runPolicy(t, "check", failing)
	if code != 1 || !strings.Contains(out, failing+":5:43: test failed: alice@example.com -> tag:srv:443 (tcp) is denied") {
		t.Errorf("check failing test: exit %d, output %q", code, out)
	}

	kube := writePolicy(t, "kube.hujson", `{
	"tagOwners": {"tag:k8s": []},
	"grants": [
		{"src": ["*"], "dst": ["tag:k8s"], "app": {"tailscale.com/cap/kubernetes": [{"impersonate": {"groups": ["a"], "users": ["root"]}}]}},
	],
}`)
	code, out, _ = runPolicy(t, "check", kube)
	if code != 1 || !strings.Contains(out, kube+`:4:113: capability tailscale.com/cap/kubernetes: unknown field "users" in impersonate`) {
		t.Errorf("check kubernetes capability: exit %d, output %q", code, out)
	}

	wide := writePolicy(t, "wide.hujson", `{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}`)
	code, out, _ = runPolicy(t, "check", wide)
	if code != 0 || !strings.Contains(out, wide+":1:11: warning: wide rule") {
		t.Errorf("check wide: exit %d, output %q", code, out)
	}
	if code, _, _ = runPolicy(t, "check", "--strict", wide); code != 1 {
		t.Errorf("check --strict wide: exit %d, want 1", code)
	}
	// Flags after the file work too, as users type them.
	if code, _, _ = runPolicy(t, "check", wide, "--strict"); code != 1 {
		t.Errorf("check wide --strict: exit %d, want 1", code)
	}

	code, out, _ = runPolicy(t, "check", "--json", bad)
	var res struct {
		Valid  bool `json:"valid"`
		Errors []struct {
			Line, Col int
			Message   string
		} `json:"errors"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil || code != 1 || res.Valid || len(res.Errors) != 2 || res.Errors[0].Line != 4 || res.Errors[0].Col != 12 {
		t.Errorf("check --json: exit %d, %+v, %v:\n%s", code, res, err, out)
	}

	if code, _, stderr = runPolicy(t, "check", filepath.Join(t.TempDir(), "nope.hujson")); code != 1 || !strings.Contains(stderr, "no such file") {
		t.Errorf("check missing file: exit %d, stderr %q", code, stderr)
	}
	if code, _, _ = runPolicy(t, "check"); code != 2 {
		t.Errorf("check without a file: exit %d, want 2", code)
	}
}

// TestPolicyCheckUnenforcedSections: a section meshd parses but does not
// enforce is a warning at its line, naming it; --strict makes it fail.
func TestPolicyCheckUnenforcedSections(t *testing.T) {
	const hdr = `{
	"groups": {"group:eng": ["alice@example.com"]},
	"tagOwners": {"tag:srv": ["group:eng"]},
	"grants": [{"src": ["group:eng"], "dst": ["tag:srv"], "ip": ["22"]}],
`
	for _, tc := range []struct {
		section, body string
	}{
		{"nodeAttrs", `"nodeAttrs": [{"target": ["tag:srv"], "attr": ["funnel"]}],`},
	} {
		t.Run(tc.section, func(t *testing.T) {
			file := writePolicy(t, "p.hujson", hdr+"\t"+tc.body+"\n}\n")
			want := fmt.Sprintf(`%s:5:2: warning: section %q is not enforced: `, file, tc.section)
			code, out, _ := runPolicy(t, "check", file)
			if code != 0 || !strings.Contains(out, want) || !strings.Contains(out, "1 warning(s)") {
				t.Errorf("check: exit %d, want 0 and a line starting %q:\n%s", code, want, out)
			}
			code, out, stderr := runPolicy(t, "check", "--strict", file)
			if code != 1 || !strings.Contains(out, want) || !strings.Contains(stderr, "1 warning(s) and --strict is set") {
				t.Errorf("check --strict: exit %d, want 1 and a line starting %q:\n%s%s", code, want, out, stderr)
			}
		})
	}
}

func TestPolicyExplain(t *testing.T) {
	code, out, _ := runPolicy(t, "explain", seedPolicy, "--src", "group:ml-engineers", "--dst", "tag:training-cluster:8080")
	if code != 0 || strings.Count(out, "allowed: ") != 2 || !strings.Contains(out, "bob@example.com -> tag:training-cluster:8080 (tcp) by the rule at ../../policy/testdata/seed.hujson:40") {
		t.Errorf("explain allowed: exit %d, output %q", code, out)
	}
	code, out, _ = runPolicy(t, "explain", seedPolicy, "--src", "tag:ci", "--dst", "tag:inference-server:22")
	if code != 1 || !strings.Contains(out, "denied:  tag:ci -> tag:inference-server:22 (tcp): no rule allows it (deny by default)") {
		t.Errorf("explain denied: exit %d, output %q", code, out)
	}
	code, out, _ = runPolicy(t, "explain", "--proto", "udp", "--json", seedPolicy, "--src", "alice@example.com", "--dst", "tag:inference-server:4789")
	var ex struct {
		Allowed  bool
		Verdicts []struct{ Rule string }
	}
	if err := json.Unmarshal([]byte(out), &ex); err != nil || code != 0 || !ex.Allowed || ex.Verdicts[0].Rule != seedPolicy+":33" {
		t.Errorf("explain --json: exit %d, %+v, %v", code, ex, err)
	}
	if code, _, stderr := runPolicy(t, "explain", seedPolicy, "--src", "alice@example.com", "--dst", "tag:prod:1-2"); code != 1 || !strings.Contains(stderr, "name one port") {
		t.Errorf("explain bad dst: exit %d, stderr %q", code, stderr)
	}
	if code, _, _ := runPolicy(t, "explain", seedPolicy); code != 2 {
		t.Errorf("explain without --src/--dst: exit %d, want 2", code)
	}
}

func TestPolicyDiff(t *testing.T) {
	seed, err := os.ReadFile(seedPolicy)
	if err != nil {
		t.Fatal(err)
	}
	changed := strings.Replace(string(seed), `"ip": ["22", "8080"]`, `"ip": ["22", "6006"]`, 1)
	changed = strings.Replace(changed, `"tag:training-cluster:6006", `, "", 1)
	changed = strings.Replace(changed, `, "tag:training-cluster:8080"`, "", 1)
	newPath := writePolicy(t, "new.hujson", changed)
	code, out, _ := runPolicy(t, "diff", seedPolicy, newPath)
	want := []string{
		"opened by " + newPath + " (1):",
		"+ group:ml-engineers -> tag:training-cluster:6006 (tcp,udp)  [" + newPath + ":40]",
		"closed by " + newPath + " (1):",
		"- group:ml-engineers -> tag:training-cluster:8080 (tcp,udp)  [" + seedPolicy + ":40]",
	}
	for _, w := range want {
		if !strings.Contains(out, w) {
			t.Errorf("diff output lacks %q:\n%s", w, out)
		}
	}
	if code != 0 {
		t.Errorf("diff: exit %d", code)
	}
	if code, out, _ = runPolicy(t, "diff", seedPolicy, seedPolicy); code != 0 || !strings.Contains(out, "no change in allowed flows") {
		t.Errorf("diff same: exit %d, output %q", code, out)
	}
	bad := writePolicy(t, "bad.hujson", `{"grants": [}`)
	if code, out, _ = runPolicy(t, "diff", seedPolicy, bad); code != 1 || !strings.Contains(out, bad+":1:13: syntax error") {
		t.Errorf("diff bad: exit %d, output %q", code, out)
	}
}

// TestReadmeWalkPolicies: the README's five-minute walk checks its policy,
// edits it with the sed line it shows, and diffs the two: both must be
// valid, and the edit must open exactly SSH for engineers, so that the walk
// does what its comments say.
func TestReadmeWalkPolicies(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	_, walk, ok := strings.Cut(string(b), "## Five minutes: two nodes under a policy\n")
	_, rest, ok2 := strings.Cut(walk, "cat > policy.hujson <<'EOF'\n")
	pol, rest, ok3 := strings.Cut(rest, "\nEOF\n")
	_, sedLine, ok4 := strings.Cut(rest, "\nsed '")
	script, _, ok5 := strings.Cut(sedLine, "' policy.hujson > policy2.hujson")
	if !ok || !ok2 || !ok3 || !ok4 || !ok5 {
		t.Fatal("README: the five-minute walk lost its policy heredoc or its sed line")
	}
	dir := t.TempDir()
	before := filepath.Join(dir, "policy.hujson")
	if err := os.WriteFile(before, []byte(pol+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	after, err := exec.Command("sed", script, before).Output()
	if err != nil {
		t.Fatalf("sed %q: %v", script, err)
	}
	afterFile := filepath.Join(dir, "policy2.hujson")
	if err := os.WriteFile(afterFile, after, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{before, afterFile} {
		if code, out, errOut := runCLI("policy", "check", "--strict", f); code != 0 {
			t.Fatalf("policy check --strict %s: exit %d\n%s%s", filepath.Base(f), code, out, errOut)
		}
	}
	code, out, errOut := runCLI("policy", "diff", before, afterFile)
	want := "opened by " + afterFile + " (1):\n  + group:engineers -> tag:inference:22 (tcp)  [" + afterFile + ":5]\n"
	if code != 0 || out != want {
		t.Fatalf("policy diff: exit %d\n%s%s\nwant:\n%s", code, out, errOut, want)
	}
}

// TestPolicyExplainSSH: --ssh-user says which ssh rule lets a login in
// and which rule opens port 22; a login without either is denied.
func TestPolicyExplainSSH(t *testing.T) {
	file := writePolicy(t, "ssh.hujson", `{
	"groups": {"group:eng": ["alice@example.com", "bob@example.com"]},
	"tagOwners": {"tag:gpu": [], "tag:vendor": []},
	"grants": [{"src": ["group:eng"], "dst": ["tag:gpu"], "ip": ["tcp:22"]}],
	"ssh": [
		{"action": "accept", "src": ["group:eng"], "dst": ["tag:gpu"], "users": ["autogroup:nonroot"]},
		{"action": "check", "src": ["tag:vendor"], "dst": ["tag:gpu"], "users": ["vendor"]},
	],
	"sshTests": [{"src": "alice@example.com", "dst": ["tag:gpu"], "accept": ["alice"], "deny": ["root"]}],
}
`)
	for _, tc := range []struct {
		src, user string
		code      int
		want      string
	}{
		{"group:eng", "ubuntu", 0, `accept: ssh bob@example.com -> tag:gpu as "ubuntu" by the ssh rule at ` + file + `:6 (tcp:22 by the rule at ` + file + `:4)`},
		{"alice@example.com", "root", 1, `denied:  ssh alice@example.com -> tag:gpu as "root": no ssh rule allows it`},
		{"tag:vendor", "vendor", 1, `the ssh rule at ` + file + `:7 would check it, but no acl or grant lets it reach tcp:22`},
	} {
		code, out, stderr := runPolicy(t, "explain", file, "--src", tc.src, "--dst", "tag:gpu", "--ssh-user", tc.user)
		if code != tc.code || !strings.Contains(out, tc.want) {
			t.Errorf("%s as %s: exit %d, out %q, stderr %q; want %d and %q", tc.src, tc.user, code, out, stderr, tc.code, tc.want)
		}
	}
	if code, _, _ := runPolicy(t, "explain", file, "--src", "tag:vendor", "--dst", "tag:gpu", "--ssh-user", "vendor", "--proto", "udp"); code != 2 {
		t.Errorf("--proto with --ssh-user: exit %d, want 2", code)
	}
	// A failing sshTests entry fails policy check.
	src, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	bad := writePolicy(t, "bad.hujson", strings.Replace(string(src), `"accept": ["alice"], "deny": ["root"]`, `"accept": ["alice", "root"]`, 1))
	if code, out, _ := runPolicy(t, "check", bad); code != 1 || !strings.Contains(out, `ssh test failed: alice@example.com -> tag:gpu as "root" is denied`) {
		t.Errorf("check with a failing ssh test: exit %d, %q", code, out)
	}
}
