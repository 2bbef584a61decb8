// Package serve exposes local services to the tailnet on the node's
// tailnet addresses (`meshd serve`): HTTP and HTTPS reverse proxies that
// tell the service who is calling in request headers (from whois), and
// plain TCP relays.
//
// A Server holds the configuration (one Entry per tailnet port) and, while
// the data plane is up, one listener per entry and tailnet address, made
// by the ListenFunc the agent attaches: a socket bound to the address on
// the TUN interface in kernel mode, the netstack's listener in userspace
// mode. It never listens anywhere else, and it serves only callers whose
// address whois knows as a peer.
package serve

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"sync"
	"time"

	"meshd.dev/meshd/agent/whois"
)

// ErrNoCertificate is why an HTTPS entry is refused while the node has no
// way to get a certificate for its name.
var ErrNoCertificate = errors.New("HTTPS needs a certificate from the tailnet CA")

// ErrUnchanged reports an edit that would change nothing (serving exactly
// what is served, removing what is not, resetting an empty config).
var ErrUnchanged = errors.New("nothing to change")

// ListenFunc opens a TCP listener on one of the node's tailnet addresses.
type ListenFunc func(netip.AddrPort) (net.Listener, error)

// Options configure a Server.
type Options struct {
	// WhoIs says who holds a tailnet address (agent.Agent.WhoIs). It must
	// be cheap: it runs for every request and connection.
	WhoIs func(netip.Addr) (*whois.Response, bool)
	// GetCertificate supplies HTTPS entries' certificates (for the node's
	// DNS name); nil refuses HTTPS entries with ErrNoCertificate.
	GetCertificate func(*tls.ClientHelloInfo) (*tls.Certificate, error)
	// HTTPSReady reports why certificates cannot be had now (no tailnet
	// CA in the map: an older coordinator), so an HTTPS entry is refused
	// when it is added rather than failing every handshake; nil means
	// ready.
	HTTPSReady func() error
	// Reserved names tailnet ports something else of the agent listens on
	// (--forward), mapped to what holds them, so serve refuses them with
	// that reason instead of a bind error.
	Reserved map[uint16]string
	Logger   *slog.Logger
}

// Server runs the serve configuration. Its methods are safe for
// concurrent use; none waits for a request in flight to finish.
type Server struct {
	opts Options
	tr   *http.Transport

	mu      sync.Mutex
	cfg     Config
	listen  ListenFunc // nil while detached (the data plane is down)
	addrs   []netip.Addr
	running map[uint16]*runner
	// errs are the entries that failed to start at the last Attach.
	errs map[uint16]error
}

// New returns a server for cfg, which must be valid (see Config.Validate);
// it listens nowhere until Attach.
func New(opts Options, cfg Config) *Server {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &Server{opts: opts, tr: newTransport(), cfg: cfg, running: map[uint16]*runner{}, errs: map[uint16]error{}}
}

// Config returns the configuration in force.
func (s *Server) Config() Config {
	s.mu.Lock()
	defer s.mu.Unlock()
	return Config{Entries: slices.Clone(s.cfg.Entries)}
}

// Attach starts every entry's listeners on addrs through listen: the data
// plane came up. An entry that cannot listen is logged and reported in
// Status; the others start. Attaching again first stops what runs.
func (s *Server) Attach(listen ListenFunc, addrs []netip.Addr) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.detachLocked()
	s.listen, s.addrs = listen, slices.Clone(addrs)
	for _, e := range s.cfg.Entries {
		r, err := s.start(e)
		if err != nil {
			s.opts.Logger.Error("serve: entry not started", "entry", e.String(), "err", err)
			s.errs[e.Port] = err
			continue
		}
		s.running[e.Port] = r
		s.opts.Logger.Info("serving", "entry", e.String(), "addrs", r.addrs)
	}
}

// Detach stops every listener and closes their connections: the data
// plane is going down. The configuration stays.
func (s *Server) Detach() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.detachLocked()
}

func (s *Server) detachLocked() {
	for port, r := range s.running {
		r.stop()
		delete(s.running, port)
	}
	clear(s.errs)
	s.listen, s.addrs = nil, nil
	s.tr.CloseIdleConnections()
}

