// Package connlimit bounds what a network client can hold on one of meshd's
// servers (coordinator, relay, local API): connections per source and in
// total, how long a connection may stay unauthenticated, and how long a
// request's header and body may take to arrive.
//
// A Listener wraps the server's net.Listener: a connection over either cap
// is closed as soon as it is accepted, and one that is not authenticated
// within HandshakeTimeout of being accepted is closed, whatever it is
// doing (TLS handshake, HTTP/2 preface, idle keep-alive, public requests).
// The server lifts that deadline with Authenticate once a request proves an
// identity, or once the connection is upgraded and its own protocol
// authenticates it (DERP). Limits.Server builds the http.Server that goes
// with it: header and idle timeouts, the connection context Authenticate
// needs, and LimitBody.
package connlimit

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// Defaults for Limits fields left zero.
const (
	// DefaultPerSource allows a NATed site of about 500 nodes, each with a
	// control connection and one to the coordinator's embedded relay, to
	// share one address.
	DefaultPerSource = 1024
	// DefaultTotal stays well below common open-file limits (Go raises the
	// soft limit to the hard one, 524288 under systemd) while leaving room
	// for two connections per node of a 10,000-node tailnet.
	DefaultTotal = 32768
	// DefaultHandshakeTimeout matches the DERP handshake timeout and the
	// header timeout: long enough for a TLS handshake over a poor link.
	DefaultHandshakeTimeout = 10 * time.Second
	DefaultHeaderTimeout    = 10 * time.Second
	// DefaultBodyTimeout lets a 4 MiB policy upload through at ~1.2 Mbit/s;
	// every other request body is a few KiB.
	DefaultBodyTimeout = 30 * time.Second
	DefaultIdleTimeout = 2 * time.Minute
)

// refusalLogInterval is the least time between two log lines about refused
// connections of one listener, so a flood costs one line per interval.
const refusalLogInterval = 10 * time.Second

// Limits configures a Listener and the http.Server in front of it. Zero
// fields take the package defaults.
type Limits struct {
	// PerSource caps the concurrent connections of one source.
	PerSource int
	// Total caps the concurrent connections of the listener.
	Total int
	// HandshakeTimeout is how long after accept a connection may stay
	// unauthenticated before it is closed.
	HandshakeTimeout time.Duration
	// AuthenticatedAtAccept says the wrapped listener itself only returns
	// authenticated connections (the local API's SO_PEERCRED check), so
	// no handshake deadline applies.
	AuthenticatedAtAccept bool
	// HeaderTimeout bounds the request line and headers (and, through
	// net/http, the TLS handshake).
	HeaderTimeout time.Duration
	// BodyTimeout bounds the whole request body; see LimitBody.
	BodyTimeout time.Duration
	// IdleTimeout closes keep-alive connections without requests.
	IdleTimeout time.Duration
	// Source names what a connection counts against for PerSource. Nil
	// means its remote IP address, with IPv6 addresses grouped by /64
	// (what one host or subscriber typically gets). An error refuses the
	// connection.
	Source func(net.Conn) (string, error)
	// Logger receives refusals (rate-limited, warning) and handshake
	// timeouts (debug); nil discards them.
	Logger *slog.Logger
	// Name identifies the server in log lines ("coordinator", "relay").
	Name string
	// Hint is appended to refusal log lines: what an operator changes to
	// raise the caps (for example the flags that set them).
	Hint string
}

// WithDefaults returns l with zero fields set to the package defaults.
func (l Limits) WithDefaults() Limits {
	def := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	defDur := func(v *time.Duration, d time.Duration) {
		if *v == 0 {
			*v = d
		}
	}
	def(&l.PerSource, DefaultPerSource)
	def(&l.Total, DefaultTotal)
	defDur(&l.HandshakeTimeout, DefaultHandshakeTimeout)
	defDur(&l.HeaderTimeout, DefaultHeaderTimeout)
	defDur(&l.BodyTimeout, DefaultBodyTimeout)
	defDur(&l.IdleTimeout, DefaultIdleTimeout)
	if l.Source == nil {
		l.Source = RemoteIP
	}
	if l.Logger == nil {
		l.Logger = slog.New(slog.DiscardHandler)
	}
	return l
}

// Validate reports limits no server can run with: negative caps or
// timeouts.
func (l Limits) Validate() error {
	if l.PerSource < 0 || l.Total < 0 {
		return fmt.Errorf("connection limits must be positive (per source %d, total %d)", l.PerSource, l.Total)
	}
	if l.HandshakeTimeout < 0 || l.HeaderTimeout < 0 || l.BodyTimeout < 0 || l.IdleTimeout < 0 {
		return errors.New("connection timeouts must be positive")
	}
	return nil
}

