package policy

import (
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/netmap"
)

const sshPolicy = `{
	"groups": {"group:eng": ["alice@example.com"]},
	"hosts": {"bastion": "100.64.0.9"},
	"tagOwners": {"tag:gpu": [], "tag:vendor": [], "tag:recorder": []},
	"ssh": [
		{"action": "accept", "src": ["group:eng"], "dst": ["tag:gpu"], "users": ["autogroup:nonroot"], "acceptEnv": ["LANG", "GIT_*"]},
		{"action": "check", "src": ["tag:vendor"], "dst": ["tag:gpu"], "users": ["vendor"], "checkPeriod": "2h",
		 "recorder": ["tag:recorder"], "enforceRecorder": true},
		{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["localpart:*@example.com"]},
		{"action": "check", "src": ["bastion"], "dst": ["tag:gpu"], "users": ["root"]},
	],
}`

func TestSSHDecisions(t *testing.T) {
	p := mustParse(t, sshPolicy)
	var (
		gpu      = testNode(1, "", "tag:gpu")
		alice    = testNode(2, "alice@example.com")
		alice2   = testNode(3, "alice@example.com")
		bob      = testNode(4, "bob@example.com")
		vendor   = testNode(5, "", "tag:vendor")
		recorder = testNode(6, "", "tag:recorder")
		bastion  = testNode(9, "carol@other.example")
		mallory  = testNode(7, "mallory@evil.example")
	)
	for _, tc := range []struct {
		name     string
		src, dst *netmap.Node
		user     string
		action   string
		line     string
	}{
		{"member as itself", alice, gpu, "alice", netmap.SSHAccept, ":6"},
		{"nonroot allows any other user", alice, gpu, "postgres", netmap.SSHAccept, ":6"},
		{"nonroot excludes root", alice, gpu, "root", "", ""},
		{"no rule for bob on gpu", bob, gpu, "bob", "", ""},
		{"vendor checked", vendor, gpu, "vendor", netmap.SSHCheck, ":7"},
		{"vendor only as vendor", vendor, gpu, "root", "", ""},
		{"a tagged node is no user's: self does not match", vendor, recorder, "vendor", "", ""},
		{"self: own device, login's local part", alice, alice2, "alice", netmap.SSHAccept, ":9"},
		{"self: another local part refused", alice, alice2, "root", "", ""},
		{"self: not another user's device", bob, alice2, "bob", "", ""},
		{"localpart needs the domain", mallory, mallory, "mallory", "", ""},
		{"host alias source by address", bastion, gpu, "root", netmap.SSHCheck, ":10"},
		{"empty user", alice, gpu, "", "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := p.SSH(tc.src, tc.dst, tc.user)
			if v.Action != tc.action || !strings.HasSuffix(v.Rule, tc.line) {
				t.Fatalf("SSH = %q at %q, want %q at *%s", v.Action, v.Rule, tc.action, tc.line)
			}
		})
	}
	v := p.SSH(vendor, gpu, "vendor")
	if v.CheckPeriod != 2*time.Hour || !v.EnforceRecorder || !v.Recorded() || !v.IsRecorder(recorder) || v.IsRecorder(gpu) {
		t.Errorf("vendor verdict %+v", v)
	}
	if v := p.SSH(alice, gpu, "alice"); v.Recorded() || len(v.AcceptEnv) != 2 {
		t.Errorf("alice verdict %+v", v)
	}
}

