package agent

import (
	"cmp"
	"context"
	"net/http"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/agent/magicbind"
	"meshd.dev/meshd/filter"
	"meshd.dev/meshd/netmap"
)

// Metrics (docs/metrics.md). Nothing here runs on the data path: the
// collector reads the counters the data path keeps anyway (the filter's,
// the magic bind's per-peer atomics) when Prometheus scrapes, so a scrape
// costs work and the data path costs nothing extra.

// DefaultMaxPeerSeries bounds the per-peer series of one scrape: the peers
// with the most traffic get their own series, the rest count only in the
// totals (meshd_peer_series_omitted says how many).
const DefaultMaxPeerSeries = 100

var (
	mPeerTxBytes   = prometheus.NewDesc("meshd_peer_tx_bytes_total", "WireGuard bytes sent to a peer (UDP payload, after encryption), by path.", []string{"peer", "path"}, nil)
	mPeerRxBytes   = prometheus.NewDesc("meshd_peer_rx_bytes_total", "WireGuard bytes received from a peer (UDP payload, before decryption), by path.", []string{"peer", "path"}, nil)
	mPeerTxPackets = prometheus.NewDesc("meshd_peer_tx_packets_total", "WireGuard packets sent to a peer, by path.", []string{"peer", "path"}, nil)
	mPeerRxPackets = prometheus.NewDesc("meshd_peer_rx_packets_total", "WireGuard packets received from a peer, by path.", []string{"peer", "path"}, nil)
	mPeerPathChg   = prometheus.NewDesc("meshd_peer_path_changes_total", "Changes of the path sends to a peer take (relay/direct, or another direct address).", []string{"peer"}, nil)
	mPeerOmitted   = prometheus.NewDesc("meshd_peer_series_omitted", "Peers with traffic left out of the per-peer series by the cardinality bound (counted in the totals).", nil, nil)

	mTxBytes    = prometheus.NewDesc("meshd_tx_bytes_total", "WireGuard bytes sent to all peers, by path.", []string{"path"}, nil)
	mRxBytes    = prometheus.NewDesc("meshd_rx_bytes_total", "WireGuard bytes received from all peers, by path.", []string{"path"}, nil)
	mTxPackets  = prometheus.NewDesc("meshd_tx_packets_total", "WireGuard packets sent to all peers, by path.", []string{"path"}, nil)
	mRxPackets  = prometheus.NewDesc("meshd_rx_packets_total", "WireGuard packets received from all peers, by path.", []string{"path"}, nil)
	mPathChg    = prometheus.NewDesc("meshd_path_changes_total", "Path changes of all peers.", nil, nil)
	mHandshakes = prometheus.NewDesc("meshd_handshakes_sent_total", "WireGuard handshake messages (initiations and responses) sent to peers.", nil, nil)
	mBatches    = prometheus.NewDesc("meshd_wireguard_batches_total", "Batches of packets WireGuard encrypted (out) or decrypted (in), by whether they ran to completion on the goroutine that had them (inline) or went through the worker pipeline.", []string{"direction", "path"}, nil)
	mSlowSends  = prometheus.NewDesc("meshd_wireguard_slow_sends_total", "Inline sends over a path that can stall on its own (a relay) that took over 5 ms, each sending the peer's next batch through the pipeline.", nil, nil)

	mFilterAccepted = prometheus.NewDesc("meshd_filter_accepted_packets_total", "Packets the packet filter let through, by direction (in: from peers).", []string{"direction"}, nil)
	mFilterDropped  = prometheus.NewDesc("meshd_filter_dropped_packets_total", "Packets the packet filter dropped, by direction and reason.", []string{"direction", "reason"}, nil)
	mFilterFlows    = prometheus.NewDesc("meshd_filter_flows", "Flows in the packet filter's flow table.", nil, nil)
	mFilterRules    = prometheus.NewDesc("meshd_filter_rules", "Compiled packet filter rules in force.", nil, nil)

	mPeers           = prometheus.NewDesc("meshd_peers", "Peers in the network map.", nil, nil)
	mPeersConfigured = prometheus.NewDesc("meshd_peers_configured", "Peers configured in WireGuard now (lazy configuration: peers with recent traffic).", nil, nil)
	mState           = prometheus.NewDesc("meshd_node_state", "1 for the node's current state (as meshd status's backend_state), 0 for the others.", []string{"state"}, nil)
	mHealth          = prometheus.NewDesc("meshd_health_warning", "1 while the health warning is raised (docs/health.md), else 0.", []string{"warning"}, nil)
	mFlowWritten     = prometheus.NewDesc("meshd_flowlog_records_written_total", "Flow log records written to the sink (--flow-log; absent without it).", nil, nil)
	mFlowDropped     = prometheus.NewDesc("meshd_flowlog_records_dropped_total", "Flow log records dropped because the sink did not keep up.", nil, nil)
	mFlowOverflow    = prometheus.NewDesc("meshd_flowlog_overflow_packets_total", "Packets the flow log could not count because its flow table was full.", nil, nil)
	mFlowSinkErrors  = prometheus.NewDesc("meshd_flowlog_sink_errors_total", "Writes to the flow log's sink that failed.", nil, nil)
	mCoordConnected  = prometheus.NewDesc("meshd_coordinator_connected", "1 while the map stream to the coordinator is up and reports succeed.", nil, nil)
)

