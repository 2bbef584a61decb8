package policy

import (
	"fmt"
	"strings"
	"testing"
)

func TestCheckTags(t *testing.T) {
	p := mustParse(t, `{
	"groups": {"group:ml": ["alice@example.com"]},
	"tagOwners": {
		"tag:inference": ["group:ml"],
		"tag:ci": ["bob@example.com", "tag:inference"],
		"tag:prod": ["autogroup:admin"],
		"tag:locked": [],
	},
}`)
	tests := []struct {
		user      string
		keyTags   []string
		requested []string
		wantErr   string // "" = allowed
	}{
		{"alice@example.com", nil, []string{"tag:inference"}, ""},
		{"Alice@Example.com", nil, []string{"TAG:Inference"}, ""},
		{"bob@example.com", nil, []string{"tag:ci"}, ""},
		{"bob@example.com", nil, []string{"tag:inference"}, "does not own"},
		{"alice@example.com", nil, []string{"tag:inference", "tag:ci"}, `"tag:ci"`},
		{"alice@example.com", nil, []string{"tag:prod"}, "does not own"}, // admin-owned: not by users
		{"alice@example.com", nil, []string{"tag:nope"}, "not defined"},
		{"", []string{"tag:prod"}, []string{"tag:prod"}, ""},     // the key carries it
		{"", []string{"tag:locked"}, []string{"tag:locked"}, ""}, // empty owners: keys only
		{"", []string{"tag:inference"}, []string{"tag:ci"}, ""},  // tag owns tag
		{"", []string{"tag:inference"}, []string{"tag:prod"}, "not owned by the tags"},
		{"", []string{"tag:ci"}, []string{"tag:inference"}, "not owned by the tags"},
		{"", nil, []string{"tag:ci"}, "needs an owner"},
		// The refusal names the rule that decided.
		{"alice@example.com", nil, []string{"tag:prod"}, `"tagOwners" at test.hujson:6:3 gives it to [autogroup:admin]`},
		{"", []string{"tag:ci"}, []string{"tag:locked"}, "gives it to nobody"},
		{"alice@example.com", nil, nil, ""},
	}
	for _, tc := range tests {
		err := p.CheckTags(tc.user, tc.keyTags, tc.requested)
		switch {
		case tc.wantErr == "" && err != nil:
			t.Errorf("CheckTags(%q, %v, %v) = %v, want allowed", tc.user, tc.keyTags, tc.requested, err)
		case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
			t.Errorf("CheckTags(%q, %v, %v) = %v, want an error containing %q", tc.user, tc.keyTags, tc.requested, err, tc.wantErr)
		}
	}
}

// TestOwnedByTags checks which advertised tags replace an auth key's tags
// (the multi-tenant part of the seed policy): only tags its tags own in
// "tagOwners", never tags it merely carries.
func TestOwnedByTags(t *testing.T) {
	seed := loadSeed(t)
	for _, tc := range []struct {
		owners, tags []string
		want         bool
	}{
		{[]string{"tag:tenant-a"}, []string{"tag:tenant-a-gpu"}, true},
		{[]string{"TAG:Tenant-A"}, []string{"tag:TENANT-a-gpu"}, true},
		{[]string{"tag:tenant-b", "tag:tenant-a"}, []string{"tag:tenant-a-gpu", "tag:tenant-b-gpu"}, true},
		{[]string{"tag:tenant-a"}, []string{"tag:tenant-b-gpu"}, false},
		{[]string{"tag:tenant-a"}, []string{"tag:tenant-a"}, false}, // carried, not owned
		{[]string{"tag:tenant-a"}, []string{"tag:tenant-a-gpu", "tag:tenant-a"}, false},
		{[]string{"tag:tenant-a"}, []string{"tag:nope"}, false},
		{[]string{"tag:tenant-a"}, nil, false},
		{nil, []string{"tag:tenant-a-gpu"}, false},
		{[]string{"alice@example.com"}, []string{"tag:ci"}, false}, // users own through CheckTags, not here
	} {
		if got := seed.OwnedByTags(tc.owners, tc.tags); got != tc.want {
			t.Errorf("seed OwnedByTags(%v, %v) = %v, want %v", tc.owners, tc.tags, got, tc.want)
		}
	}
	if Bootstrap().OwnedByTags([]string{"tag:tenant-a"}, []string{"tag:tenant-a-gpu"}) {
		t.Error("the bootstrap default has no tagOwners but OwnedByTags reported ownership")
	}
	// The same key may apply its tenant's GPU tag, not another tenant's.
	if err := seed.CheckTags("", []string{"tag:tenant-a"}, []string{"tag:tenant-a-gpu"}); err != nil {
		t.Errorf("tenant-a key advertising tag:tenant-a-gpu: %v", err)
	}
	err := seed.CheckTags("", []string{"tag:tenant-a"}, []string{"tag:tenant-b-gpu"})
	if err == nil || !strings.Contains(err.Error(), `"tagOwners" at seed.hujson:`) || !strings.Contains(err.Error(), "[autogroup:admin, tag:tenant-b]") {
		t.Errorf("tenant-a key advertising tag:tenant-b-gpu: %v, want a refusal naming the tagOwners rule", err)
	}
}

