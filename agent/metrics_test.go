package agent

import (
	"fmt"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"meshd.dev/meshd/agent/magicbind"
	"meshd.dev/meshd/netmap"
)

// TestPeerSeriesBounded: per-peer series exist only for peers in the map
// with traffic, at most maxPeers of them, the busiest kept; the rest show
// in meshd_peer_series_omitted. Labels are hostnames, never keys.
func TestPeerSeriesBounded(t *testing.T) {
	names := map[netmap.NodePublic]string{}
	var peers []magicbind.PeerCounters
	for i := range 150 {
		k := netmap.NewNodePrivate().Public()
		names[k] = fmt.Sprintf("gpu-%03d", i)
		peers = append(peers, magicbind.PeerCounters{Key: k, RxBytes: [2]uint64{uint64(i) * 1000, 0}})
	}
	// Traffic from a key no longer in the map, and a silent peer: neither
	// gets series.
	peers = append(peers, magicbind.PeerCounters{Key: netmap.NewNodePrivate().Public(), TxBytes: [2]uint64{1 << 40, 0}})
	c := &metricsCollector{perPeer: true, maxPeers: 100}
	ch := make(chan prometheus.Metric, 10000)
	c.collectPeers(ch, peers, names)
	close(ch)
	seen := map[string]bool{}
	var omitted float64
	for m := range ch {
		var pb dto.Metric
		if err := m.Write(&pb); err != nil {
			t.Fatal(err)
		}
		if m.Desc() == mPeerOmitted {
			omitted = pb.Gauge.GetValue()
			continue
		}
		for _, l := range pb.Label {
			if l.GetName() == "peer" {
				seen[l.GetValue()] = true
			}
		}
	}
	// gpu-000 has no traffic; gpu-001..gpu-149 do, of which the 100
	// busiest (gpu-050..gpu-149) get series.
	if len(seen) != 100 || !seen["gpu-149"] || !seen["gpu-050"] || seen["gpu-049"] || seen["gpu-000"] {
		t.Errorf("%d peers with series (gpu-149 %v, gpu-050 %v, gpu-049 %v, gpu-000 %v)", len(seen), seen["gpu-149"], seen["gpu-050"], seen["gpu-049"], seen["gpu-000"])
	}
	if omitted != 49 {
		t.Errorf("omitted %v, want 49", omitted)
	}
	for p := range seen {
		if len(p) != len("gpu-000") {
			t.Errorf("peer label %q is not a hostname", p)
		}
	}
}