// RemoteIP is the default Limits.Source: the remote IP address, IPv4 (and
// IPv4-mapped IPv6) as the address, IPv6 as its /64.
func RemoteIP(c net.Conn) (string, error) {
	ap, err := netip.ParseAddrPort(c.RemoteAddr().String())
	if err != nil {
		return "", fmt.Errorf("connection source %q: %w", c.RemoteAddr(), err)
	}
	a := ap.Addr().Unmap()
	if a.Is4() {
		return a.String(), nil
	}
	return netip.PrefixFrom(a.WithZone(""), 64).Masked().String(), nil
}

// Server returns an http.Server for h with l's header, body and idle
// bounds and the connection context Authenticate needs. Callers add TLS
// and an error log, and serve it on l.Listener(ln).
func (l Limits) Server(h http.Handler) *http.Server {
	l = l.WithDefaults()
	return &http.Server{
		Handler:           LimitBody(h, l.BodyTimeout),
		ReadHeaderTimeout: l.HeaderTimeout,
		IdleTimeout:       l.IdleTimeout,
		ConnContext:       connContext,
	}
}

// Stats are a Listener's counters.
type Stats struct {
	Open              int    // connections open now
	Refused           uint64 // closed at accept: over a cap, or no source
	HandshakeTimeouts uint64 // closed for staying unauthenticated too long
}

// Listener enforces Limits on the connections of a net.Listener.
type Listener struct {
	inner net.Listener
	lim   Limits

	mu       sync.Mutex
	open     int
	bySource map[string]int
	// Refusals not logged yet, and when the last line was written.
	unlogged int
	lastLog  time.Time

	refused, timeouts atomic.Uint64
}

// Listener wraps ln.
func (l Limits) Listener(ln net.Listener) *Listener {
	return &Listener{inner: ln, lim: l.WithDefaults(), bySource: make(map[string]int)}
}

// Accept returns the next connection within the caps, closing the ones
// over them.
func (l *Listener) Accept() (net.Conn, error) {
	for {
		c, err := l.inner.Accept()
		if err != nil {
			return nil, err
		}
		src, err := l.lim.Source(c)
		if err != nil {
			c.Close()
			l.refuse("", "no source", err.Error())
			continue
		}
		if why := l.admit(src); why != "" {
			c.Close()
			l.refuse(src, why, "")
			continue
		}
		return l.wrap(c, src), nil
	}
}

// Close closes the wrapped listener; open connections stay open.
func (l *Listener) Close() error { return l.inner.Close() }

// Addr is the wrapped listener's address.
func (l *Listener) Addr() net.Addr { return l.inner.Addr() }

// Stats returns the listener's counters.
func (l *Listener) Stats() Stats {
	l.mu.Lock()
	open := l.open
	l.mu.Unlock()
	return Stats{Open: open, Refused: l.refused.Load(), HandshakeTimeouts: l.timeouts.Load()}
}

// admit counts a connection from src, or says which cap it is over.
func (l *Listener) admit(src string) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case l.open >= l.lim.Total:
		return fmt.Sprintf("%d connections open, the total limit", l.open)
	case l.bySource[src] >= l.lim.PerSource:
		return fmt.Sprintf("%d connections open from this source, the per-source limit", l.bySource[src])
	}
	l.open++
	l.bySource[src]++
	return ""
}

func (l *Listener) release(src string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.open--
	if n := l.bySource[src] - 1; n > 0 {
		l.bySource[src] = n
	} else {
		delete(l.bySource, src)
	}
}

func (l *Listener) refuse(src, why, detail string) {
	l.refused.Add(1)
	l.mu.Lock()
	l.unlogged++
	now := time.Now()
	if now.Sub(l.lastLog) < refusalLogInterval {
		l.mu.Unlock()
		return
	}
	n := l.unlogged
	l.unlogged, l.lastLog = 0, now
	l.mu.Unlock()
	args := []any{"server", l.lim.Name, "source", src, "reason", why, "refused", n}
	if detail != "" {
		args = append(args, "err", detail)
	}
	if l.lim.Hint != "" {
		args = append(args, "hint", l.lim.Hint)
	}
	l.lim.Logger.Warn("connection refused", args...)
}

// Connection authentication states.
const (
	stateHandshaking int32 = iota
	stateAuthenticated
	stateExpired
)

func (l *Listener) wrap(c net.Conn, src string) *Conn {
	lc := &Conn{Conn: c, l: l, src: src}
	if l.lim.AuthenticatedAtAccept {
		lc.state.Store(stateAuthenticated)
		return lc
	}
	lc.timer = time.AfterFunc(l.lim.HandshakeTimeout, lc.expire)
	return lc
}

