package clock

import (
	"context"
	"errors"
	"testing"
	"testing/synctest"
	"time"
)

// TestReal: Real is package time (checked in a synctest bubble, whose
// fake time package time follows).
func TestReal(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var c Clock = Real{}
		start := c.Now()
		fired := make(chan time.Time, 1)
		c.AfterFunc(time.Second, func() { fired <- c.Now() })
		tm := c.NewTimer(2 * time.Second)
		tk := c.NewTicker(3 * time.Second)
		defer tk.Stop()
		if at := <-fired; at.Sub(start) != time.Second {
			t.Fatalf("AfterFunc ran after %v, want 1s", at.Sub(start))
		}
		if at := <-tm.C(); at.Sub(start) != 2*time.Second {
			t.Fatalf("timer fired after %v, want 2s", at.Sub(start))
		}
		if at := <-tk.C(); at.Sub(start) != 3*time.Second {
			t.Fatalf("ticker ticked after %v, want 3s", at.Sub(start))
		}
		if tm.Reset(time.Second) || !tm.Stop() {
			t.Fatal("Reset of a fired timer or Stop of a re-armed one reported the wrong state")
		}
	})
}

func TestSleep(t *testing.T) {
	tests := []struct {
		name    string
		cancel  time.Duration // after this the context ends; 0: never
		want    error
		elapsed time.Duration
	}{
		{"runs out", 0, nil, time.Minute},
		{"context ends first", time.Second, context.Canceled, time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				if tt.cancel > 0 {
					time.AfterFunc(tt.cancel, cancel)
				}
				start := time.Now()
				if err := Sleep(ctx, Real{}, time.Minute); !errors.Is(err, tt.want) {
					t.Fatalf("Sleep = %v, want %v", err, tt.want)
				}
				if got := time.Since(start); got != tt.elapsed {
					t.Fatalf("Sleep returned after %v, want %v", got, tt.elapsed)
				}
			})
		})
	}
}

func TestOr(t *testing.T) {
	if _, ok := Or(nil).(Real); !ok {
		t.Fatal("Or(nil) is not Real")
	}
	var c Clock = stopped{}
	if Or(c) != c {
		t.Fatal("Or(c) is not c")
	}
}

// stopped is a Clock that is not Real, for TestOr.
type stopped struct{ Real }