func TestLint(t *testing.T) {
	const hdr = `{
	"groups": {"group:eng": ["alice@example.com", "bob@example.com"], "group:idle": ["carol@example.com"], "group:two": ["alice@example.com"]},
	"tagOwners": {"tag:srv": ["group:eng"], "tag:orphan": []},
`
	tests := []struct {
		name  string
		src   string
		at    string
		wants []string // substrings, one per expected warning ("" = none)
	}{
		{"wide rule", hdr + `"grants": [{"src": ["*"], "dst": ["*"], "ip": ["*"]}, {"src": ["group:eng", "group:idle", "group:two"], "dst": ["tag:srv", "tag:orphan"], "ip": ["22"]}]}`,
			`{"src": ["*"]`, []string{"wide rule", "tag:orphan is used but owned by no one", "allows nothing more than the wider rule at test.hujson:4"}},
		{"acl wide rule", hdr + `"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}], "tests": [{"src": "group:idle", "accept": ["tag:srv:1"]}, {"src": "group:two", "accept": ["tag:orphan:1"]}, {"src": "group:eng", "accept": ["tag:srv:1"]}]}`,
			`{"action"`, []string{"wide rule", "tag:orphan"}},
		{"unused group", hdr + `"grants": [{"src": ["group:eng", "group:two"], "dst": ["tag:srv", "tag:orphan"], "ip": ["22"]}]}`,
			`"group:idle"`, []string{"group:idle is never used", "tag:orphan"}},
		{"shadowed by group", hdr + `"grants": [
		{"src": ["group:eng", "group:idle"], "dst": ["tag:srv", "tag:orphan"], "ip": ["tcp:22-80"]},
		{"src": ["group:two"], "dst": ["tag:srv"], "ip": ["tcp:22", "tcp:443"]},
		{"src": ["group:two"], "dst": ["tag:srv"], "ip": ["tcp:22", "tcp:80"]},
	]}`, `{"src": ["group:two"], "dst": ["tag:srv"], "ip": ["tcp:22", "tcp:80"]}`, []string{"tag:orphan", "allows nothing more than the wider rule at test.hujson:5"}},
		{"not shadowed when wider on one axis only", hdr + `"grants": [
		{"src": ["group:eng", "group:idle", "group:two"], "dst": ["tag:srv"], "ip": ["tcp:22"]},
		{"src": ["group:two"], "dst": ["tag:srv", "tag:orphan"], "ip": ["tcp:22"]},
	]}`, `{"src": ["group:two"]`, []string{"tag:orphan"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := mustParse(t, tc.src)
			warns := p.Lint()
			if len(warns) != len(tc.wants) {
				t.Fatalf("got %d warnings, want %d: %v", len(warns), len(tc.wants), warns)
			}
			for _, want := range tc.wants {
				found := false
				for _, w := range warns {
					if w.Severity != SeverityWarning {
						t.Errorf("%v is not a warning", w)
					}
					if strings.Contains(w.Msg, want) {
						found = true
					}
				}
				if !found {
					t.Errorf("no warning containing %q in %v", want, warns)
				}
			}
			// The first expected warning points at the offending value.
			if tc.at != "" && !strings.Contains(tc.wants[0], "tag:orphan") {
				pos := posOf(tc.src, tc.at)
				ok := false
				for _, w := range warns {
					ok = ok || w.Pos.String() == pos
				}
				if !ok {
					t.Errorf("no warning at %s: %v", pos, warns)
				}
			}
		})
	}
}

