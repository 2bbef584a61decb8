package control

import (
	"crypto/ed25519"
	"crypto/rand"
	"testing"
	"time"
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
