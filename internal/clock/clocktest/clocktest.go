// Package clocktest provides a clock.Clock for tests that moves only when
// the test says so.
package clocktest

import (
	"context"
	"sync"
	"time"

	"meshd.dev/meshd/internal/clock"
)

// Clock is a clock.Clock whose time stands still until Advance moves it.
//
// Advance fires what falls due in deadline order (ties in the order they
// were armed), with Now reading each deadline while it fires.
// AfterFunc functions run in the goroutine that calls Advance, one after
// another, so their effects are done when Advance returns. Timer and
// ticker channels are sent to without blocking; a ticker whose receiver
// has not taken the last tick has it replaced by the newer one, as
// time.Ticker drops ticks for a slow receiver, and a ticker with nothing
// else due in between ticks once for a whole stretch, at its last
// deadline in it.
//
// A Clock is safe for concurrent use.
type Clock struct {
	mu      sync.Mutex
	now     time.Time
	pending map[*timer]struct{}
	seq     uint64 // arming order, for ties
	started int
	changed chan struct{} // closed and replaced when started grows
}

var _ clock.Clock = (*Clock)(nil)

// New returns a Clock reading start.
func New(start time.Time) *Clock {
	return &Clock{now: start, pending: make(map[*timer]struct{}), changed: make(chan struct{})}
}

// Now returns the clock's time.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// AfterFunc arms a timer that calls f inside Advance once d has passed.
func (c *Clock) AfterFunc(d time.Duration, f func()) clock.Timer {
	return c.start(&timer{c: c, f: f}, d)
}

// NewTimer arms a timer that sends on its channel once d has passed.
func (c *Clock) NewTimer(d time.Duration) clock.Timer {
	return c.start(&timer{c: c, ch: make(chan time.Time, 1)}, d)
}

// NewTicker arms a ticker that sends on its channel every d.
func (c *Clock) NewTicker(d time.Duration) clock.Ticker {
	if d <= 0 {
		panic("clocktest: non-positive interval for NewTicker")
	}
	return ticker{c.start(&timer{c: c, ch: make(chan time.Time, 1), period: d}, d)}
}

func (c *Clock) start(t *timer, d time.Duration) *timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.armLocked(t, d)
	c.started++
	close(c.changed)
	c.changed = make(chan struct{})
	return t
}

func (c *Clock) armLocked(t *timer, d time.Duration) {
	c.seq++
	t.when, t.seq = c.now.Add(d), c.seq
	c.pending[t] = struct{}{}
}

// Started is how many timers and tickers were made (AfterFunc, NewTimer,
// NewTicker) since the clock was: a test that records it before an event
// can wait for the timer a goroutine arms in reaction (AwaitStarted).
func (c *Clock) Started() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.started
}

// AwaitStarted waits until Started reaches n, or ctx ends.
func (c *Clock) AwaitStarted(ctx context.Context, n int) error {
	for {
		c.mu.Lock()
		ok, changed := c.started >= n, c.changed
		c.mu.Unlock()
		if ok {
			return nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Pending is how many timers and tickers are armed.
func (c *Clock) Pending() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.pending)
}

// Advance moves the clock forward by d, firing everything that falls due.
func (c *Clock) Advance(d time.Duration) {
	c.mu.Lock()
	target := c.now.Add(d)
	for {
		t, next := c.dueLocked(target)
		if t == nil {
			break
		}
		if t.period > 0 && next.After(t.when) {
			// Nothing else happens before next: the ticks up to it would
			// only replace one another in the channel.
			t.when = t.when.Add(next.Sub(t.when) / t.period * t.period)
		}
		if t.when.After(c.now) {
			c.now = t.when
		}
		now := c.now
		if t.period > 0 {
			t.when = t.when.Add(t.period)
		} else {
			delete(c.pending, t)
		}
		c.mu.Unlock()
		t.fire(now)
		c.mu.Lock()
	}
	c.now = target
	c.mu.Unlock()
}

// dueLocked returns the earliest pending timer due by target, and the
// time of the next other event (the next other timer due, or target).
func (c *Clock) dueLocked(target time.Time) (*timer, time.Time) {
	var first, second *timer
	before := func(a, b *timer) bool {
		return b == nil || a.when.Before(b.when) || a.when.Equal(b.when) && a.seq < b.seq
	}
	for t := range c.pending {
		switch {
		case before(t, first):
			first, second = t, first
		case before(t, second):
			second = t
		}
	}
	if first == nil || first.when.After(target) {
		return nil, target
	}
	if second != nil && second.when.Before(target) {
		return first, second.when
	}
	return first, target
}

type timer struct {
	c      *Clock
	f      func()
	ch     chan time.Time
	period time.Duration // tickers
	when   time.Time
	seq    uint64
}

func (t *timer) fire(now time.Time) {
	if t.f != nil {
		t.f()
		return
	}
	select { // drop a tick the receiver did not take
	case <-t.ch:
	default:
	}
	select {
	case t.ch <- now:
	default:
	}
}

func (t *timer) C() <-chan time.Time { return t.ch }

// ticker is a timer with a period, seen through clock.Ticker.
type ticker struct{ t *timer }

func (t ticker) C() <-chan time.Time { return t.t.ch }
func (t ticker) Stop()               { t.t.Stop() }

func (t *timer) Stop() bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	_, ok := t.c.pending[t]
	delete(t.c.pending, t)
	t.drain()
	return ok
}

func (t *timer) Reset(d time.Duration) bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	_, ok := t.c.pending[t]
	t.drain()
	t.c.armLocked(t, d)
	return ok
}

// drain drops a value sent but not received, as Stop and Reset of a
// time.Timer do since Go 1.23: no stale time arrives after them.
func (t *timer) drain() {
	if t.ch == nil {
		return
	}
	select {
	case <-t.ch:
	default:
	}
}
