package serve

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"net/url"
	"sync"
	"syscall"
	"time"

	"golang.org/x/time/rate"

	"meshd.dev/meshd/agent/proxy"
	"meshd.dev/meshd/agent/whois"
)

// errNotLoopbackDial is what the backend dialer returns for an address
// outside loopback: a name like localhost resolves through /etc/hosts, and
// whatever it says, serve connects to nothing but this machine.
var errNotLoopbackDial = errors.New("serve: refusing to connect to a non-loopback address")

// loopbackDialer connects to loopback addresses only. The check runs on
// the resolved address, just before connect(2).
func loopbackDialer() *net.Dialer {
	return &net.Dialer{
		Timeout: 10 * time.Second,
		Control: func(_, address string, _ syscall.RawConn) error {
			ap, err := netip.ParseAddrPort(address)
			if err != nil || !ap.Addr().Unmap().IsLoopback() {
				return fmt.Errorf("%w: %s", errNotLoopbackDial, address)
			}
			return nil
		},
	}
}

// newTransport is the HTTP client side of every HTTP entry: loopback only,
// never through a proxy from the daemon's environment.
func newTransport() *http.Transport {
	return &http.Transport{
		Proxy:                 nil,
		DialContext:           loopbackDialer().DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          64,
		MaxIdleConnsPerHost:   16,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: time.Second,
	}
}

// httpHandler is an HTTP or HTTPS entry's reverse proxy.
func httpHandler(e Entry, target *url.URL, whoIs func(netip.Addr) (*whois.Response, bool), tr http.RoundTripper, log *slog.Logger) http.Handler {
	failures := rate.Sometimes{Interval: 10 * time.Second}
	rp := &httputil.ReverseProxy{
		Transport: tr,
		// Rewrite, not Director: ReverseProxy removes hop-by-hop headers
		// (and any header a Connection header names) and the incoming
		// Forwarded/X-Forwarded-* before calling it, so nothing a caller
		// sends can remove or shadow what is set here.
		Rewrite: func(pr *httputil.ProxyRequest) {
			who := pr.In.Context().Value(callerKey{}).(*whois.Response)
			pr.SetURL(target)
			// The Host the caller asked for (the node's name), as
			// Tailscale does: applications build their links from it.
			pr.Out.Host = pr.In.Host
			pr.SetXForwarded()
			stripIdentity(pr.Out.Header)
			stripIdentity(pr.Out.Trailer)
			setIdentity(pr.Out.Header, who)
		},
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			if r.Context().Err() == nil {
				failures.Do(func() {
					log.Warn("serve: the local service did not answer (logged at most every 10s)", "entry", e.String(), "err", err)
				})
			}
			http.Error(w, "502 bad gateway: meshd serve could not reach the service behind this port", http.StatusBadGateway)
		},
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		who, ip, err := whois.Peer(whoIs, r.RemoteAddr)
		if err != nil {
			log.Debug("serve: refused a caller", "entry", e.String(), "err", err)
			http.Error(w, fmt.Sprintf("403 forbidden: meshd serve answers tailnet peers only, and %v is none", ip), http.StatusForbidden)
			return
		}
		rp.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), callerKey{}, who)))
	})
}

// callerKey carries the caller's whois answer from the handler, which
// looked it up once, to Rewrite.
type callerKey struct{}

// serveTCP relays each connection accepted on ln to e's target until ctx
// ends, closing connections that do not come from a tailnet peer.
func serveTCP(ctx context.Context, ln net.Listener, e Entry, whoIs func(netip.Addr) (*whois.Response, bool), log *slog.Logger) {
	var wg sync.WaitGroup
	defer wg.Wait()
	d := loopbackDialer()
	failures := rate.Sometimes{Interval: 10 * time.Second}
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() == nil {
				log.Warn("serve: listener failed", "entry", e.String(), "addr", ln.Addr().String(), "err", err)
			}
			return
		}
		if _, _, err := whois.Peer(whoIs, c.RemoteAddr().String()); err != nil {
			log.Debug("serve: refused a caller", "entry", e.String(), "err", err)
			c.Close()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			stop := context.AfterFunc(ctx, func() { c.Close() })
			defer stop()
			out, err := d.DialContext(ctx, "tcp", e.Target)
			if err != nil {
				failures.Do(func() {
					log.Warn("serve: the local service did not answer (logged at most every 10s)", "entry", e.String(), "err", err)
				})
				return
			}
			defer out.Close()
			stopOut := context.AfterFunc(ctx, func() { out.Close() })
			defer stopOut()
			proxy.Relay(c, c, out)
		}()
	}
}
