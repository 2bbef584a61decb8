package throughput

import (
	"strings"
	"testing"
	"time"
)

// TestSmoke runs the harness end to end at the smallest scale: the raw
// underlay and meshd (kernel TUN, filter on with a real policy) for one
// second each, TCP and UDP, then meshd relayed through the coordinator's
// DERP relay with direct UDP blocked (TCP only), and checks that the table
// comes out, the meshd rows moved data through the daemons, and the
// relayed row's data went through the relay's TCP connections. It measures
// nothing worth reporting; the real run is TestThroughput (build tag
// "throughput").
func TestSmoke(t *testing.T) {
	requireTools(t, "iperf3", "iptables", "ss")
	tp := newTopo(t, 1500) // skips unless root
	bin := meshdBinary(t)
	tests := []test{tcp1, udp1280}

	raw := tp.raw()
	results := tp.measure(t, raw, tests, time.Second, nil)

	m := tp.startMesh(t, bin, benchPolicy)
	var meshRes []result
	for _, row := range []struct {
		opts  meshdOpts
		tests []test
	}{
		{meshdOpts{}, tests}, // automatic MTU: 1420, direct
		{meshdOpts{relay: true}, []test{tcp1}},
	} {
		tn := m.meshd(t, row.opts)
		res := tp.measure(t, tn, row.tests, time.Second, nil)
		tn.check(t, res)
		tn.stop()
		meshRes = append(meshRes, res...)
	}
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
	for _, want := range []string{
		"| 1500 | meshd kernel TUN + filter, MTU 1420 (auto) | TCP 1 stream |",
		"| 1500 | meshd kernel TUN + filter, DERP relay (TLS), MTU 1420 (auto) | TCP 1 stream |",
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("table lacks the row %q:\n%s", want, b.String())
		}
	}
}
