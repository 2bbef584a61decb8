package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"

	"meshd.dev/meshd/agent/whois"
)

// HTTPSService is an HTTPS service of the daemon itself on the node's
// tailnet addresses (the Kubernetes API proxy, `meshd k8s-proxy`), served
// with the node's certificate from the tailnet CA on the same listeners
// as `meshd serve`: bound to the TUN in kernel mode, in the netstack in
// userspace mode.
type HTTPSService struct {
	// Name says what holds the port, for logs and serve's refusals.
	Name string
	Port uint16
	// NewHandler makes the handler once, given the agent's whois, which
	// the handler must use to decide who is calling (r.RemoteAddr).
	NewHandler func(whoIs func(netip.Addr) (*whois.Response, bool)) http.Handler
}

// services runs the HTTPSServices while the data plane is up.
type services struct {
	list     []HTTPSService
	handlers []http.Handler
	getCert  func(*tls.ClientHelloInfo) (*tls.Certificate, error)
	log      *slog.Logger
	stop     func()
}

// attach starts every service on addrs; a service that cannot listen is
// logged and the others run.
func (s *services) attach(listen func(netip.AddrPort) (net.Listener, error), addrs []netip.Addr) {
	s.detach()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var srvs []*http.Server
	for i, svc := range s.list {
		srv := &http.Server{
			Handler:           s.handlers[i],
			TLSConfig:         &tls.Config{GetCertificate: s.getCert, MinVersion: tls.VersionTLS12},
			ReadHeaderTimeout: 10 * time.Second,
			IdleTimeout:       2 * time.Minute,
			ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
			BaseContext:       func(net.Listener) context.Context { return ctx },
		}
		srvs = append(srvs, srv)
		for _, a := range addrs {
			ap := netip.AddrPortFrom(a, svc.Port)
			ln, err := listen(ap)
			if err != nil {
				s.log.Error("service not started on an address", "service", svc.Name, "addr", ap, "err", err)
				continue
			}
			s.log.Info("serving", "service", svc.Name, "addr", ap)
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := srv.ServeTLS(ln, "", ""); !errors.Is(err, http.ErrServerClosed) {
					s.log.Warn("service listener failed", "service", svc.Name, "addr", ap, "err", err)
				}
			}()
		}
	}
	s.stop = func() {
		cancel()
		for _, srv := range srvs {
			srv.Close()
		}
		wg.Wait()
	}
}

// detach stops every service and closes its connections.
func (s *services) detach() {
	if s.stop != nil {
		s.stop()
		s.stop = nil
	}
}
