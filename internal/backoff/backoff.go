// Package backoff is the one reconnect delay policy of meshd: exponential
// growth between a minimum and a maximum, jittered, with a single reset
// rule.
package backoff

import (
	"context"
	"math/rand/v2"
	"time"
)

// DefaultStable is how long an attempt must stay up to reset the delay when
// Backoff.Stable is zero.
const DefaultStable = 10 * time.Second

// Backoff computes delays between reconnect attempts. Each delay doubles,
// from Min up to Max, and is jittered into [d/2, d] so that a fleet
// reconnecting after a server restart does not arrive at once.
//
// The reset rule: an attempt that stayed up for at least Stable brings the
// delay back to Min. Counting time up rather than "did the attempt make
// progress" is deliberate: a server that accepts and then drops every
// connection (crash loop, overload) makes progress on each attempt and
// would otherwise be hammered at Min forever.
//
// The zero value is not usable; a Backoff is not safe for concurrent use.
type Backoff struct {
	Min, Max time.Duration
	// Stable is how long an attempt must last to reset the delay; zero
	// means DefaultStable.
	Stable time.Duration

	next time.Duration
}

// Delay returns how long to wait after an attempt that stayed up for up
// (zero for one that never connected).
func (b *Backoff) Delay(up time.Duration) time.Duration {
	stable := b.Stable
	if stable <= 0 {
		stable = DefaultStable
	}
	if b.next == 0 || up >= stable {
		b.next = b.Min
	}
	d := b.next
	b.next = min(2*b.next, max(b.Max, b.Min))
	if d <= 1 {
		return d
	}
	return d/2 + rand.N(d/2+1)
}

// Wait sleeps for Delay(up), or until ctx ends, when it returns ctx.Err().
func (b *Backoff) Wait(ctx context.Context, up time.Duration) error {
	t := time.NewTimer(b.Delay(up))
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
