package derp

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"testing"
	"time"

	"meshd.dev/meshd/internal/memnet"
	"meshd.dev/meshd/netmap"
)

// wrapListener serves a memnet listener (see internal/memnet: a relay
// served on it can run inside a testing/synctest bubble, where keep-alive
// tickers, idle and write deadlines and the rate limiter's clock follow
// virtual time, so tests check exact deadlines instead of sleeping past
// them) and puts a test's wrapper around the relay's end of the
// connections dialled from a given source address.
type wrapListener struct {
	*memnet.Listener

	mu    sync.Mutex
	next  netip.Addr // the last source address handed out
	wraps map[netip.Addr]func(net.Conn) net.Conn
}

func (l *wrapListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	wrap := l.wraps[c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr()]
	l.mu.Unlock()
	if wrap != nil {
		c = wrap(c)
	}
	return c, nil
}

// dialWrapped returns a ClientOptions.DialContext connecting to l from a
// source address of its own; wrap, if set, stands between the pipe and the
// server's end of it.
func (l *wrapListener) dialWrapped(wrap func(net.Conn) net.Conn) func(ctx context.Context, network, addr string) (net.Conn, error) {
	l.mu.Lock()
	l.next = l.next.Next()
	src := l.next
	if wrap != nil {
		l.wraps[src] = wrap
	}
	l.mu.Unlock()
	return func(ctx context.Context, _, _ string) (net.Conn, error) {
		return l.Dial(ctx, src)
	}
}

// bubbleRelay is a relay served over HTTP on a memnet listener. Create it
// inside synctest.Test; its cleanup closes it there.
type bubbleRelay struct {
	*Server
	ln *wrapListener
	// stop closes the relay and its HTTP server (a relay going away);
	// the test's cleanup calls it too.
	stop func()
}

const bubbleURL = "http://relay.test"

func newBubbleRelay(t *testing.T, opts ServerOptions) *bubbleRelay {
	t.Helper()
	if opts.PrivateKey.IsZero() {
		opts.PrivateKey = netmap.NewNodePrivate()
	}
	s, err := NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	ln := &wrapListener{
		Listener: memnet.Listen(netip.MustParseAddrPort("192.0.2.1:80")),
		next:     netip.MustParseAddr("198.51.100.0"),
		wraps:    map[netip.Addr]func(net.Conn) net.Conn{},
	}
	hs := &http.Server{Handler: s}
	served := make(chan struct{})
	go func() { defer close(served); hs.Serve(ln) }()
	stop := sync.OnceFunc(func() {
		s.Close()
		hs.Close()
		<-served
	})
	t.Cleanup(stop)
	return &bubbleRelay{Server: s, ln: ln, stop: stop}
}

// dial connects a client; a zero NodeKey gets a fresh key. The client is
// closed when the test ends.
func (r *bubbleRelay) dial(t *testing.T, opts ClientOptions) *Client {
	t.Helper()
	return r.dialWrapped(t, opts, nil)
}

func (r *bubbleRelay) dialWrapped(t *testing.T, opts ClientOptions, wrap func(net.Conn) net.Conn) *Client {
	t.Helper()
	if opts.NodeKey.IsZero() {
		opts.NodeKey = netmap.NewNodePrivate()
	}
	opts.DialContext = r.ln.dialWrapped(wrap)
	c, err := Dial(t.Context(), bubbleURL, opts)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// rawDial opens a connection on which the test speaks the protocol by
// hand (see rawConn).
func (r *bubbleRelay) rawDial(t *testing.T) *rawConn {
	t.Helper()
	conn, err := r.ln.dialWrapped(nil)(t.Context(), "tcp", "relay.test:80")
	if err != nil {
		t.Fatal(err)
	}
	return rawHandshake(t, conn)
}

// drain reads c's messages until its connection ends, as a node's receive
// loop would (an unread pipe would stall the relay's writes to c), and
// passes on the packets; the channel closes when the connection ends.
func drain(c *Client) <-chan ReceivedPacket {
	pkts := make(chan ReceivedPacket, 16)
	go func() {
		defer close(pkts)
		for {
			m, err := c.Recv()
			if err != nil {
				return
			}
			if p, ok := m.(ReceivedPacket); ok {
				p.Data = bytes.Clone(p.Data)
				select {
				case pkts <- p:
				default: // nobody is looking for it
				}
			}
		}
	}()
	return pkts
}

// nextPacket returns the next packet from drain's channel; the wait is in
// virtual time.
func nextPacket(t *testing.T, pkts <-chan ReceivedPacket) ReceivedPacket {
	t.Helper()
	select {
	case p, ok := <-pkts:
		if !ok {
			t.Fatal("connection ended")
		}
		return p
	case <-time.After(time.Second):
		t.Fatal("no packet within a second")
	}
	panic("unreachable")
}

// stallConn is the relay's end of a connection that stops reading once
// stalled is closed: a stuck relay, or a path that died with data in
// flight, as the client sees it.
type stallConn struct {
	net.Conn
	stalled <-chan struct{}
	done    chan struct{}
	once    sync.Once
}

func (c *stallConn) Read(b []byte) (int, error) {
	select {
	case <-c.stalled:
		<-c.done
		return 0, io.ErrClosedPipe
	default:
	}
	return c.Conn.Read(b)
}

func (c *stallConn) Close() error {
	c.once.Do(func() { close(c.done) })
	return c.Conn.Close()
}
