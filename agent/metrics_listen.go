package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"
)

// The daemon's metrics on the tailnet (docs/metrics.md):
//
//   - http://100.100.100.100/metrics (and [fd5e:5a1e:d::53]:80), always
//     while the data plane is up, for programs of this host (a node
//     exporter, a sidecar container in the pod's network namespace). It
//     is served like MagicDNS: peers never reach it, since the filter
//     drops their packets to a resolver address as not_local and the
//     handler refuses sources that are not this host's (dnsAccept), which
//     also turns away a LAN neighbour routing 100.100.100.100 here. All
//     series, per-peer ones included: a local user learns nothing
//     MagicDNS does not already answer (peer names) plus traffic volumes.
//   - http://<tailnet address>:PORT/metrics with `--metrics-tailnet-port
//     PORT` (off by default), for a Prometheus on another node. Bound to
//     the TUN, so only packets the filter let in arrive: the policy
//     decides who may scrape, as for any port. Totals only, no per-peer
//     series: a scraper must not learn which peers this node talks to.
//     No keys or endpoints are in any series.

const metricsPath = "/metrics"

// metricsServer is an engine's metrics listeners.
type metricsServer struct {
	srvs []*http.Server
	wg   sync.WaitGroup
}

// startMetrics serves the agent's metrics on the resolver addresses and,
// if asked, on the node's tailnet addresses. A failure costs that listener
// only, never the data plane.
func (e *engine) startMetrics() error {
	m := e.cfg.metrics
	e.metSrv = &metricsServer{}
	var errs []error
	local := onlyFrom(dnsAccept(e.cfg.addrs), m.full)
	for _, a := range resolverAddrs {
		ap := netip.AddrPortFrom(a, 80)
		ln, err := e.listenResolverTCP(ap)
		if err != nil {
			errs = append(errs, fmt.Errorf("metrics on %v: %w", ap, err))
			continue
		}
		e.metSrv.serve(ln, local)
	}
	if p := e.cfg.metricsPort; p != 0 {
		for _, a := range e.cfg.addrs {
			ln, err := e.listen(netip.AddrPortFrom(a.Addr(), p))
			if err != nil {
				errs = append(errs, fmt.Errorf("metrics on %v port %d: %w", a.Addr(), p, err))
				continue
			}
			e.metSrv.serve(ln, onlyPath(m.peers))
			e.cfg.log.Info("metrics listening for tailnet scrapers", "addr", ln.Addr().String())
		}
	}
	return errors.Join(errs...)
}

func (s *metricsServer) serve(ln net.Listener, h http.Handler) {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 10 * time.Second,
		WriteTimeout: 30 * time.Second, IdleTimeout: 60 * time.Second, MaxHeaderBytes: 8 << 10}
	s.srvs = append(s.srvs, srv)
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		srv.Serve(ln) // returns at Close
	}()
}

func (e *engine) stopMetrics() {
	if e.metSrv == nil {
		return
	}
	for _, s := range e.metSrv.srvs {
		s.Close()
	}
	e.metSrv.wg.Wait()
}

// listenResolverTCP opens a TCP listener on a resolver address (the
// address is on the TUN already: startDNS added it).
func (e *engine) listenResolverTCP(ap netip.AddrPort) (net.Listener, error) {
	if e.tnet != nil {
		return e.tnet.ListenTCPAddrPort(ap)
	}
	var lc net.ListenConfig
	return lc.Listen(context.Background(), "tcp", ap.String())
}

// onlyFrom serves h at metricsPath to sources accept allows, 403 to the
// rest.
func onlyFrom(accept func(netip.Addr) bool, h http.Handler) http.Handler {
	return onlyPath(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ap, err := netip.ParseAddrPort(r.RemoteAddr)
		if err != nil || !accept(ap.Addr().Unmap()) {
			http.Error(w, "metrics are served to this host's programs only", http.StatusForbidden)
			return
		}
		h.ServeHTTP(w, r)
	}))
}

// onlyPath serves h at GET metricsPath and 404 elsewhere.
func onlyPath(h http.Handler) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET "+metricsPath, h)
	return mux
}
