package control

import (
	"context"
	"net/http/httptest"
	"testing"

	"meshd.dev/meshd/internal/promtest"
)

// TestCoordinatorMetrics scrapes the coordinator's /metrics with the
// Prometheus text parser and checks that the values follow what happened:
// registrations by result, nodes online and map streams, a change's fan-out
// and a policy change observed once each.
func TestCoordinatorMetrics(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	scrape := func() promtest.Families {
		t.Helper()
		rec := httptest.NewRecorder()
		ts.MetricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
		f, err := promtest.Parse(rec.Body)
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	f := scrape()
	for _, name := range []string{"meshd_coordinator_nodes", "meshd_coordinator_map_streams", "meshd_coordinator_change_fanout_seconds",
		"meshd_coordinator_policy_change_seconds", "meshd_coordinator_map_stream_starts_total"} {
		if f[name] == nil {
			t.Errorf("no %s before any node: %s", name, f)
		}
	}
	key := ts.key(t, AuthKeyOptions{Tags: []string{"tag:x"}, Reusable: true})
	a, b := newTestNode(t, ts.url, ""), newTestNode(t, ts.url, "")
	a.mustRegister(t, key, "a")
	b.mustRegister(t, key, "b")
	bad := newTestNode(t, ts.url, ts.Fingerprint())
	if _, err := bad.register(context.Background(), "mskey-nope-nope-"+ts.Fingerprint(), "bad"); err == nil {
		t.Fatal("a made-up auth key registered")
	}
	a.follow(t, a.mapRequest())
	b.follow(t, b.mapRequest())
	a.waitMap(t, "b online", peerOnline(b.id, true))
	fanoutBefore, _ := scrape().Value("meshd_coordinator_change_fanout_seconds")
	ts.SetPolicy(nil)

	f = scrape()
	for _, tt := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"meshd_coordinator_registrations_total", []string{"result", "ok"}, 2},
		{"meshd_coordinator_nodes", []string{"state", "online"}, 2},
		{"meshd_coordinator_nodes", []string{"state", "offline"}, 0},
		{"meshd_coordinator_map_streams", nil, 2},
		{"meshd_coordinator_map_stream_starts_total", []string{"kind", "full"}, 2},
		{"meshd_coordinator_policy_change_seconds", nil, 1}, // a histogram: its count
	} {
		if got, ok := f.Value(tt.name, tt.labels...); !ok || got != tt.want {
			t.Errorf("%s%v = %v (present %v), want %v", tt.name, tt.labels, got, ok, tt.want)
		}
	}
	var refused float64
	for _, r := range f.LabelValues("meshd_coordinator_registrations_total", "result") {
		if r != "ok" {
			v, _ := f.Value("meshd_coordinator_registrations_total", "result", r)
			refused += v
		}
	}
	// a saw b come online after its first message: at least one frame,
	// in at least one write, and never more writes than frames.
	frames, _ := f.Value("meshd_coordinator_map_frames_total")
	writes, _ := f.Value("meshd_coordinator_map_stream_writes_total")
	if writes < 1 || frames < writes {
		t.Errorf("map frames %v in %v writes, want >= 1 write and no more writes than frames", frames, writes)
	}
	if refused != 1 {
		t.Errorf("refused registrations %v, want 1 (results %v)", refused, f.LabelValues("meshd_coordinator_registrations_total", "result"))
	}
	if n, _ := f.Value("meshd_coordinator_change_fanout_seconds"); n < 2 || n < fanoutBefore {
		t.Errorf("fan-out observations %v, want one per node change (>= 2)", n)
	}
}