func TestExplain(t *testing.T) {
	p := loadSeed(t)
	tests := []struct {
		src, dst, proto string
		allowed         bool
		rule            string
		verdicts        int
	}{
		{"alice@example.com", "tag:training-cluster:22", "", true, "seed.hujson:40", 1},
		{"alice@example.com", "tag:training-cluster:443", "", false, "", 1},
		{"group:ml-engineers", "tag:inference-server:443", "udp", true, "seed.hujson:33", 2},
		{"tag:prod", "metrics:9090", "tcp", true, "seed.hujson:47", 1},
		{"tag:prod", "metrics:9090", "udp", false, "", 1},
		{"carol@tenant-a.example", "100.100.10.5:9090", "", false, "", 1},
		{"alice@example.com", "alice@example.com:22", "", true, "seed.hujson:52", 1},
		{"alice@example.com", "bob@example.com:22", "", false, "", 1},
		{"alice@example.com", "tag:inference-server:0", "icmp", true, "seed.hujson:33", 1},
		// autogroup:self: the source user's own device, per group member.
		{"alice@example.com", "autogroup:self:22", "", true, "seed.hujson:52", 1},
		{"group:ml-engineers", "autogroup:self:3389", "udp", true, "seed.hujson:52", 2},
	}
	for _, tc := range tests {
		ex, err := p.Explain(tc.src, tc.dst, tc.proto)
		if err != nil {
			t.Errorf("Explain(%s, %s): %v", tc.src, tc.dst, err)
			continue
		}
		if ex.Allowed != tc.allowed || len(ex.Verdicts) != tc.verdicts || ex.Verdicts[0].Rule != tc.rule {
			t.Errorf("Explain(%s, %s, %s) = %+v, want allowed=%v by %q", tc.src, tc.dst, tc.proto, ex, tc.allowed, tc.rule)
		}
	}
	for _, bad := range [][3]string{
		{"nobody", "tag:prod:22", ""},
		{"alice@example.com", "tag:prod:22-23", ""},
		{"alice@example.com", "tag:prod", ""},
		{"alice@example.com", "tag:unknown:22", ""},
		{"alice@example.com", "tag:prod:22", "bogus"},
		{"alice@example.com", "10.0.0.0/8:22", ""},
		{"tag:prod", "autogroup:self:22", ""}, // a tagged device owns no devices
	} {
		if _, err := p.Explain(bad[0], bad[1], bad[2]); err == nil {
			t.Errorf("Explain(%v): want an error", bad)
		}
	}
}