var nodeStates = []string{
	localapi.StateNeedsLogin, localapi.StateStopped, localapi.StateStarting, localapi.StateRunning,
	localapi.StateNeedsApproval, localapi.StateExpired,
}

// metricsCollector is the agent's prometheus.Collector.
type metricsCollector struct {
	a *Agent
	// perPeer adds the per-peer series. The listener peers can reach
	// serves totals only: a peer scraping this node must not learn which
	// other peers it talks to and how much.
	perPeer  bool
	maxPeers int
}

func (c *metricsCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		mTxBytes, mRxBytes, mTxPackets, mRxPackets, mPathChg, mHandshakes, mBatches, mSlowSends,
		mFilterAccepted, mFilterDropped, mFilterFlows, mFilterRules,
		mPeers, mPeersConfigured, mState, mHealth, mCoordConnected,
	} {
		ch <- d
	}
	if c.perPeer {
		for _, d := range []*prometheus.Desc{mPeerTxBytes, mPeerRxBytes, mPeerTxPackets, mPeerRxPackets, mPeerPathChg, mPeerOmitted,
			mFlowWritten, mFlowDropped, mFlowOverflow, mFlowSinkErrors} {
			ch <- d
		}
	}
}

func (c *metricsCollector) Collect(ch chan<- prometheus.Metric) {
	a := c.a
	st, err := a.Status(context.Background())
	if err != nil {
		a.log.Warn("metrics: status", "err", err)
		return
	}
	for _, s := range nodeStates {
		ch <- gauge(mState, b2f(s == st.BackendState), s)
	}
	raised := map[string]bool{}
	for _, w := range st.Health {
		raised[w.Code] = true
	}
	for _, code := range localapi.HealthCodes {
		ch <- gauge(mHealth, b2f(raised[code]), code)
	}
	ch <- gauge(mCoordConnected, b2f(st.Self != nil && st.Self.Online))
	ch <- gauge(mPeers, float64(len(st.Peers)))
	// The flow log's counters only on the full endpoint: how many flows a
	// node logs is no business of a peer scraping its totals.
	if fs, ok := a.FlowLogStats(); ok && c.perPeer {
		ch <- counter(mFlowWritten, fs.Written)
		ch <- counter(mFlowDropped, fs.Dropped)
		ch <- counter(mFlowOverflow, fs.Overflow)
		ch <- counter(mFlowSinkErrors, fs.SinkErrors)
	}

	a.mu.Lock()
	f, eng := a.pf.f, a.eng
	names := make(map[netmap.NodePublic]string, len(st.Peers))
	if a.nm != nil {
		for _, n := range a.nm.Peers {
			names[n.NodeKey] = n.Hostname
		}
	}
	a.mu.Unlock()

	for _, d := range []filter.Direction{filter.In, filter.Out} {
		ch <- counter(mFilterAccepted, f.Accepted(d), d.String())
		for _, v := range filter.Verdicts() {
			ch <- counter(mFilterDropped, f.Dropped(d, v), d.String(), v.String())
		}
	}
	if st.Filter != nil {
		ch <- gauge(mFilterFlows, float64(st.Filter.Flows))
		ch <- gauge(mFilterRules, float64(st.Filter.Rules))
	}

	var peers []magicbind.PeerCounters
	configured := 0
	if eng != nil {
		eng.bind.Counters(func(pc magicbind.PeerCounters) { peers = append(peers, pc) })
		configured = eng.configuredPeers()
	}
	ch <- gauge(mPeersConfigured, float64(configured))
	var tot magicbind.PeerCounters
	for _, p := range peers {
		for i := range p.TxBytes {
			tot.TxBytes[i] += p.TxBytes[i]
			tot.RxBytes[i] += p.RxBytes[i]
			tot.TxPackets[i] += p.TxPackets[i]
			tot.RxPackets[i] += p.RxPackets[i]
		}
		tot.PathChanges += p.PathChanges
		tot.HandshakesTx += p.HandshakesTx
	}
	for i, path := range magicbind.PathNames {
		ch <- counter(mTxBytes, tot.TxBytes[i], path)
		ch <- counter(mRxBytes, tot.RxBytes[i], path)
		ch <- counter(mTxPackets, tot.TxPackets[i], path)
		ch <- counter(mRxPackets, tot.RxPackets[i], path)
	}
	ch <- counter(mPathChg, tot.PathChanges)
	ch <- counter(mHandshakes, tot.HandshakesTx)
	if eng != nil {
		is := eng.dev.InlineStats()
		ch <- counter(mBatches, is.OutInline, "out", "inline")
		ch <- counter(mBatches, is.OutPipeline, "out", "pipeline")
		ch <- counter(mBatches, is.InInline, "in", "inline")
		ch <- counter(mBatches, is.InPipeline, "in", "pipeline")
		ch <- counter(mSlowSends, is.SlowSends)
	}
	if !c.perPeer {
		return
	}
	c.collectPeers(ch, peers, names)
}

