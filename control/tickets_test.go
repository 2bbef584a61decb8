package control

import (
	"crypto/ed25519"
	"crypto/rand"
	"testing"
	"time"

	"meshd.dev/meshd/internal/clock/clocktest"
)

// TestSessionTicketKeys: replicas (one coordinator key) derive the same
// ticket keys, another tailnet's key other ones; a period's key issues
// tickets and is still accepted, second, in the next period.
func TestSessionTicketKeys(t *testing.T) {
	_, k1, _ := ed25519.GenerateKey(rand.Reader)
	_, k2, _ := ed25519.GenerateKey(rand.Reader)
	now := time.Date(2026, 12, 4, 17, 0, 0, 0, time.UTC)
	keys := func(k ed25519.PrivateKey, at time.Time) [][32]byte {
		t.Helper()
		ks, err := sessionTicketKeys(k, at)
		if err != nil {
			t.Fatal(err)
		}
		if len(ks) != 2 {
			t.Fatalf("%d keys, want the period's and the previous one", len(ks))
		}
		return ks
	}
	a, again, other := keys(k1, now), keys(k1, now.Add(time.Hour)), keys(k2, now)
	next := keys(k1, now.Add(ticketKeyPeriod))
	switch {
	case a[0] != again[0] || a[1] != again[1]:
		t.Error("one key, one period: different ticket keys")
	case a[0] == a[1]:
		t.Error("the period's key is the previous period's")
	case a[0] == other[0] || a[1] == other[1]:
		t.Error("another coordinator key derived the same ticket keys")
	case next[1] != a[0] || next[0] == a[0]:
		t.Error("the next period does not issue with a new key and accept this one")
	}
}

// TestRotateTicketKeys: the keys in force are the period's, with the one
// before still accepted, and change when a period ends.
func TestRotateTicketKeys(t *testing.T) {
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	start := time.Date(2026, 12, 4, 23, 0, 0, 0, time.UTC)
	c := clocktest.New(start)
	set := make(chan [][32]byte, 4)
	done := make(chan struct{})
	defer close(done)
	go rotateTicketKeys(func(k [][32]byte) { set <- k }, key, c, c.NewTicker(time.Minute), done)
	expect := func(what string, at time.Time) {
		t.Helper()
		want, err := sessionTicketKeys(key, at)
		if err != nil {
			t.Fatal(err)
		}
		select {
		case got := <-set:
			if got[0] != want[0] || got[1] != want[1] {
				t.Fatalf("%s: not the keys of the period of %v", what, at)
			}
		case <-time.After(10 * time.Second): // a guard, not a wait: the tick is already sent
			t.Fatalf("%s: no keys set", what)
		}
	}
	c.Advance(time.Minute)
	expect("the first tick", start)
	c.Advance(time.Hour) // past midnight
	expect("past midnight", start.Add(time.Hour))
}
