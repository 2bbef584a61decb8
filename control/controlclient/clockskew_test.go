package controlclient

import (
	"testing"
	"time"
)

// TestClockSkew: the coordinator's Date header (whole seconds) counts as
// skew only beyond its resolution and the round trip: a reading inside
// [sent-1s, got] is no skew.
func TestClockSkew(t *testing.T) {
	sent := time.Date(2026, 12, 1, 12, 0, 0, 400e6, time.UTC)
	got := sent.Add(300 * time.Millisecond)
	for _, tt := range []struct {
		name string
		date time.Time
		want time.Duration
	}{
		{"in sync, truncated", sent.Truncate(time.Second), 0},
		{"in sync at the answer", got.Truncate(time.Second), 0},
		// 12:02:00 read, answered at 12:00:00.7: at least 1m59.3s ahead.
		{"coordinator ahead", got.Add(2 * time.Minute).Truncate(time.Second), 119300 * time.Millisecond},
		// 11:59:00 read (so before 11:59:01), sent at 12:00:00.4: at
		// least 59.4s behind.
		{"coordinator behind", sent.Add(-time.Minute).Truncate(time.Second), -59400 * time.Millisecond},
	} {
		var tr skewReading
		tr.note(tt.date, sent, got)
		if tr.skew != tt.want || tr.at != got {
			t.Errorf("%s: skew %v at %v, want %v", tt.name, tr.skew, tr.at, tt.want)
		}
	}
}