// collectPeers emits the per-peer series of the busiest peers with
// traffic, at most c.maxPeers of them, labelled by hostname (never by key
// or endpoint).
func (c *metricsCollector) collectPeers(ch chan<- prometheus.Metric, peers []magicbind.PeerCounters, names map[netmap.NodePublic]string) {
	peers = slices.DeleteFunc(peers, func(p magicbind.PeerCounters) bool {
		_, inMap := names[p.Key]
		return !inMap || total(p) == 0
	})
	slices.SortFunc(peers, func(x, y magicbind.PeerCounters) int {
		if c := cmp.Compare(total(y), total(x)); c != 0 {
			return c
		}
		return cmp.Compare(names[x.Key], names[y.Key])
	})
	omitted := max(0, len(peers)-c.maxPeers)
	peers = peers[:len(peers)-omitted]
	ch <- gauge(mPeerOmitted, float64(omitted))
	for _, p := range peers {
		name := names[p.Key]
		for i, path := range magicbind.PathNames {
			ch <- counter(mPeerTxBytes, p.TxBytes[i], name, path)
			ch <- counter(mPeerRxBytes, p.RxBytes[i], name, path)
			ch <- counter(mPeerTxPackets, p.TxPackets[i], name, path)
			ch <- counter(mPeerRxPackets, p.RxPackets[i], name, path)
		}
		ch <- counter(mPeerPathChg, p.PathChanges, name)
	}
}

func total(p magicbind.PeerCounters) uint64 {
	return p.TxBytes[0] + p.TxBytes[1] + p.RxBytes[0] + p.RxBytes[1]
}

func gauge(d *prometheus.Desc, v float64, labels ...string) prometheus.Metric {
	return prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
}

func counter(d *prometheus.Desc, v uint64, labels ...string) prometheus.Metric {
	return prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// agentMetrics are the agent's two registries: everything for local
// scrapers, totals only for peers.
type agentMetrics struct {
	full, peers http.Handler
}

func newAgentMetrics(a *Agent) *agentMetrics {
	full := prometheus.NewRegistry()
	full.MustRegister(&metricsCollector{a: a, perPeer: true, maxPeers: DefaultMaxPeerSeries},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	peers := prometheus.NewRegistry()
	peers.MustRegister(&metricsCollector{a: a})
	opts := promhttp.HandlerOpts{Timeout: 10 * time.Second, MaxRequestsInFlight: 4}
	return &agentMetrics{
		full:  promhttp.HandlerFor(full, opts),
		peers: promhttp.HandlerFor(peers, opts),
	}
}

// MetricsHandler serves every metric of the node in the Prometheus text
// format, per-peer series included: for `--metrics-listen`, the local API
// and host programs on the resolver address.
func (a *Agent) MetricsHandler() http.Handler { return a.metrics.full }
