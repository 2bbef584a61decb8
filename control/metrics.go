package control

import (
	"fmt"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"meshd.dev/meshd/control/controlclient"
)

// Coordinator metrics (docs/metrics.md). Gauges are read from the hub when
// Prometheus scrapes; the histograms and counters below are updated once
// per change, policy change or registration, never per map frame.
type serverMetrics struct {
	reg *prometheus.Registry
	// fanout is how long one node change took to reach the queues of
	// every session that sees the node (encoding included).
	fanout prometheus.Histogram
	// policy is how long a policy change took to compute and send.
	policy prometheus.Histogram
	// registrations counts registration requests by result ("ok" or the
	// wire error code).
	registrations *prometheus.CounterVec
}

var (
	mNodes   = prometheus.NewDesc("meshd_coordinator_nodes", "Registered nodes, by whether they hold a map stream now (online).", []string{"state"}, nil)
	mStreams = prometheus.NewDesc("meshd_coordinator_map_streams", "Open map streams (a node may hold up to 4).", nil, nil)
	mFrames  = prometheus.NewDesc("meshd_coordinator_map_frames_total", "Map stream frames sent after each stream's first message (keep-alives included).", nil, nil)
	mWrites  = prometheus.NewDesc("meshd_coordinator_map_stream_writes_total", "Socket writes (flushes) that carried those frames: frames per write is how well bursts are batched.", nil, nil)
	mPatches = prometheus.NewDesc("meshd_coordinator_filter_patches_total", "Packet filters sent as a patch rather than whole: of their sources (clients of protocol 3 on), or of any rule field after a policy change (protocol 4 on).", nil, nil)
	mTLS     = prometheus.NewDesc("meshd_coordinator_map_stream_tls_total", "Map streams started, by their connection's TLS handshake: full, or resumed from a session ticket (any replica's).", []string{"handshake"}, nil)
	mFirst   = prometheus.NewDesc("meshd_coordinator_map_stream_starts_total", "Map streams started, by their first message: a full map, the deltas a resuming node missed, or a full map without the peers the node held (peers_kept).", []string{"kind"}, nil)
)

func newServerMetrics(s *Server) *serverMetrics {
	m := &serverMetrics{
		reg: prometheus.NewRegistry(),
		fanout: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "meshd_coordinator_change_fanout_seconds",
			Help:    "Time from a node change to its frame being queued to every map stream that sees the node.",
			Buckets: prometheus.ExponentialBuckets(10e-6, 4, 10), // 10µs to 2.6s
		}),
		policy: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "meshd_coordinator_policy_change_seconds",
			Help:    "Time a policy change took to compute every node's update and queue it.",
			Buckets: prometheus.ExponentialBuckets(1e-3, 2, 14), // 1ms to 8s
		}),
		registrations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshd_coordinator_registrations_total",
			Help: "Registration requests, by result: ok, or the error code the node was sent.",
		}, []string{"result"}),
	}
	m.reg.MustRegister(m.fanout, m.policy, m.registrations, hubCollector{s.hub},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// registered counts one registration's result.
func (m *serverMetrics) registered(err error) {
	result := "ok"
	if err != nil {
		result, _ = controlclient.Code(err)
		if result == "" {
			result = "internal"
		}
	}
	m.registrations.WithLabelValues(result).Inc()
}

// MetricsHandler serves the coordinator's metrics in the Prometheus text
// format (`meshd coordinator --metrics-listen`).
func (s *Server) MetricsHandler() http.Handler {
	return promhttp.HandlerFor(s.met.reg, promhttp.HandlerOpts{Timeout: 10 * time.Second, MaxRequestsInFlight: 4})
}

// AddMetrics adds c's metrics to those MetricsHandler serves (the
// embedded relay's).
func (s *Server) AddMetrics(c prometheus.Collector) error {
	if err := s.met.reg.Register(c); err != nil {
		return fmt.Errorf("coordinator metrics: %w", err)
	}
	return nil
}

// hubCollector reads the hub's gauges at scrape time.
type hubCollector struct{ h *hub }

func (c hubCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- mNodes
	ch <- mStreams
	ch <- mFirst
	ch <- mTLS
	ch <- mFrames
	ch <- mWrites
	ch <- mPatches
}

func (c hubCollector) Collect(ch chan<- prometheus.Metric) {
	h := c.h
	h.mu.Lock()
	total, online, streams := len(h.nodes), len(h.sessions), 0
	for _, ss := range h.sessions {
		streams += len(ss)
	}
	h.mu.Unlock()
	ch <- prometheus.MustNewConstMetric(mNodes, prometheus.GaugeValue, float64(online), "online")
	ch <- prometheus.MustNewConstMetric(mNodes, prometheus.GaugeValue, float64(total-online), "offline")
	ch <- prometheus.MustNewConstMetric(mStreams, prometheus.GaugeValue, float64(streams))
	ch <- prometheus.MustNewConstMetric(mFirst, prometheus.CounterValue, float64(h.stats.full.Load()), "full")
	ch <- prometheus.MustNewConstMetric(mFirst, prometheus.CounterValue, float64(h.stats.resumed.Load()), "resumed")
	ch <- prometheus.MustNewConstMetric(mFirst, prometheus.CounterValue, float64(h.stats.peersKept.Load()), "peers_kept")
	ch <- prometheus.MustNewConstMetric(mFrames, prometheus.CounterValue, float64(h.stats.frames.Load()))
	ch <- prometheus.MustNewConstMetric(mWrites, prometheus.CounterValue, float64(h.stats.writes.Load()))
	ch <- prometheus.MustNewConstMetric(mPatches, prometheus.CounterValue, float64(h.stats.filterPatches.Load()))
	ch <- prometheus.MustNewConstMetric(mTLS, prometheus.CounterValue, float64(h.stats.tlsFull.Load()), "full")
	ch <- prometheus.MustNewConstMetric(mTLS, prometheus.CounterValue, float64(h.stats.tlsResumed.Load()), "resumed")
}
