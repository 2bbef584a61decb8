// Package derpmetrics exposes a DERP relay's counters as Prometheus
// metrics, read from the relay's atomics when Prometheus scrapes (the
// relay itself does not depend on a metrics library).
package derpmetrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"meshd.dev/meshd/derp"
)

var (
	mClients   = prometheus.NewDesc("meshd_derp_clients", "Nodes connected to the relay now (mesh peers excluded).", nil, nil)
	mMeshPeers = prometheus.NewDesc("meshd_derp_mesh_peers", "Relays of the region watching this one.", nil, nil)
	mRemote    = prometheus.NewDesc("meshd_derp_remote_keys", "Node keys known to be connected to other relays of the region.", nil, nil)
	mPackets   = prometheus.NewDesc("meshd_derp_packets_total", "Packets the relay handled, by outcome: relayed (queued to a local client), forwarded (to a mesh peer), dropped (queue full, unknown destination, closed).", []string{"outcome"}, nil)
	mBytes     = prometheus.NewDesc("meshd_derp_relayed_bytes_total", "Payload bytes queued to local clients.", nil, nil)
	mDisc      = prometheus.NewDesc("meshd_derp_disconnects_total", "Clients the relay disconnected, by reason: slow (not reading), revoked (node key no longer valid).", []string{"reason"}, nil)
	mHSErr     = prometheus.NewDesc("meshd_derp_handshake_errors_total", "Rejected or broken client handshakes.", nil, nil)
)

// Collector reads a relay's counters at scrape time.
type Collector struct{ s *derp.Server }

// New returns the collector of relay s.
func New(s *derp.Server) *Collector { return &Collector{s: s} }

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{mClients, mMeshPeers, mRemote, mPackets, mBytes, mDisc, mHSErr} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	st := c.s.Stats()
	g := func(d *prometheus.Desc, v int) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, float64(v))
	}
	n := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	g(mClients, st.Clients)
	g(mMeshPeers, st.MeshPeers)
	g(mRemote, st.RemoteKeys)
	n(mPackets, st.PacketsRelayed, "relayed")
	n(mPackets, st.PacketsForwarded, "forwarded")
	n(mPackets, st.PacketsDropped, "dropped")
	n(mBytes, st.BytesRelayed)
	n(mDisc, st.SlowDisconnects, "slow")
	n(mDisc, st.Revoked, "revoked")
	n(mHSErr, st.HandshakeErrors)
}
