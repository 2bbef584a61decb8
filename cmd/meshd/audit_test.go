package main

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/control"
)

// TestAdminAudit: `meshd admin audit` prints the coordinator's audit log
// as a table or JSON lines, from a duration ago or an RFC 3339 time, and
// refuses a --since it cannot read.
func TestAdminAudit(t *testing.T) {
	url, dir := startCoordinator(t)
	t.Setenv("MESHD_COORDINATOR", url)
	t.Setenv("MESHD_TOKEN_FILE", filepath.Join(dir, "admin.token"))
	if code, _, errOut := runAdmin(t, "keys", "create", "--tags", "tag:gpu", "--json"); code != 0 {
		t.Fatalf("keys create: %s", errOut)
	}
	code, out, errOut := runAdmin(t, "keys", "create", "--user", "alice@example.com", "--json")
	if code != 0 {
		t.Fatalf("keys create: %s", errOut)
	}
	var k struct{ ID string }
	json.Unmarshal([]byte(out), &k)
	if code, _, errOut := runAdmin(t, "keys", "revoke", k.ID); code != 0 {
		t.Fatalf("keys revoke: %s", errOut)
	}

	code, out, errOut = runAdmin(t, "audit", "--json")
	if code != 0 {
		t.Fatalf("audit --json: exit %d: %s", code, errOut)
	}
	var evs []control.AuditEvent
	for line := range strings.Lines(out) {
		var e control.AuditEvent
		if err := json.Unmarshal([]byte(line), &e); err != nil {
			t.Fatalf("audit --json line %q: %v", line, err)
		}
		evs = append(evs, e)
	}
	if len(evs) != 3 || evs[0].Action != control.AuditKeyCreate || evs[2].Action != control.AuditKeyRevoke || evs[2].Target != k.ID ||
		evs[2].Actor.Kind != control.ActorAdmin {
		t.Fatalf("audit --json:\n%s", out)
	}

	code, out, _ = runAdmin(t, "audit", "--since", "1h")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if code != 0 || len(lines) != 4 || !strings.HasPrefix(lines[0], "TIME") || !strings.Contains(lines[3], "key.revoke") || !strings.Contains(lines[3], k.ID) {
		t.Fatalf("audit --since 1h: exit %d:\n%s", code, out)
	}
	future := time.Now().Add(time.Hour).UTC().Format(time.RFC3339)
	if code, out, _ = runAdmin(t, "audit", "--since", future, "--json"); code != 0 || out != "" {
		t.Fatalf("audit --since an hour ahead: exit %d: %q", code, out)
	}
	if code, out, _ = runAdmin(t, "audit", "--since", evs[1].Time.Format(time.RFC3339Nano), "--json"); code != 0 || strings.Count(out, "\n") != 2 {
		t.Fatalf("audit --since the second event: exit %d:\n%s", code, out)
	}
	for _, bad := range []string{"yesterday", "-1h", "2026-13-01T00:00:00Z"} {
		if code, _, errOut := runAdmin(t, "audit", "--since", bad); code != 2 || !strings.Contains(errOut, "--since") {
			t.Errorf("audit --since %s: exit %d, %q", bad, code, errOut)
		}
	}
	if code, _, _ := runAdmin(t, "audit", "extra"); code != 2 {
		t.Errorf("audit with an argument: exit %d", code)
	}
}

// FuzzParseSince: --since never panics, and what it accepts is either a
// non-negative duration back from now or an RFC 3339 time, read as such.
func FuzzParseSince(f *testing.F) {
	now := time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)
	f.Fuzz(func(t *testing.T, v string) {
		got, err := parseSince(v, now)
		if err != nil {
			return
		}
		if v == "" {
			if !got.IsZero() {
				t.Fatalf("empty --since gave %v", got)
			}
			return
		}
		if d, derr := time.ParseDuration(v); derr == nil {
			if d < 0 || !got.Equal(now.Add(-d)) {
				t.Fatalf("--since %q: %v (duration %v)", v, got, d)
			}
			return
		}
		if want, terr := time.Parse(time.RFC3339Nano, v); terr != nil || !got.Equal(want) {
			t.Fatalf("--since %q accepted as %v (RFC 3339: %v, %v)", v, got, want, terr)
		}
	})
}