func TestSSHParseErrors(t *testing.T) {
	const head = `{"tagOwners": {"tag:gpu": [], "tag:r": []}, "ssh": [`
	for _, tc := range []struct{ rule, want string }{
		{`{"action": "accept", "src": ["*"], "dst": ["tag:gpu"], "users": ["localpart:*@"]}`, "localpart:*@DOMAIN"},
		{`{"action": "accept", "src": ["*"], "dst": ["tag:gpu"], "users": ["localpart:x@y"]}`, "not a login name"},
		{`{"action": "accept", "src": ["*"], "dst": ["tag:gpu"], "users": ["a"], "acceptEnv": ["A=B"]}`, "acceptEnv"},
		{`{"action": "accept", "src": ["*"], "dst": ["tag:gpu"], "users": ["a"], "enforceRecorder": true}`, "needs a \"recorder\""},
		{`{"action": "accept", "src": ["*"], "dst": ["tag:gpu"], "users": ["a"], "recorder": ["tag:r"], "enforceRecorder": "yes"}`, "true or false"},
		{`{"action": "accept", "src": ["*"], "dst": ["tag:gpu"], "users": ["a"], "recorder": ["tag:nope"]}`, "unknown tag"},
		{`{"action": "deny", "src": ["*"], "dst": ["tag:gpu"], "users": ["a"]}`, `use "accept" or "check"`},
	} {
		_, err := Parse("p.hujson", []byte(head+tc.rule+"]}"))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err %v, want %q", tc.rule, err, tc.want)
		}
	}
}

func TestSSHTests(t *testing.T) {
	base := strings.TrimSuffix(sshPolicy, "}")
	for _, tc := range []struct{ tests, want string }{
		{`[{"src": "alice@example.com", "dst": ["tag:gpu"], "accept": ["alice"], "deny": ["root"]},
		   {"src": "tag:vendor", "dst": ["tag:gpu"], "check": ["vendor"]}]`, ""},
		{`[{"src": "alice@example.com", "dst": ["tag:gpu"], "accept": ["root"]}]`, `ssh test failed: alice@example.com -> tag:gpu as "root" is denied (no ssh rule matches), the test expects accept`},
		{`[{"src": "tag:vendor", "dst": ["tag:gpu"], "accept": ["vendor"]}]`, `is check by the rule at p.hujson:7, the test expects accept`},
		{`[{"src": "group:eng", "dst": ["tag:gpu"], "deny": ["alice"]}]`, `group:eng (member alice@example.com) -> tag:gpu as "alice" is accept`},
		{`[{"src": "alice@example.com", "dst": ["tag:gpu"]}]`, `needs users`},
		{`[{"src": "alice@example.com", "dst": ["tag:nope"], "accept": ["a"]}]`, `unknown tag`},
	} {
		_, err := Parse("p.hujson", []byte(base+`"sshTests": `+tc.tests+"}"))
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s: %v", tc.tests, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s: err %v, want %q", tc.tests, err, tc.want)
		}
	}
}

// TestSSHLint: an ssh rule whose source cannot reach its destination on
// tcp:22 is dead, and lint says so; groups and tags used only by ssh
// rules are used.
func TestSSHLint(t *testing.T) {
	p := mustParse(t, `{
	"groups": {"group:eng": ["alice@example.com"], "group:ops": ["bob@example.com"]},
	"tagOwners": {"tag:gpu": ["group:eng"], "tag:rec": ["group:eng"]},
	"grants": [{"src": ["group:eng"], "dst": ["tag:gpu"], "ip": ["tcp:22"]}],
	"ssh": [
		{"action": "accept", "src": ["group:eng"], "dst": ["tag:gpu"], "users": ["alice"], "recorder": ["tag:rec"]},
		{"action": "accept", "src": ["group:ops"], "dst": ["tag:gpu"], "users": ["bob"]},
	],
}`)
	var warns []string
	for _, pr := range p.Lint() {
		warns = append(warns, pr.String())
	}
	all := strings.Join(warns, "\n")
	if !strings.Contains(all, "test.hujson:7:3: warning: ssh rule: no acl or grant lets group:ops (member bob@example.com) reach its destinations on tcp:22") {
		t.Errorf("lint:\n%s", all)
	}
	if strings.Contains(all, ":6:3:") || strings.Contains(all, "never used") {
		t.Errorf("lint warns about a rule that works or a used group:\n%s", all)
	}
}
