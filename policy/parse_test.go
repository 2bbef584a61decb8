package policy

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

// TestBadPolicies: every malformed policy is rejected with the position of
// the offending value and a message saying what is wrong.
func TestBadPolicies(t *testing.T) {
	const hdr = `{
	"groups": {"group:eng": ["alice@example.com"]},
	"hosts": {"db": "100.64.0.4"},
	"tagOwners": {"tag:srv": ["group:eng"], "tag:ops": []},
`
	tests := []struct {
		name   string
		src    string
		at     string // the text the problem points at (its first occurrence)
		substr string
	}{
		{"syntax: missing comma", hdr + `"grants": [{"src": ["*"] "dst": ["*"], "ip": ["*"]}]}`, `"dst"`, "syntax error"},
		{"syntax: unterminated", `{"grants": [`, ``, "syntax error"},
		{"not an object", `["grants"]`, `["grants"]`, "JSON object"},
		{"unknown section", hdr + `"derpMaps": {}}`, `"derpMaps"`, `unknown section "derpMaps"`},
		{"duplicate section", hdr + `"grants": [], "grants": []}`, `"grants": []}`, `duplicate section`},
		{"unknown field", hdr + `"grants": [{"src": ["*"], "dst": ["tag:srv"], "ip": ["*"], "dstPorts": ["22"]}]}`, `"dstPorts"`, `unknown field "dstPorts"`},
		{"unknown group", hdr + `"grants": [{"src": ["group:nope"], "dst": ["tag:srv"], "ip": ["*"]}]}`, `"group:nope"`, `unknown group "group:nope"`},
		{"unknown tag", hdr + `"grants": [{"src": ["*"], "dst": ["tag:nope"], "ip": ["*"]}]}`, `"tag:nope"`, `unknown tag "tag:nope"`},
		{"tag without owner entry in acl dst", hdr + `"acls": [{"action": "accept", "src": ["*"], "dst": ["tag:ghost:22"]}]}`, `"tag:ghost:22"`, `"tagOwners"`},
		{"duplicate tagOwners", hdr[:len(hdr)-2] + `
	,"tagOwners": {}}`, `"tagOwners": {}`, "duplicate section"},
		{"owner is a host", `{"hosts": {"db": "100.64.0.4"}, "tagOwners": {"tag:a": ["db"]}}`, `"db"]}}`, "cannot own tags"},
		{"bad tag name", `{"tagOwners": {"tag:": []}}`, `"tag:"`, "bad tag"},
		{"tag a node cannot carry", `{"tagOwners": {"tag:1gpu": []}}`, `"tag:1gpu"`, "must start with a letter"},
		{"bad group name", `{"groups": {"eng": []}}`, `"eng"`, "bad group"},
		{"group member is a tag", `{"groups": {"group:g": ["tag:srv"]}}`, `"tag:srv"`, "not a user login"},
		{"bad port", hdr + `"grants": [{"src": ["*"], "dst": ["tag:srv"], "ip": ["70000"]}]}`, `"70000"`, "not a port number"},
		{"backwards range", hdr + `"acls": [{"action": "accept", "src": ["*"], "dst": ["tag:srv:200-100"]}]}`, `"tag:srv:200-100"`, "backwards"},
		{"acl dst without ports", hdr + `"acls": [{"action": "accept", "src": ["*"], "dst": ["tag:srv"]}]}`, `"tag:srv"]}`, "has no ports"},
		{"bad CIDR host bits", hdr + `"grants": [{"src": ["10.0.0.1/8"], "dst": ["tag:srv"], "ip": ["*"]}]}`, `"10.0.0.1/8"`, "did you mean 10.0.0.0/8"},
		{"bad host address", `{"hosts": {"db": "100.64.0.400"}}`, `"100.64.0.400"`, "bad address"},
		{"unknown selector", hdr + `"grants": [{"src": ["alice"], "dst": ["tag:srv"], "ip": ["*"]}]}`, `"alice"`, `unknown selector "alice"`},
		{"bad protocol", hdr + `"acls": [{"action": "accept", "proto": "tcpp", "src": ["*"], "dst": ["tag:srv:22"]}]}`, `"tcpp"`, "unknown protocol"},
		{"icmp with port", hdr + `"grants": [{"src": ["*"], "dst": ["tag:srv"], "ip": ["icmp:22"]}]}`, `"icmp:22"`, "has no ports"},
		{"deny action", hdr + `"acls": [{"action": "deny", "src": ["*"], "dst": ["tag:srv:22"]}]}`, `"deny"`, `only action is "accept"`},
		{"missing src", hdr + `"grants": [{"dst": ["tag:srv"], "ip": ["*"]}]}`, `{"dst"`, `needs "src"`},
		{"empty src", hdr + `"grants": [{"src": [], "dst": ["tag:srv"], "ip": ["*"]}]}`, `[], "dst"`, "src is empty"},
		{"grant without ip or app", hdr + `"grants": [{"src": ["*"], "dst": ["tag:srv"]}]}`, `{"src"`, `needs "ip"`},
		{"self as source", hdr + `"grants": [{"src": ["autogroup:self"], "dst": ["tag:srv"], "ip": ["*"]}]}`, `"autogroup:self"`, "only allowed as a destination"},
		{"admin outside tagOwners", hdr + `"grants": [{"src": ["autogroup:admin"], "dst": ["tag:srv"], "ip": ["*"]}]}`, `"autogroup:admin"]`, "only allowed in"},
		{"unknown autogroup", hdr + `"grants": [{"src": ["autogroup:nonroot"], "dst": ["tag:srv"], "ip": ["*"]}]}`, `"autogroup:nonroot"`, "unknown autogroup"},
		{"bad capability name", hdr + `"grants": [{"src": ["*"], "dst": ["tag:srv"], "app": {"kubernetes": [{}]}}]}`, `"kubernetes"`, "name capabilities by domain"},
		{"capability value not object", hdr + `"grants": [{"src": ["*"], "dst": ["tag:srv"], "app": {"x.dev/cap/k": ["admin"]}}]}`, `"admin"`, "JSON object"},
		{"kubernetes capability unknown field", hdr + `"grants": [{"src": ["*"], "dst": ["tag:srv"], "app": {"tailscale.com/cap/kubernetes": [{"impersonat": {"groups": ["a"]}}]}}]}`, `"impersonat"`, `unknown field "impersonat"`},
		{"kubernetes capability unknown nested field", hdr + `"grants": [{"src": ["*"], "dst": ["tag:srv"], "app": {"meshd.dev/cap/kubernetes": [{"impersonate": {"group": ["a"]}}]}}]}`, `"group"`, `unknown field "group" in impersonate`},
		{"kubernetes capability groups not a list", hdr + `"grants": [{"src": ["*"], "dst": ["tag:srv"], "app": {"meshd.dev/cap/kubernetes": [{"impersonate": {"groups": "system:masters"}}]}}]}`, `{"impersonate"`, "cannot unmarshal"},
		{"kubernetes capability empty group", hdr + `"grants": [{"src": ["*"], "dst": ["tag:srv"], "app": {"meshd.dev/cap/kubernetes": [{"impersonate": {"groups": [""]}}]}}]}`, `{"impersonate"`, "empty group name"},
		{"src not a list", hdr + `"grants": [{"src": "*", "dst": ["tag:srv"], "ip": ["*"]}]}`, `"*", "dst"`, "array of strings"},
		{"ssh bad action", hdr + `"ssh": [{"action": "allow", "src": ["group:eng"], "dst": ["tag:srv"], "users": ["root"]}]}`, `"allow"`, "ssh action"},
		{"ssh unknown group", hdr + `"ssh": [{"action": "accept", "src": ["group:x"], "dst": ["tag:srv"], "users": ["root"]}]}`, `"group:x"`, "unknown group"},
		{"ssh bad check period", hdr + `"ssh": [{"action": "check", "src": ["group:eng"], "dst": ["tag:srv"], "users": ["root"], "checkPeriod": "soon"}]}`, `"soon"`, "checkPeriod"},
		{"autoApprovers bad route", hdr + `"autoApprovers": {"routes": {"10.0.0.1/8": ["tag:srv"]}}}`, `"10.0.0.1/8"`, "not a CIDR"},
		{"autoApprovers unknown tag", hdr + `"autoApprovers": {"exitNode": ["tag:exit"]}}`, `"tag:exit"`, "unknown tag"},
		{"via: not a tag", hdr + `"grants": [{"src": ["*"], "dst": ["10.0.0.0/8"], "ip": ["*"], "via": ["group:eng"]}]}`, `["group:eng"]}`, "name the routers by tag"},
		{"via: undefined tag", hdr + `"grants": [{"src": ["*"], "dst": ["10.0.0.0/8"], "ip": ["*"], "via": ["tag:nope"]}]}`, `"tag:nope"`, `unknown tag "tag:nope"`},
		{"via: tailnet destination", hdr + `"grants": [{"src": ["*"], "dst": ["tag:srv"], "ip": ["*"], "via": ["tag:ops"]}]}`, `["tag:ops"]}`, `destination "tag:srv" is not routed`},
		{"via: tailnet host", hdr + `"grants": [{"src": ["*"], "dst": ["db"], "ip": ["*"], "via": ["tag:ops"]}]}`, `["tag:ops"]}`, `destination "db" is not routed`},
		{"via: star", hdr + `"grants": [{"src": ["*"], "dst": ["*"], "ip": ["*"], "via": ["tag:ops"]}]}`, `["tag:ops"]}`, `destination "*" is not routed`},
		{"via: with app", hdr + `"grants": [{"src": ["*"], "dst": ["10.0.0.0/8"], "app": {"example.com/cap/x": [{}]}, "via": ["tag:ops"]}]}`, `["tag:ops"]}`, "of their own"},
		{"via: empty", hdr + `"grants": [{"src": ["*"], "dst": ["10.0.0.0/8"], "ip": ["*"], "via": []}]}`, `[]}]}`, "via is empty"},
		{"autogroup:internet as a source", hdr + `"grants": [{"src": ["autogroup:internet"], "dst": ["tag:srv"], "ip": ["*"]}]}`, `"autogroup:internet"`, "only allowed as a destination"},
		{"autogroup:internet with app", hdr + `"grants": [{"src": ["*"], "dst": ["autogroup:internet"], "app": {"example.com/cap/x": [{}]}}]}`, `{"example.com`, "grant of its own"},
		{"autogroup:internet in tagOwners", `{"tagOwners": {"tag:x": ["autogroup:internet"]}}`, `"autogroup:internet"`, "only allowed as a destination"},
		{"autogroup:internet in a test", hdr + `"tests": [{"src": "alice@example.com", "accept": ["autogroup:internet:443"]}]}`, `"autogroup:internet:443"`, "only allowed as a destination"},
		{"autogroup:internet as ssh dst", hdr + `"ssh": [{"action": "accept", "src": ["*"], "dst": ["autogroup:internet"], "users": ["root"]}]}`, `["autogroup:internet"]`, "not a device to log in to"},
		{"autogroup:internet in autoApprovers", hdr + `"autoApprovers": {"exitNode": ["autogroup:internet"]}}`, `"autogroup:internet"`, "only allowed as a destination"},
		{"autoApprovers address", hdr + `"autoApprovers": {"routes": {"10.0.0.0/8": ["100.64.0.1"]}}}`, `["100.64.0.1"]`, "is an address"},
		{"nodeAttrs unknown field", hdr + `"nodeAttrs": [{"target": ["*"], "attrs": ["x"]}]}`, `"attrs"`, `unknown field "attrs"`},
		{"nodeAttrs bad target", hdr + `"nodeAttrs": [{"target": ["group:none"], "attr": ["x"]}]}`, `"group:none"`, "unknown group"},
		{"test dst range", hdr + `"grants": [{"src": ["*"], "dst": ["tag:srv"], "ip": ["*"]}], "tests": [{"src": "alice@example.com", "accept": ["tag:srv:22-23"]}]}`, `"tag:srv:22-23"`, "names one port"},
		{"test dst star", hdr + `"grants": [{"src": ["*"], "dst": ["tag:srv"], "ip": ["*"]}], "tests": [{"src": "alice@example.com", "accept": ["tag:srv:*"]}]}`, `"tag:srv:*"`, "names one port"},
		{"test dst group", hdr + `"grants": [{"src": ["*"], "dst": ["tag:srv"], "ip": ["*"]}], "tests": [{"src": "alice@example.com", "accept": ["group:eng:22"]}]}`, `"group:eng:22"`, "names one device"},
		{"test src star", hdr + `"tests": [{"src": "*", "accept": ["tag:srv:22"]}]}`, `"*", "accept"`, "not allowed here"},
		{"test fails accept", hdr + `"grants": [{"src": ["group:eng"], "dst": ["tag:srv"], "ip": ["22"]}],
	"tests": [{"src": "alice@example.com", "accept": ["tag:srv:22", "tag:srv:80"]}]}`, `"tag:srv:80"`, "is denied, the test expects accept"},
		{"test fails deny", hdr + `"grants": [{"src": ["group:eng"], "dst": ["tag:srv"], "ip": ["22"]}],
	"tests": [{"src": "group:eng", "deny": ["tag:srv:22"]}]}`, `"tag:srv:22"]`, "allowed by the rule at test.hujson:5"},
		{"test default proto is tcp", hdr + `"grants": [{"src": ["group:eng"], "dst": ["tag:srv"], "ip": ["udp:53"]}],
	"tests": [{"src": "alice@example.com", "accept": ["tag:srv:53"]}]}`, `"tag:srv:53"`, "(tcp) is denied"},
		{"test on empty group", `{"groups": {"group:e": []}, "tests": [{"src": "group:e", "deny": ["1.2.3.4:22"]}]}`, `"group:e", "deny"`, "no members"},
		{"test needs accept or deny", hdr + `"tests": [{"src": "alice@example.com"}]}`, `{"src": "alice`, `needs "accept" or "deny"`},
		{"duplicate key", hdr + `"grants": [{"src": ["*"], "src": ["*"], "dst": ["tag:srv"], "ip": ["*"]}]}`, `"src": ["*"], "dst"`, "duplicate key"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p, err := Parse("test.hujson", []byte(tc.src))
			if err == nil {
				t.Fatalf("accepted: %+v", p)
			}
			var perr *Error
			if !errors.As(err, &perr) || len(perr.Problems) == 0 {
				t.Fatalf("error %v is not an *Error with problems", err)
			}
			wantPos := posOf(tc.src, tc.at)
			if tc.at == "" {
				wantPos = "test.hujson:1:13" // the end of input
			}
			for _, pr := range perr.Problems {
				if pr.Pos.String() == wantPos && strings.Contains(pr.Msg, tc.substr) {
					return
				}
			}
			t.Errorf("want a problem at %s containing %q, got:\n%v", wantPos, tc.substr, err)
		})
	}
}

