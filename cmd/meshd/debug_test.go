package main

import (
	"bytes"
	"context"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/agent/localapi"
)

func TestWriteDrops(t *testing.T) {
	at := time.Date(2026, 1, 2, 3, 4, 5, 0, time.Local)
	d := &localapi.Drops{Drops: []localapi.Drop{
		{Time: at, Dir: "in", Reason: "no_rule", Proto: 6, Src: netip.MustParseAddr("100.64.0.1"), Dst: netip.MustParseAddr("100.64.0.2"),
			SrcPort: 40000, DstPort: 9000, Len: 60, AllowedNowBy: "policy.hujson:12:3"},
		{Time: at, Dir: "in", Reason: "no_rule", Proto: 1, Src: netip.MustParseAddr("fd7a::1"), Dst: netip.MustParseAddr("fd7a::2"), Len: 84},
		{Time: at, Dir: "out", Reason: "malformed", Len: 3},
	}}
	var b bytes.Buffer
	writeDrops(&b, d)
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	if len(lines) != 4 {
		t.Fatalf("want a header and 3 lines:\n%s", b.String())
	}
	for i, want := range [][]string{
		{"TIME", "DIR", "REASON", "SRC", "DST"},
		{"03:04:05.000", "in", "no_rule", "tcp", "100.64.0.1:40000", "100.64.0.2:9000", "60", "allowed now by policy.hujson:12:3"},
		{"icmp", "fd7a::1", "fd7a::2", "84"},
		{"out", "malformed", " - ", "3"},
	} {
		for _, w := range want {
			if !strings.Contains(lines[i], w) {
				t.Errorf("line %d %q lacks %q", i, lines[i], w)
			}
		}
	}
	b.Reset()
	writeDrops(&b, &localapi.Drops{})
	if got := b.String(); got != "no packets dropped\n" {
		t.Errorf("no drops: %q", got)
	}
}

func TestFilterLine(t *testing.T) {
	zero := map[string]uint64{"no_rule": 0, "malformed": 0, "fragment": 0, "not_local": 0}
	for _, tc := range []struct {
		name string
		f    localapi.FilterStatus
		want []string
		not  []string
	}{
		{"no drops", localapi.FilterStatus{Rules: 4, Flows: 2, DropsIn: zero, DropsOut: zero},
			[]string{"filter: 4 rules, 2 flows; no drops"}, []string{"debug drops"}},
		{"drops both ways, sorted, zeros left out",
			localapi.FilterStatus{Rules: 4, DropsIn: map[string]uint64{"no_rule": 7, "fragment": 1, "malformed": 0}, DropsOut: map[string]uint64{"malformed": 2}},
			[]string{"dropped in: fragment 1, no_rule 7; out: malformed 2 (see meshd debug drops)"}, []string{"malformed 0"}},
		{"bootstrap", localapi.FilterStatus{Rules: 1, Bootstrap: true, DropsIn: zero, DropsOut: zero},
			[]string{"allow all", "meshd admin policy set"}, nil},
		{"rejected rules", localapi.FilterStatus{Rules: 4, DropsIn: zero, DropsOut: zero, Error: "filter: rule 3: invalid source prefix"},
			[]string{"previous ones in force: filter: rule 3: invalid source prefix"}, nil},
	} {
		got := filterLine(&tc.f)
		for _, w := range tc.want {
			if !strings.Contains(got, w) {
				t.Errorf("%s: %q lacks %q", tc.name, got, w)
			}
		}
		for _, w := range tc.not {
			if strings.Contains(got, w) {
				t.Errorf("%s: %q has %q", tc.name, got, w)
			}
		}
	}
}

func TestDebugDropsNoDaemon(t *testing.T) {
	var out, errb bytes.Buffer
	sock := filepath.Join(t.TempDir(), "none.sock")
	if code := run(context.Background(), []string{"debug", "drops", "--socket", sock}, &out, &errb); code != 1 {
		t.Fatalf("exit %d, want 1; stderr %q", code, errb.String())
	}
	if !strings.Contains(errb.String(), "no daemon at "+sock) {
		t.Errorf("stderr %q does not say no daemon runs there", errb.String())
	}
	if code := run(context.Background(), []string{"debug", "drops", "extra"}, &out, &errb); code == 0 {
		t.Error("debug drops with an extra argument succeeded")
	}
}
