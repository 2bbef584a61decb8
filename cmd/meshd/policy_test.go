package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
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
		{"ssh", `"ssh": [{"action": "accept", "src": ["group:eng"], "dst": ["tag:srv"], "users": ["root"]}],`},
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