func TestDiff(t *testing.T) {
	const hdr = `{
	"groups": {"group:eng": ["alice@example.com", "bob@example.com"]},
	"tagOwners": {"tag:srv": [], "tag:db": []},
`
	old := mustParse(t, hdr+`"grants": [
		{"src": ["group:eng"], "dst": ["tag:srv"], "ip": ["tcp:22", "tcp:80"]},
		{"src": ["tag:srv"], "dst": ["tag:db"], "ip": ["tcp:5432"]},
	]}`)
	tests := []struct {
		name           string
		new            string
		opened, closed []string
	}{
		{"identical", hdr + `"grants": [
		{"src": ["group:eng"], "dst": ["tag:srv"], "ip": ["tcp:22", "tcp:80"]},
		{"src": ["tag:srv"], "dst": ["tag:db"], "ip": ["tcp:5432"]}]}`, nil, nil},
		{"reworded: users instead of group, acl instead of grant", hdr + `"acls": [
		{"action": "accept", "proto": "tcp", "src": ["alice@example.com", "bob@example.com"], "dst": ["tag:srv:22,80"]},
		{"action": "accept", "proto": "tcp", "src": ["tag:srv"], "dst": ["tag:db:5432"]}]}`, nil, nil},
		{"port opened and closed", hdr + `"grants": [
		{"src": ["group:eng"], "dst": ["tag:srv"], "ip": ["tcp:22", "tcp:443"]},
		{"src": ["tag:srv"], "dst": ["tag:db"], "ip": ["tcp:5432"]}]}`,
			[]string{"group:eng -> tag:srv:443 (tcp)  [test.hujson:5]"}, []string{"group:eng -> tag:srv:80 (tcp)  [test.hujson:5]"}},
		{"member removed", `{
	"groups": {"group:eng": ["alice@example.com"]},
	"tagOwners": {"tag:srv": [], "tag:db": []},
	"grants": [
		{"src": ["group:eng"], "dst": ["tag:srv"], "ip": ["tcp:22", "tcp:80"]},
		{"src": ["tag:srv"], "dst": ["tag:db"], "ip": ["tcp:5432"]}]}`,
			nil, []string{"bob@example.com -> tag:srv:22,80 (tcp)  [test.hujson:5]"}},
		{"widened to everyone", hdr + `"grants": [
		{"src": ["*"], "dst": ["tag:srv"], "ip": ["tcp:22", "tcp:80"]},
		{"src": ["tag:srv"], "dst": ["tag:db"], "ip": ["tcp:5432"]}]}`,
			[]string{"* -> tag:srv:22,80 (tcp)  [test.hujson:5]"}, nil},
		{"capability granted", hdr + `"grants": [
		{"src": ["group:eng"], "dst": ["tag:srv"], "ip": ["tcp:22", "tcp:80"], "app": {"meshd.dev/cap/k8s": [{"impersonate": {"groups": ["viewers"]}}]}},
		{"src": ["tag:srv"], "dst": ["tag:db"], "ip": ["tcp:5432"]}]}`,
			[]string{`group:eng -> tag:srv app meshd.dev/cap/k8s=[{"impersonate":{"groups":["viewers"]}}]  [test.hujson:5]`}, nil},
		{"everything closed", `{}`, nil, []string{"group:eng -> tag:srv:22,80 (tcp)  [test.hujson:5]", "tag:srv -> tag:db:5432 (tcp)  [test.hujson:6]"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := Diff(old, mustParse(t, tc.new))
			check := func(what string, got []Flow, want []string) {
				var gs []string
				for _, f := range got {
					gs = append(gs, f.String())
				}
				if strings.Join(gs, "\n") != strings.Join(want, "\n") {
					t.Errorf("%s:\n%s\nwant:\n%s", what, strings.Join(gs, "\n"), strings.Join(want, "\n"))
				}
			}
			check("opened", d.Opened, tc.opened)
			check("closed", d.Closed, tc.closed)
		})
	}
}

// TestDiffCapabilities: changing what an "app" grant carries shows as the
// old capability closed and the new one opened.
func TestDiffCapabilities(t *testing.T) {
	const pol = `{
	"groups": {"group:eng": ["alice@example.com", "bob@example.com"]},
	"tagOwners": {"tag:k8s": []},
	"grants": [{"src": ["group:eng"], "dst": ["tag:k8s"], "app": {"meshd.dev/cap/kubernetes": [{"impersonate": {"groups": [%q]}}]}}],
}`
	old := mustParse(t, fmt.Sprintf(pol, "viewers"))
	d := Diff(old, mustParse(t, fmt.Sprintf(pol, "system:masters")))
	if len(d.Opened) != 1 || !strings.Contains(d.Opened[0].App, "system:masters") || d.Opened[0].Src != "group:eng" ||
		len(d.Closed) != 1 || !strings.Contains(d.Closed[0].App, "viewers") {
		t.Errorf("diff = %+v", d)
	}
	if d := Diff(old, old); len(d.Opened)+len(d.Closed) != 0 {
		t.Errorf("self diff = %+v", d)
	}
}
