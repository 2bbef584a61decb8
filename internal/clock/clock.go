// Package clock is the time source of components whose decisions depend on
// time passing (expiry, periodic sweeps, deletion timers, reconnect
// delays). Production code uses Real, which is package time; tests pass
// clocktest.Clock and move time by hand, so they never wait for the wall
// clock.
//
// Only schedules and decisions belong on a Clock. Deadlines on sockets
// (SetDeadline, HTTP/2 pings, connection limits) are enforced by the
// runtime's network poller on the wall clock, which no Clock can drive.
package clock

import (
	"context"
	"time"
)

// Clock tells the time and runs timers.
type Clock interface {
	Now() time.Time
	// AfterFunc calls f, in its own goroutine, once d has passed.
	AfterFunc(d time.Duration, f func()) Timer
	// NewTimer sends the time on the timer's channel once d has passed.
	NewTimer(d time.Duration) Timer
	// NewTicker sends the time on the ticker's channel every d, dropping
	// ticks for a slow receiver. d must be positive.
	NewTicker(d time.Duration) Ticker
}

// Timer is a pending event of a Clock, as time.Timer.
type Timer interface {
	// C is the channel the time is sent on; nil for AfterFunc timers.
	C() <-chan time.Time
	// Stop prevents the timer from firing and reports whether it was
	// pending.
	Stop() bool
	// Reset re-arms the timer to fire d from now and reports whether it
	// was pending.
	Reset(d time.Duration) bool
}

// Ticker is a periodic event of a Clock, as time.Ticker.
type Ticker interface {
	C() <-chan time.Time
	Stop()
}

// Real is the wall clock: package time.
type Real struct{}

// Now is time.Now.
func (Real) Now() time.Time { return time.Now() }

// AfterFunc is time.AfterFunc.
func (Real) AfterFunc(d time.Duration, f func()) Timer { return realTimer{time.AfterFunc(d, f)} }

// NewTimer is time.NewTimer.
func (Real) NewTimer(d time.Duration) Timer { return realTimer{time.NewTimer(d)} }

// NewTicker is time.NewTicker.
func (Real) NewTicker(d time.Duration) Ticker { return realTicker{time.NewTicker(d)} }

type realTimer struct{ t *time.Timer }

func (t realTimer) C() <-chan time.Time        { return t.t.C }
func (t realTimer) Stop() bool                 { return t.t.Stop() }
func (t realTimer) Reset(d time.Duration) bool { return t.t.Reset(d) }

type realTicker struct{ t *time.Ticker }

func (t realTicker) C() <-chan time.Time { return t.t.C }
func (t realTicker) Stop()               { t.t.Stop() }

// Or returns c, or Real if c is nil: the default of an optional Clock.
func Or(c Clock) Clock {
	if c == nil {
		return Real{}
	}
	return c
}

// Sleep waits until d has passed on c, or until ctx ends, when it returns
// ctx.Err().
func Sleep(ctx context.Context, c Clock, d time.Duration) error {
	t := c.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C():
		return nil
	}
}