// TestAllProblemsReported: one run lists every problem, in file order.
func TestAllProblemsReported(t *testing.T) {
	src := `{
	"grants": [
		{"src": ["group:a"], "dst": ["tag:b"], "ip": ["x"]},
	],
	"bogus": 1,
}`
	_, err := Parse("test.hujson", []byte(src))
	var perr *Error
	if !errors.As(err, &perr) {
		t.Fatalf("err = %v", err)
	}
	want := []string{posOf(src, `"group:a"`), posOf(src, `"tag:b"`), posOf(src, `"x"`), posOf(src, `"bogus"`)}
	if len(perr.Problems) != len(want) {
		t.Fatalf("got %d problems, want %d:\n%v", len(perr.Problems), len(want), err)
	}
	for i, w := range want {
		if got := perr.Problems[i].Pos.String(); got != w {
			t.Errorf("problem %d at %s, want %s", i, got, w)
		}
	}
}

// TestHuJSONFeatures: comments and trailing commas are fine, sections may
// come in any order, tags and groups are case-insensitive.
func TestHuJSONFeatures(t *testing.T) {
	p := mustParse(t, `// leading comment
{
	/* rules before their definitions */
	"grants": [
		{"src": ["GROUP:Eng"], "dst": ["Tag:Srv"], "ip": ["*"],}, // trailing comma
	],
	"tagOwners": {"TAG:SRV": ["group:eng",],},
	"groups": {"group:ENG": ["Alice@Example.com"],},
	"tests": [{"src": "alice@example.com", "accept": ["tag:srv:22"],},],
}`)
	if p.NumRules() != 1 || p.NumTests() != 1 || !slices.Equal(p.Tags(), []string{"tag:srv"}) {
		t.Errorf("parsed %d rules, %d tests, tags %v", p.NumRules(), p.NumTests(), p.Tags())
	}
}

