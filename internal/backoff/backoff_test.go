package backoff

import (
	"context"
	"testing"
	"testing/synctest"
	"time"
)

func TestDelay(t *testing.T) {
	b := Backoff{Min: time.Second, Max: 8 * time.Second, Stable: 10 * time.Second}
	steps := []struct {
		up       time.Duration
		min, max time.Duration // bounds of the jittered delay
	}{
		{0, 500 * time.Millisecond, time.Second},
		{0, time.Second, 2 * time.Second},
		{time.Second, 2 * time.Second, 4 * time.Second},
		{0, 4 * time.Second, 8 * time.Second},
		{0, 4 * time.Second, 8 * time.Second}, // capped at Max
		{9 * time.Second, 4 * time.Second, 8 * time.Second},
		{10 * time.Second, 500 * time.Millisecond, time.Second}, // stable: reset
		{0, time.Second, 2 * time.Second},
	}
	for i, s := range steps {
		d := b.Delay(s.up)
		if d < s.min || d > s.max {
			t.Fatalf("step %d (up %v): delay %v, want within [%v, %v]", i, s.up, d, s.min, s.max)
		}
	}
}

func TestDefaultStable(t *testing.T) {
	b := Backoff{Min: time.Second, Max: time.Minute}
	b.Delay(0)
	b.Delay(0)
	if d := b.Delay(DefaultStable); d > time.Second {
		t.Fatalf("an attempt up for DefaultStable did not reset the delay: %v", d)
	}
}

func TestWait(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := Backoff{Min: 2 * time.Second, Max: 2 * time.Second}
		start := time.Now()
		if err := b.Wait(context.Background(), 0); err != nil {
			t.Fatal(err)
		}
		if el := time.Since(start); el < time.Second || el > 2*time.Second {
			t.Fatalf("waited %v, want within [1s, 2s]", el)
		}
		ctx, cancel := context.WithCancel(context.Background())
		go func() {
			time.Sleep(100 * time.Millisecond)
			cancel()
		}()
		start = time.Now()
		if err := b.Wait(ctx, 0); err != context.Canceled {
			t.Fatalf("Wait after cancel = %v, want context.Canceled", err)
		}
		if el := time.Since(start); el != 100*time.Millisecond {
			t.Fatalf("cancel took %v to end the wait, want 100ms", el)
		}
	})
}