// Add serves e (made by NewEntry) in addition to what is served. It
// starts e's listeners when the data plane is up, then persists the new
// configuration with save; if either fails, nothing changes. A port that
// is already served is refused with what serves it.
func (s *Server) Add(e Entry, save func(Config) error) error {
	if err := (Config{Entries: []Entry{e}}).Validate(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if old, ok := s.cfg.Find(e.Port); ok {
		if old == e {
			return fmt.Errorf("serve: tailnet port %d already serves %s %s: %w", e.Port, e.Proto, e.Target, ErrUnchanged)
		}
		return fmt.Errorf("serve: tailnet port %d is already served (%s to %s); remove that first: meshd serve --%s %d off",
			e.Port, old.Proto, old.Target, old.Proto, old.Port)
	}
	if what, ok := s.opts.Reserved[e.Port]; ok {
		return fmt.Errorf("serve: tailnet port %d is taken by %s", e.Port, what)
	}
	if e.Proto == HTTPS && s.opts.GetCertificate == nil {
		return fmt.Errorf("serve: --https %d: %w", e.Port, ErrNoCertificate)
	}
	if e.Proto == HTTPS && s.opts.HTTPSReady != nil {
		if err := s.opts.HTTPSReady(); err != nil {
			return fmt.Errorf("serve: --https %d: %w: %v", e.Port, ErrNoCertificate, err)
		}
	}
	var r *runner
	if s.listen != nil {
		var err error
		if r, err = s.start(e); err != nil {
			return err
		}
	}
	next := s.cfg.with(e)
	if err := save(next); err != nil {
		if r != nil {
			r.stop()
		}
		return fmt.Errorf("serve: save the configuration: %w", err)
	}
	s.cfg = next
	if r != nil {
		s.running[e.Port] = r
		s.opts.Logger.Info("serving", "entry", e.String(), "addrs", r.addrs)
	}
	return nil
}

// Remove stops serving port, which must be served with proto. The new
// configuration is saved first, so a failed save changes nothing.
func (s *Server) Remove(proto Proto, port uint16, save func(Config) error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	old, ok := s.cfg.Find(port)
	switch {
	case !ok:
		return fmt.Errorf("serve: tailnet port %d is not served: %w", port, ErrUnchanged)
	case old.Proto != proto:
		return fmt.Errorf("serve: tailnet port %d is served as %s, not %s: meshd serve --%s %d off", port, old.Proto, proto, old.Proto, port)
	}
	next := s.cfg.without(port)
	if err := save(next); err != nil {
		return fmt.Errorf("serve: save the configuration: %w", err)
	}
	s.cfg = next
	if r := s.running[port]; r != nil {
		r.stop()
		delete(s.running, port)
	}
	delete(s.errs, port)
	s.opts.Logger.Info("serve: stopped", "entry", old.String())
	return nil
}

// Reset stops serving everything.
func (s *Server) Reset(save func(Config) error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.cfg.Entries) == 0 {
		return fmt.Errorf("serve: nothing is served: %w", ErrUnchanged)
	}
	if err := save(Config{}); err != nil {
		return fmt.Errorf("serve: save the configuration: %w", err)
	}
	s.cfg = Config{}
	for port, r := range s.running {
		r.stop()
		delete(s.running, port)
	}
	clear(s.errs)
	s.opts.Logger.Info("serve: reset, nothing served")
	return nil
}

// EntryStatus is an entry and whether it is serving.
type EntryStatus struct {
	Entry
	// Listening are the tailnet addresses it accepts on; empty while the
	// data plane is down or when it failed to start.
	Listening []netip.AddrPort `json:"listening"`
	// Error says why the entry is not serving, if it failed to start.
	Error string `json:"error,omitempty"`
}

// Status lists the entries, sorted by port.
func (s *Server) Status() []EntryStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]EntryStatus, 0, len(s.cfg.Entries))
	for _, e := range s.cfg.Entries {
		st := EntryStatus{Entry: e, Listening: []netip.AddrPort{}}
		if r := s.running[e.Port]; r != nil {
			st.Listening = slices.Clone(r.addrs)
		}
		if err := s.errs[e.Port]; err != nil {
			st.Error = err.Error()
		}
		out = append(out, st)
	}
	return out
}

// runner is one entry's listeners and the goroutines serving them.
type runner struct {
	addrs []netip.AddrPort
	stop  func() // closes listeners and connections, waits for the loops
}

// start opens e's listeners on every tailnet address and serves them. It
// listens on all addresses or none. s.mu held, s.listen set.
func (s *Server) start(e Entry) (*runner, error) {
	var lns []net.Listener
	r := &runner{}
	for _, a := range s.addrs {
		ap := netip.AddrPortFrom(a, e.Port)
		ln, err := s.listen(ap)
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			return nil, fmt.Errorf("serve: listen on %v: %w", ap, err)
		}
		lns = append(lns, ln)
		r.addrs = append(r.addrs, ap)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	log := s.opts.Logger
	switch e.Proto {
	case TCP:
		for _, ln := range lns {
			wg.Add(1)
			go func() {
				defer wg.Done()
				stop := context.AfterFunc(ctx, func() { ln.Close() })
				defer stop()
				serveTCP(ctx, ln, e, s.opts.WhoIs, log)
			}()
		}
		r.stop = func() { cancel(); wg.Wait() }
	default:
		target, err := url.Parse(e.Target)
		if err != nil { // NewEntry made it: cannot happen
			cancel()
			for _, l := range lns {
				l.Close()
			}
			return nil, fmt.Errorf("serve: target %q: %w", e.Target, err)
		}
		srv := &http.Server{
			Handler:           httpHandler(e, target, s.opts.WhoIs, s.tr, log),
			ReadHeaderTimeout: 10 * time.Second,
			IdleTimeout:       2 * time.Minute,
			ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
			BaseContext:       func(net.Listener) context.Context { return ctx },
		}
		if e.Proto == HTTPS {
			srv.TLSConfig = &tls.Config{GetCertificate: s.opts.GetCertificate, MinVersion: tls.VersionTLS12}
		}
		for _, ln := range lns {
			wg.Add(1)
			go func() {
				defer wg.Done()
				var err error
				if e.Proto == HTTPS {
					err = srv.ServeTLS(ln, "", "")
				} else {
					err = srv.Serve(ln)
				}
				if !errors.Is(err, http.ErrServerClosed) {
					log.Warn("serve: listener failed", "entry", e.String(), "addr", ln.Addr().String(), "err", err)
				}
			}()
		}
		r.stop = func() { cancel(); srv.Close(); wg.Wait() }
	}
	return r, nil
}