// TestSectionsParsed: ssh, autoApprovers and nodeAttrs are parsed and
// validated now (enforced by later issues), and each draws a warning at its
// name saying it is not enforced.
func TestSectionsParsed(t *testing.T) {
	p := mustParse(t, `{
	"groups": {"group:eng": ["alice@example.com"]}, "grants": [{"src": ["group:eng"], "dst": ["tag:srv"], "ip": ["tcp:22"]}],
	"tagOwners": {"tag:srv": ["group:eng"], "tag:router": []},
	"ssh": [{"action": "check", "src": ["group:eng"], "dst": ["tag:srv", "autogroup:self"], "users": ["root", "autogroup:nonroot"], "checkPeriod": "12h"}],
	"autoApprovers": {"routes": {"10.0.0.0/8": ["tag:router"]}, "exitNode": ["group:eng"]},
	"nodeAttrs": [{"target": ["*"], "attr": ["funnel"]}, {"target": ["tag:srv"], "app": {"meshd.dev/cap/x": [{}]}}],
}`)
	if len(p.ssh) != 1 || p.ssh[0].period.Hours() != 12 || len(p.approvers) != 2 || len(p.nodeAttrs) != 2 {
		t.Errorf("ssh %+v approvers %+v nodeAttrs %+v", p.ssh, p.approvers, p.nodeAttrs)
	}
	// A group used only by ssh counts as used: no "never used" warning.
	var msgs []string
	for _, w := range p.Lint() {
		msgs = append(msgs, w.String())
	}
	want := []string{
		`test.hujson:3:42: warning: tag:router is used but owned by no one: only auth keys created with it can apply it (add owners, or ignore if that is intended)`,
		`test.hujson:6:2: warning: section "nodeAttrs" is not enforced: meshd applies no node attributes yet: no attribute or capability in this section reaches any node`,
	}
	if !slices.Equal(msgs, want) {
		t.Errorf("lint =\n%s\nwant\n%s", strings.Join(msgs, "\n"), strings.Join(want, "\n"))
	}
}
