package store

import (
	"context"
	"strings"
	"testing"
	"time"
)

// TestAuditAppendAndRead: events come back in order of appending, from a
// time on, up to a limit, and survive a reopen.
func TestAuditAppendAndRead(t *testing.T) {
	eachBackend(t, testAuditAppendAndRead)
}

func testAuditAppendAndRead(t *testing.T, bk backend) {
	ctx := context.Background()
	s, reopen := bk.create(t, tinyPool{})
	base := time.Unix(1000, 0).UTC()
	for i, a := range []string{"key.create", "node.register", "policy.set"} {
		id, err := s.AppendAudit(ctx, AuditEvent{Time: base.Add(time.Duration(i) * time.Second), Actor: `{"kind":"admin"}`, Action: a, Target: "t", Details: `{"n":1}`})
		if err != nil {
			t.Fatal(err)
		}
		if id != int64(i+1) {
			t.Fatalf("event %d got id %d", i, id)
		}
	}
	s = mustReopen(t, reopen)
	for _, tc := range []struct {
		since time.Time
		limit int
		want  []string
	}{
		{time.Time{}, 10, []string{"key.create", "node.register", "policy.set"}},
		{base.Add(time.Second), 10, []string{"node.register", "policy.set"}},
		{time.Time{}, 2, []string{"key.create", "node.register"}},
		{base.Add(time.Hour), 10, nil},
	} {
		evs, err := s.AuditEvents(ctx, tc.since, tc.limit)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, e := range evs {
			got = append(got, e.Action)
		}
		if strings.Join(got, ",") != strings.Join(tc.want, ",") {
			t.Errorf("since %v limit %d: %v, want %v", tc.since, tc.limit, got, tc.want)
		}
	}
	evs, _ := s.AuditEvents(ctx, time.Time{}, 1)
	if e := evs[0]; e.ID != 1 || !e.Time.Equal(base) || e.Actor != `{"kind":"admin"}` || e.Target != "t" || e.Details != `{"n":1}` {
		t.Errorf("round trip: %+v", e)
	}
	if _, err := s.AuditEvents(ctx, time.Time{}, 0); err == nil {
		t.Error("limit 0 accepted")
	}
}

// TestAuditAppendOnly: the database itself refuses to change or delete an
// event, so no code path above it can.
func TestAuditAppendOnly(t *testing.T) {
	eachBackend(t, testAuditAppendOnly)
}

func testAuditAppendOnly(t *testing.T, bk backend) {
	ctx := context.Background()
	s := newStore(t, bk, tinyPool{})
	if _, err := s.AppendAudit(ctx, AuditEvent{Time: time.Unix(1, 0), Actor: "{}", Action: "node.delete", Target: "7"}); err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{
		`UPDATE audit SET action = 'nothing'`,
		`DELETE FROM audit`,
		`DELETE FROM audit WHERE id = 1`,
	} {
		if _, err := s.db.ExecContext(ctx, q); err == nil || !strings.Contains(err.Error(), "append-only") {
			t.Errorf("%s: %v, want refused as append-only", q, err)
		}
	}
	if s.d.name == "postgres" {
		if _, err := s.db.ExecContext(ctx, `TRUNCATE audit`); err == nil || !strings.Contains(err.Error(), "append-only") {
			t.Errorf("TRUNCATE: %v, want refused as append-only", err)
		}
	}
	evs, err := s.AuditEvents(ctx, time.Time{}, 10)
	if err != nil || len(evs) != 1 || evs[0].Action != "node.delete" {
		t.Fatalf("after the attempts: %+v, %v", evs, err)
	}
}