// Conn is a connection accepted by a Listener.
type Conn struct {
	net.Conn
	l         *Listener
	src       string
	timer     *time.Timer
	state     atomic.Int32
	closeOnce sync.Once
}

// Authenticate lifts the handshake deadline. It reports false if the
// deadline had already closed the connection.
func (c *Conn) Authenticate() bool {
	if c.state.CompareAndSwap(stateHandshaking, stateAuthenticated) {
		c.timer.Stop()
		return true
	}
	return c.state.Load() == stateAuthenticated
}

func (c *Conn) expire() {
	if !c.state.CompareAndSwap(stateHandshaking, stateExpired) {
		return
	}
	c.l.timeouts.Add(1)
	c.l.lim.Logger.Debug("connection closed: not authenticated within the handshake timeout",
		"server", c.l.lim.Name, "remote", c.RemoteAddr(), "timeout", c.l.lim.HandshakeTimeout)
	// The timer has fired, so there is nothing to stop; and c.timer must
	// not be read here: the timer may fire before wrap's assignment of
	// it is visible to this goroutine.
	c.close(false)
}

// Close closes the connection and frees its place under the caps.
func (c *Conn) Close() error { return c.close(true) }

func (c *Conn) close(stopTimer bool) error {
	// The place is released before the connection closes so that whoever
	// sees the close (a reader, the peer) also sees Stats without it.
	c.closeOnce.Do(func() {
		if stopTimer && c.timer != nil {
			c.timer.Stop()
		}
		c.l.release(c.src)
	})
	return c.Conn.Close()
}

// CloseWrite shuts down the writing side, which net/http uses to close a
// connection gracefully, when the wrapped connection supports it.
func (c *Conn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.ErrUnsupported
}

// NetConn returns the wrapped connection, as tls.Conn.NetConn does.
func (c *Conn) NetConn() net.Conn { return c.Conn }

type connKey struct{}

// connContext is the http.Server ConnContext that lets Authenticate find a
// request's connection, under TLS too.
func connContext(ctx context.Context, c net.Conn) context.Context {
	if lc := unwrap(c); lc != nil {
		return context.WithValue(ctx, connKey{}, lc)
	}
	return ctx
}

func unwrap(c net.Conn) *Conn {
	for range 8 { // a bound instead of trusting wrappers to terminate
		switch x := c.(type) {
		case *Conn:
			return x
		case interface{ NetConn() net.Conn }:
			c = x.NetConn()
		default:
			return nil
		}
	}
	return nil
}

// Authenticate lifts the handshake deadline of the connection carrying the
// request whose context is ctx: call it once the request proved an
// identity. Requests on connections that did not come from a Listener
// (tests, other servers) are unaffected. It reports whether the connection
// is authenticated now.
func Authenticate(ctx context.Context) bool {
	if lc, ok := ctx.Value(connKey{}).(*Conn); ok {
		return lc.Authenticate()
	}
	return false
}

// LimitBody returns a handler that gives each request body at most d to
// arrive, counted from when the handler is called (the headers are in).
// The deadline stays in force when the handler returns without reading the
// body to its end, so net/http's drain of the rest (it reads up to 256 KiB
// to reuse an HTTP/1.1 connection, before writing the response) is bounded
// too; and it is lifted once the body has been read to its end, so
// long-lived responses such as map streams are not cut, and HTTP/1.1's
// background read that notices a client going away keeps working.
func LimitBody(h http.Handler, d time.Duration) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ContentLength == 0 {
			// net/http (both versions) refuses body bytes beyond a
			// declared length, and sets NoBody or an empty body here.
			h.ServeHTTP(w, r)
			return
		}
		rc := http.NewResponseController(w)
		if err := rc.SetReadDeadline(time.Now().Add(d)); err != nil {
			// Every net/http server connection supports read deadlines;
			// only a test recorder does not, and it has no connection.
			h.ServeHTTP(w, r)
			return
		}
		r.Body = &deadlineBody{ReadCloser: r.Body, rc: rc}
		h.ServeHTTP(w, r)
	})
}

// deadlineBody lifts the read deadline once the body was read to its end.
// (HTTP/1.1's server clears it too when it starts its background read, and
// HTTP/2's ignores a deadline after the end; lifting it here keeps the
// promise without leaning on either.)
type deadlineBody struct {
	io.ReadCloser
	rc   *http.ResponseController
	done bool
}

func (b *deadlineBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF && !b.done {
		b.done = true
		b.rc.SetReadDeadline(time.Time{})
	}
	return n, err
}
