package control

import (
	"crypto/ed25519"
	"crypto/hkdf"
	"crypto/sha256"
	"fmt"
	"time"

	"meshd.dev/meshd/internal/clock"
)

// Session tickets let a node that reconnects resume its TLS session
// instead of making a full handshake: no certificate is signed or
// verified on either side (the key exchange still runs, so each session
// keeps forward secrecy). Replicas derive their ticket keys from the
// coordinator key they share, so a node failing over resumes on the
// survivor with the ticket another replica issued. At 10,000 nodes a
// failover is thousands of handshakes at once on the survivor, and their
// certificate work was a fifth of them (perf).
//
// The keys are as secret as the coordinator key, and derived from it, so
// no one who lacks that key can read a ticket: with the key an attacker
// can impersonate the coordinator anyway. A resumed session carries the
// client certificate of the full handshake that began it, so the machine
// key a request is authenticated by is the same either way, and every
// request is still checked against the store.

// ticketKeyPeriod is how long one ticket key issues tickets. A key is
// accepted for one period more, so a ticket lives one to two periods
// (Go's own limit on a ticket's age is 7 days).
const ticketKeyPeriod = 24 * time.Hour

// sessionTicketKeys returns the ticket keys in force at now: the
// period's, which issues tickets, and the previous period's.
func sessionTicketKeys(key ed25519.PrivateKey, now time.Time) ([][32]byte, error) {
	p := now.Unix() / int64(ticketKeyPeriod/time.Second)
	out := make([][32]byte, 0, 2)
	for _, n := range []int64{p, p - 1} {
		b, err := hkdf.Key(sha256.New, key.Seed(), nil, fmt.Sprintf("meshd coordinator TLS session ticket key %d", n), 32)
		if err != nil {
			return nil, fmt.Errorf("derive session ticket key: %w", err)
		}
		out = append(out, [32]byte(b))
	}
	return out, nil
}

// rotateTicketKeys keeps the ticket keys set (tls.Config's
// SetSessionTicketKeys) those of the current period, checking at every
// tick of t, until done is closed.
func rotateTicketKeys(set func([][32]byte), key ed25519.PrivateKey, c clock.Clock, t clock.Ticker, done <-chan struct{}) {
	defer t.Stop()
	for {
		select {
		case <-done:
			return
		case <-t.C():
			if keys, err := sessionTicketKeys(key, c.Now()); err == nil {
				set(keys)
			}
		}
	}
}
