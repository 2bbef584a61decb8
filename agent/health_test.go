package agent

import (
	"errors"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/netmap"
)

type fixedSkew struct {
	d  time.Duration
	ok bool
}

func (f fixedSkew) ClockSkew() (time.Duration, time.Time, bool) { return f.d, time.Time{}, f.ok }

// TestHealth: each warning is raised by its condition only, with a message
// that says what to do, and none while the node is not running (status
// says why it is not).
func TestHealth(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	ok := healthInputs{running: true, ctlState: "connected", hasDERPMap: true, relays: 1, relaysUp: 1,
		relayStarted: now.Add(-time.Hour), skew: fixedSkew{time.Second, true},
		self: &netmap.Node{KeyExpiry: now.Add(90 * 24 * time.Hour)}}
	with := func(f func(*healthInputs)) healthInputs { in := ok; f(&in); return in }
	for _, tt := range []struct {
		name string
		in   healthInputs
		want map[string]string // code -> a substring of its message
	}{
		{"healthy", ok, nil},
		{"not running", with(func(in *healthInputs) { in.running = false; in.ctlState = "connecting" }), nil},
		{"stream down", with(func(in *healthInputs) { in.ctlState = "connecting to https://c:8443" }),
			map[string]string{localapi.HealthCoordinatorUnreachable: "last network map"}},
		{"reports failing", with(func(in *healthInputs) { in.ctlReachErr = errors.New("dial tcp: refused") }),
			map[string]string{localapi.HealthCoordinatorUnreachable: "dial tcp: refused"}},
		{"no relay", with(func(in *healthInputs) { in.relaysUp = 0 }), map[string]string{localapi.HealthNoRelay: "meshd netcheck"}},
		{"no relay yet at start", with(func(in *healthInputs) { in.relaysUp = 0; in.relayStarted = now.Add(-time.Second) }), nil},
		{"no DERP map, no relay needed", with(func(in *healthInputs) { in.relaysUp, in.relays, in.hasDERPMap = 0, 0, false }), nil},
		{"mtu", with(func(in *healthInputs) { in.mtuProblems = []string{"gpu-2", "gpu-7"} }), map[string]string{localapi.HealthMTUProblem: "gpu-2, gpu-7"}},
		{"clock behind", with(func(in *healthInputs) { in.skew = fixedSkew{2 * time.Minute, true} }), map[string]string{localapi.HealthClockSkew: "2m0s behind"}},
		{"clock ahead", with(func(in *healthInputs) { in.skew = fixedSkew{-45 * time.Second, true} }), map[string]string{localapi.HealthClockSkew: "45s ahead of"}},
		{"skew within bounds", with(func(in *healthInputs) { in.skew = fixedSkew{29 * time.Second, true} }), nil},
		{"skew unknown", with(func(in *healthInputs) { in.skew = fixedSkew{time.Hour, false} }), nil},
		{"key expiring", with(func(in *healthInputs) { in.self = &netmap.Node{KeyExpiry: now.Add(48 * time.Hour)} }), map[string]string{localapi.HealthKeyExpiring: "expires in 48h0m0s"}},
		{"key expired", with(func(in *healthInputs) { in.self = &netmap.Node{KeyExpiry: now.Add(-time.Minute)} }), map[string]string{localapi.HealthKeyExpiring: "expired at"}},
		{"key never expires", with(func(in *healthInputs) { in.self = &netmap.Node{} }), nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got := health(tt.in, now)
			if len(got) != len(tt.want) {
				t.Fatalf("warnings %+v, want %v", got, tt.want)
			}
			for _, w := range got {
				if sub, ok := tt.want[w.Code]; !ok || !strings.Contains(w.Message, sub) {
					t.Errorf("warning %s: %q, want one containing %q", w.Code, w.Message, sub)
				}
			}
		})
	}
}
