package agent

import (
	"context"
	"log/slog"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// recordHandler keeps every record it is given.
type recordHandler struct {
	level slog.Level
	mu    sync.Mutex
	recs  []slog.Record
}

func (h *recordHandler) Enabled(_ context.Context, l slog.Level) bool { return l >= h.level }
func (h *recordHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.recs = append(h.recs, r)
	return nil
}
func (h *recordHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *recordHandler) WithGroup(string) slog.Handler      { return h }

func (h *recordHandler) records() []slog.Record {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]slog.Record(nil), h.recs...)
}

// countingArg counts how often it is formatted.
type countingArg struct{ n *int }

func (c countingArg) String() string { *c.n++; return "arg" }

func TestWGLoggerVerboseCostsNothingWhenDebugIsOff(t *testing.T) {
	tests := []struct {
		level     slog.Level
		formatted int
		records   int
	}{
		{slog.LevelInfo, 0, 0},
		{slog.LevelDebug, 1, 1},
	}
	for _, tt := range tests {
		t.Run(tt.level.String(), func(t *testing.T) {
			h := &recordHandler{level: tt.level}
			n := 0
			wgLogger(slog.New(h)).Verbosef("peer %v handshake", countingArg{&n})
			if n != tt.formatted || len(h.records()) != tt.records {
				t.Fatalf("verbose line formatted %d times, %d records; want %d, %d", n, len(h.records()), tt.formatted, tt.records)
			}
		})
	}
}

func TestWGLoggerErrorsAreWarningsRateLimited(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := &recordHandler{level: slog.LevelInfo}
		l := wgLogger(slog.New(h))
		for range 100 {
			l.Errorf("failed to send: %v", "boom")
		}
		recs := h.records()
		if len(recs) != 10 {
			t.Fatalf("%d records for a burst of 100 errors, want the limiter's burst of 10", len(recs))
		}
		for _, r := range recs {
			if r.Level != slog.LevelWarn || r.Message != "wireguard: failed to send: boom" {
				t.Fatalf("record %v %q, want Warn with the error text", r.Level, r.Message)
			}
		}
		// One error a second refills the limiter, not a millisecond
		// before (virtual time; the limiter's float arithmetic blurs
		// the last nanoseconds).
		time.Sleep(time.Second - time.Millisecond)
		l.Errorf("still too soon")
		if n := len(h.records()); n != 10 {
			t.Fatalf("%d records a millisecond before the limiter refilled, want 10", n)
		}
		time.Sleep(time.Millisecond)
		l.Errorf("again")
		recs = h.records()
		if len(recs) != 11 {
			t.Fatalf("%d records after the limiter refilled, want 11", len(recs))
		}
		var suppressed int64
		recs[10].Attrs(func(a slog.Attr) bool {
			if a.Key == "suppressed_since_last" {
				suppressed = a.Value.Int64()
			}
			return true
		})
		if suppressed != 91 {
			t.Fatalf("suppressed_since_last = %d, want 91", suppressed)
		}
	})
}
