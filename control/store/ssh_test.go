package store

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"meshd.dev/meshd/netmap"
)

func TestSSHChecks(t *testing.T) {
	eachBackend(t, testSSHChecks)
}

func sshCheck(id string, caller, node netmap.NodeID, created time.Time, period time.Duration) SSHCheck {
	return SSHCheck{
		SSHApproval: netmap.SSHApproval{
			ID: id, Caller: netmap.SSHCaller{NodeID: caller, Hostname: "laptop", User: "alice@example.com"},
			NodeID: node, Hostname: "server", LocalUser: "root",
			Created: created, Expires: created.Add(5 * time.Minute),
		},
		Period: period,
	}
}

func testSSHChecks(t *testing.T, bk backend) {
	ctx := context.Background()
	s, reopen := bk.create(t, tinyPool{})
	t0 := time.Unix(1_000_000, 0).UTC()
	want := sshCheck("c1", 1, 2, t0, time.Hour)
	if err := s.AddSSHCheck(ctx, want, 2, t0); err != nil {
		t.Fatal(err)
	}
	if err := s.AddSSHCheck(ctx, sshCheck("c1", 1, 2, t0, 0), 2, t0); err == nil {
		t.Fatal("a second check with a taken id was added")
	}
	if err := s.AddSSHCheck(ctx, sshCheck("c2", 3, 2, t0.Add(time.Second), 0), 2, t0); err != nil {
		t.Fatal(err)
	}
	// The bound counts pending checks.
	if err := s.AddSSHCheck(ctx, sshCheck("c3", 3, 2, t0, 0), 2, t0); !errors.Is(err, ErrTooManySSHChecks) {
		t.Fatalf("a third pending check with a bound of 2: %v", err)
	}
	got, err := s.SSHCheck(ctx, "c1", t0)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("read back\n%+v\nwant\n%+v", got, want)
	}
	if _, err := s.SSHCheck(ctx, "nope", t0); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown check: %v", err)
	}
	if ok, err := s.SSHGranted(ctx, 1, 2, "root", t0); err != nil || ok {
		t.Fatalf("granted before any approval: %v, %v", ok, err)
	}

	// Approvals and grants survive a restart.
	s = mustReopen(t, reopen)
	at := t0.Add(time.Minute)
	c, err := s.ApproveSSHCheck(ctx, "c1", at)
	if err != nil {
		t.Fatal(err)
	}
	if !c.Approved || c.ID != "c1" {
		t.Fatalf("approved: %+v", c)
	}
	if _, err := s.ApproveSSHCheck(ctx, "c1", at); !errors.Is(err, ErrSSHApproved) {
		t.Fatalf("approved twice: %v", err)
	}
	if _, err := s.ApproveSSHCheck(ctx, "nope", at); !errors.Is(err, ErrNotFound) {
		t.Fatalf("approved an unknown check: %v", err)
	}
	// An approved check leaves room for another pending one.
	if err := s.AddSSHCheck(ctx, sshCheck("c3", 3, 2, at, 0), 2, at); err != nil {
		t.Fatal(err)
	}
	s = mustReopen(t, reopen)
	if got, err := s.SSHCheck(ctx, "c1", at); err != nil || !got.Approved {
		t.Fatalf("after a restart: %+v, %v", got, err)
	}
	list, err := s.SSHChecks(ctx, at)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, c := range list {
		ids = append(ids, c.ID)
	}
	if fmt.Sprint(ids) != "[c1 c2 c3]" {
		t.Fatalf("listed %v", ids)
	}
	for _, tc := range []struct {
		caller, node netmap.NodeID
		user         string
		at           time.Time
		want         bool
	}{
		{1, 2, "root", at, true},
		{1, 2, "root", at.Add(time.Hour - time.Nanosecond), true},
		{1, 2, "root", at.Add(time.Hour), false}, // the period ended
		{1, 2, "admin", at, false},               // another user
		{3, 2, "root", at, false},                // another caller
		{2, 1, "root", at, false},                // the other way round
	} {
		if ok, err := s.SSHGranted(ctx, tc.caller, tc.node, tc.user, tc.at); err != nil || ok != tc.want {
			t.Errorf("SSHGranted(%d, %d, %s, +%v) = %v, %v; want %v", tc.caller, tc.node, tc.user, tc.at.Sub(at), ok, err, tc.want)
		}
	}
	// Checks expire: nothing is listed, nothing can be approved, and
	// the bound counts only live checks.
	late := t0.Add(10 * time.Minute)
	if list, err := s.SSHChecks(ctx, late); err != nil || len(list) != 0 {
		t.Fatalf("after expiry: %v, %v", list, err)
	}
	if _, err := s.ApproveSSHCheck(ctx, "c2", late); !errors.Is(err, ErrNotFound) {
		t.Fatalf("approved an expired check: %v", err)
	}
	for i := range 2 {
		if err := s.AddSSHCheck(ctx, sshCheck(fmt.Sprint("d", i), 3, 2, late, 0), 2, late); err != nil {
			t.Fatalf("check %d after the others expired: %v", i, err)
		}
	}
}

// TestSSHCheckBoundAcrossReplicas: replicas adding checks at the same
// time keep the bound of pending checks exactly.
func TestSSHCheckBoundAcrossReplicas(t *testing.T) {
	rs := replicas(t, 3, tinyPool{})
	ctx := context.Background()
	now := time.Unix(1_000_000, 0).UTC()
	const limit, each = 10, 8
	var wg sync.WaitGroup
	var added, refused atomic.Int32
	errs := make(chan error, len(rs)*each)
	for i, r := range rs {
		for j := range each {
			wg.Go(func() {
				switch err := r.AddSSHCheck(ctx, sshCheck(fmt.Sprint("r", i, "-", j), 1, 2, now, 0), limit, now); {
				case err == nil:
					added.Add(1)
				case errors.Is(err, ErrTooManySSHChecks):
					refused.Add(1)
				default:
					errs <- err
				}
			})
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	list, err := rs[0].SSHChecks(ctx, now)
	if err != nil {
		t.Fatal(err)
	}
	if added.Load() != limit || refused.Load() != int32(len(rs)*each-limit) || len(list) != limit {
		t.Fatalf("%d added, %d refused, %d stored; want %d, %d, %d", added.Load(), refused.Load(), len(list), limit, len(rs)*each-limit, limit)
	}
}
