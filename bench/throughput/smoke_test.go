package throughput

import (
	"strings"
	"testing"
	"time"
)

// TestSmoke runs the harness end to end at the smallest scale: the raw
// underlay and meshd (kernel TUN, filter on with a real policy) for one
// second each, TCP and UDP, and checks that the table comes out and the
// meshd rows moved data through the daemons. It measures nothing worth
// reporting; the real run is TestThroughput (build tag "throughput").
func TestSmoke(t *testing.T) {
	requireTools(t, "iperf3")
	tp := newTopo(t, 1500) // skips unless root
	bin := meshdBinary(t)
	tests := []test{tcp1, udp1280}

	raw := tp.raw()
	results := tp.measure(t, raw, tests, time.Second, nil)

	m := tp.startMesh(t, bin, benchPolicy)
	tn := m.meshd(t, 0, false) // automatic MTU: 1420
	meshRes := tp.measure(t, tn, tests, time.Second, nil)
	tn.check(t)
	tn.stop()
	results = append(results, meshRes...)

	for _, r := range results {
		if r.err != nil || r.bytes <= 0 || r.seconds <= 0 {
			t.Errorf("%s, %s: %d bytes in %.2f s, error %v", r.setup, r.test.name, r.bytes, r.seconds, r.err)
		}
	}
	for _, r := range meshRes {
		// Data through the tunnel costs the daemons CPU; raw has no
		// tunnel process to charge.
		if r.cpu <= 0 {
			t.Errorf("%s, %s: the daemons used no CPU time for %d bytes", r.setup, r.test.name, r.bytes)
		}
	}
	var b strings.Builder
	printTable(&b, results)
	t.Logf("\n%s", b.String())
	if lines := strings.Count(b.String(), "\n"); lines != 2+len(results) {
		t.Errorf("table has %d lines, want header + %d rows", lines, len(results))
	}
	if !strings.Contains(b.String(), "| 1500 | meshd kernel TUN + filter, MTU 1420 (auto) | TCP 1 stream |") {
		t.Errorf("table lacks the meshd TCP row:\n%s", b.String())
	}
}
