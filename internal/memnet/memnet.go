// Package memnet is an in-memory network for tests: a net.Listener whose
// connections are net.Pipe pairs, dialled from any source address.
//
// Its reason to exist is testing/synctest. A goroutine blocked on a
// socket is not durably blocked, so a bubble holding loopback TCP
// connections never moves its clock; over memnet connections every
// deadline, and every timer of the servers and clients using them,
// follows the bubble's clock, and a test of a 10-second limit checks it
// exactly in no wall time. Connections carry TCP addresses, so code that
// counts or logs peers by address sees them as it would over TCP.
package memnet

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"
)

// Listener accepts the connections its Dial methods make.
type Listener struct {
	addr  *net.TCPAddr
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once

	mu   sync.Mutex
	port uint16 // the last client port handed out
}

// Listen returns a listener at addr, which only names it: nothing is
// bound.
func Listen(addr netip.AddrPort) *Listener {
	return &Listener{
		addr:  net.TCPAddrFromAddrPort(addr),
		conns: make(chan net.Conn),
		done:  make(chan struct{}),
		port:  40000,
	}
}

// Accept waits for the next connection, until Close.
func (l *Listener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

// Close makes Accept and later dials fail; connections made stay open.
func (l *Listener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

// Addr is the listener's address, a *net.TCPAddr.
func (l *Listener) Addr() net.Addr { return l.addr }

// Dial connects to the listener from the address src (a new port of it
// each time). It waits for Accept, and fails once the listener is closed
// or ctx ends.
func (l *Listener) Dial(ctx context.Context, src netip.Addr) (net.Conn, error) {
	l.mu.Lock()
	l.port++
	from := net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, l.port))
	l.mu.Unlock()
	client, server := net.Pipe()
	select {
	case l.conns <- conn{server, l.addr, from}:
		return conn{client, from, l.addr}, nil
	case <-l.done:
	case <-ctx.Done():
	}
	client.Close()
	server.Close()
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("dial %s from %s: %w", l.addr, src, err)
	}
	return nil, fmt.Errorf("dial %s from %s: %w", l.addr, src, net.ErrClosed)
}

// DialContext fits http.Transport.DialContext and the like: it connects
// from 127.0.0.1 whatever network and address are asked for.
func (l *Listener) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	return l.Dial(ctx, netip.AddrFrom4([4]byte{127, 0, 0, 1}))
}

// conn is one end of a pipe with TCP addresses.
type conn struct {
	net.Conn
	local, remote net.Addr
}

func (c conn) LocalAddr() net.Addr  { return c.local }
func (c conn) RemoteAddr() net.Addr { return c.remote }
