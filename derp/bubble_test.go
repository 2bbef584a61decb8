package derp

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"meshd.dev/meshd/netmap"
)

// memListener is a net.Listener whose connections are in-memory net.Pipe
// pairs. A relay served on it can run inside a testing/synctest bubble,
// where time is virtual: keep-alive tickers, idle and write deadlines and
// the rate limiter's clock only move when every goroutine of the test
// waits, so tests check exact deadlines instead of sleeping past them.
type memListener struct {
	conns  chan net.Conn
	closed chan struct{}
	once   sync.Once
}

func newMemListener() *memListener {
	return &memListener{conns: make(chan net.Conn), closed: make(chan struct{})}
}

func (l *memListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

func (l *memListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

func (l *memListener) Addr() net.Addr { return memAddr{} }

type memAddr struct{}

func (memAddr) Network() string { return "mem" }
func (memAddr) String() string  { return "relay.test" }

// dialWrapped returns a ClientOptions.DialContext connecting to l; wrap,
// if set, stands between the pipe and the server's end of it.
func (l *memListener) dialWrapped(wrap func(net.Conn) net.Conn) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, _, addr string) (net.Conn, error) {
		client, server := net.Pipe()
		if wrap != nil {
			server = wrap(server)
		}
		select {
		case l.conns <- server:
			return client, nil
		case <-l.closed:
			return nil, fmt.Errorf("dial %s: %w", addr, net.ErrClosed)
		case <-ctx.Done():
			return nil, fmt.Errorf("dial %s: %w", addr, ctx.Err())
		}
	}
}

// bubbleRelay is a relay served over HTTP on a memListener. Create it
// inside synctest.Test; its cleanup closes it there.
type bubbleRelay struct {
	*Server
	ln *memListener
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
	ln := newMemListener()
	hs := &http.Server{Handler: s}
	served := make(chan struct{})
	go func() { defer close(served); hs.Serve(ln) }()
	t.Cleanup(func() {
		s.Close()
		hs.Close()
		<-served
	})
	return &bubbleRelay{Server: s, ln: ln}
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
