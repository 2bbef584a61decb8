package clocktest

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"meshd.dev/meshd/internal/clock"
)

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

func TestNowMovesOnlyWithAdvance(t *testing.T) {
	c := New(t0)
	if got := c.Now(); !got.Equal(t0) {
		t.Fatalf("Now = %v, want %v", got, t0)
	}
	c.Advance(90 * time.Second)
	if got, want := c.Now(), t0.Add(90*time.Second); !got.Equal(want) {
		t.Fatalf("after Advance: Now = %v, want %v", got, want)
	}
}

// TestAfterFuncOrder: functions run inside Advance in deadline order (ties
// in arming order), each seeing its own deadline as Now; one armed by a
// function that falls due within the same Advance runs too; stopped and
// re-armed timers follow their last arming.
func TestAfterFuncOrder(t *testing.T) {
	c := New(t0)
	var got []string
	at := func(name string) func() {
		return func() { got = append(got, name+"@"+c.Now().Sub(t0).String()) }
	}
	c.AfterFunc(3*time.Second, at("c"))
	c.AfterFunc(time.Second, at("a"))
	c.AfterFunc(time.Second, at("a2"))
	stopped := c.AfterFunc(2*time.Second, at("stopped"))
	moved := c.AfterFunc(time.Second, at("moved"))
	c.AfterFunc(2*time.Second, func() {
		at("b")()
		c.AfterFunc(500*time.Millisecond, at("nested"))
	})
	c.AfterFunc(10*time.Second, at("later"))
	if !stopped.Stop() || stopped.Stop() {
		t.Fatal("Stop of a pending timer: want true once, then false")
	}
	if !moved.Reset(4 * time.Second) {
		t.Fatal("Reset of a pending timer returned false")
	}
	c.Advance(5 * time.Second)
	want := []string{"a@1s", "a2@1s", "b@2s", "nested@2.5s", "c@3s", "moved@4s"}
	if !slices.Equal(got, want) {
		t.Fatalf("fired %v, want %v", got, want)
	}
	if c.Pending() != 1 {
		t.Fatalf("%d pending, want 1 (later)", c.Pending())
	}
	if moved.Reset(time.Second) {
		t.Fatal("Reset of a fired timer returned true")
	}
	c.Advance(999 * time.Millisecond)
	if len(got) != len(want) {
		t.Fatalf("fired early: %v", got[len(want):])
	}
	c.Advance(time.Millisecond)
	if got[len(got)-1] != "moved@6s" {
		t.Fatalf("re-armed timer: %v", got)
	}
}

func TestTimerChannel(t *testing.T) {
	c := New(t0)
	tm := c.NewTimer(time.Minute)
	c.Advance(59 * time.Second)
	select {
	case v := <-tm.C():
		t.Fatalf("fired at %v, before its deadline", v)
	default:
	}
	c.Advance(2 * time.Second)
	select {
	case v := <-tm.C():
		if !v.Equal(t0.Add(time.Minute)) {
			t.Fatalf("sent %v, want its deadline %v", v, t0.Add(time.Minute))
		}
	default:
		t.Fatal("not fired after its deadline")
	}
	// A value sent and not received is gone after Reset, as with
	// time.Timer.
	tm.Reset(time.Second)
	c.Advance(time.Second)
	tm.Reset(time.Second)
	select {
	case v := <-tm.C():
		t.Fatalf("stale value %v after Reset", v)
	default:
	}
	c.Advance(time.Second)
	if tm.Stop() {
		t.Fatal("Stop of a fired timer returned true")
	}
	select {
	case v := <-tm.C():
		t.Fatalf("stale value %v after Stop", v)
	default:
	}
}

// TestTicker: a ticker ticks every period; a receiver that did not take a
// tick finds the newest one; a long stretch with nothing else due costs
// one tick at its last deadline, not one per period.
func TestTicker(t *testing.T) {
	c := New(t0)
	tk := c.NewTicker(30 * time.Second)
	tests := []struct {
		advance time.Duration
		want    time.Duration // of the tick found after it; 0: none
	}{
		{29 * time.Second, 0},
		{time.Second, 30 * time.Second},
		{30 * time.Second, time.Minute},
		{10 * time.Second, 0},
		{50 * time.Second, 2 * time.Minute}, // 90s, 120s: the newest
		{180 * 24 * time.Hour, 180*24*time.Hour + 2*time.Minute},
	}
	for i, tt := range tests {
		c.Advance(tt.advance)
		var got time.Duration
		select {
		case v := <-tk.C():
			got = v.Sub(t0)
		default:
		}
		if got != tt.want {
			t.Fatalf("step %d: tick at %v, want %v (0: none)", i, got, tt.want)
		}
	}
	tk.Stop()
	c.Advance(time.Hour)
	select {
	case v := <-tk.C():
		t.Fatalf("tick %v after Stop", v)
	default:
	}
	if c.Pending() != 0 {
		t.Fatalf("%d pending after Stop", c.Pending())
	}
}

// TestTickerBetweenTimers: a ticker still ticks at each of its deadlines
// that another event falls between, so that event sees the ticker's state
// as the wall clock would leave it.
func TestTickerBetweenTimers(t *testing.T) {
	c := New(t0)
	tk := c.NewTicker(10 * time.Second)
	var seen []time.Duration
	c.AfterFunc(25*time.Second, func() {
		select {
		case v := <-tk.C():
			seen = append(seen, v.Sub(t0))
		default:
		}
	})
	c.Advance(time.Minute)
	v := <-tk.C()
	if !slices.Equal(seen, []time.Duration{20 * time.Second}) || v.Sub(t0) != time.Minute {
		t.Fatalf("the function at 25s took %v and the last tick was %v; want [20s] and 1m", seen, v.Sub(t0))
	}
}

func TestAwaitStarted(t *testing.T) {
	c := New(t0)
	n := c.Started()
	go c.AfterFunc(time.Second, func() {})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := c.AwaitStarted(ctx, n+1); err != nil {
		t.Fatalf("timer armed by a goroutine: %v", err)
	}
	ctx, cancel = context.WithCancel(context.Background())
	cancel()
	if err := c.AwaitStarted(ctx, n+2); !errors.Is(err, context.Canceled) {
		t.Fatalf("nothing armed, context canceled: %v", err)
	}
}

func TestSleep(t *testing.T) {
	c := New(t0)
	done := make(chan error, 1)
	n := c.Started()
	go func() { done <- clock.Sleep(context.Background(), c, time.Minute) }()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := c.AwaitStarted(ctx, n+1); err != nil {
		t.Fatal(err)
	}
	c.Advance(time.Minute - 1)
	select {
	case err := <-done:
		t.Fatalf("Sleep returned %v before its time", err)
	default:
	}
	c.Advance(1)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
