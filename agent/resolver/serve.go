package resolver

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"
)

// tcpIdle is how long a TCP client may stay silent between queries (RFC
// 7766 suggests seconds); a query's bytes must arrive within it too.
const tcpIdle = 10 * time.Second

// ServeUDP answers queries on pc until ctx ends or pc fails, from the
// sources accept allows (nil: all; others are dropped unanswered). Each query
// is answered on its own goroutine, at most MaxInflight at once; beyond
// that datagrams are dropped (the client retries), so a flood cannot grow
// goroutines or sockets without bound. It closes pc before returning.
func (r *Resolver) ServeUDP(ctx context.Context, pc net.PacketConn, accept func(netip.Addr) bool) error {
	stop := context.AfterFunc(ctx, func() { pc.Close() })
	defer stop()
	defer pc.Close()
	var wg sync.WaitGroup
	defer wg.Wait()
	sem := make(chan struct{}, r.opts.MaxInflight)
	for {
		buf := make([]byte, 4096) // a query larger than this is not one
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		if !accepted(accept, from) {
			continue
		}
		select {
		case sem <- struct{}{}:
		default:
			r.dropped.Add(1)
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if resp := r.Respond(ctx, buf[:n], false); resp != nil {
				pc.WriteTo(resp, from)
			}
		}()
	}
}

// ServeTCP answers queries on ln's connections until ctx ends or ln fails,
// from the sources accept allows (nil: all; others are closed at once), at most MaxTCPConns clients at once (more are closed at once), each
// query of a connection in turn. It closes ln before returning.
func (r *Resolver) ServeTCP(ctx context.Context, ln net.Listener, accept func(netip.Addr) bool) error {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	defer ln.Close()
	var wg sync.WaitGroup
	defer wg.Wait()
	sem := make(chan struct{}, r.opts.MaxTCPConns)
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return err
		}
		if !accepted(accept, c.RemoteAddr()) {
			c.Close()
			continue
		}
		select {
		case sem <- struct{}{}:
		default:
			c.Close()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			r.serveConn(ctx, c)
		}()
	}
}

func (r *Resolver) serveConn(ctx context.Context, c net.Conn) {
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	for {
		c.SetReadDeadline(time.Now().Add(tcpIdle))
		var l [2]byte
		if _, err := io.ReadFull(c, l[:]); err != nil {
			return
		}
		req := make([]byte, binary.BigEndian.Uint16(l[:]))
		if _, err := io.ReadFull(c, req); err != nil {
			return
		}
		resp := r.Respond(ctx, req, true)
		if resp == nil {
			return
		}
		out := make([]byte, 2+len(resp))
		binary.BigEndian.PutUint16(out, uint16(len(resp)))
		copy(out[2:], resp)
		c.SetWriteDeadline(time.Now().Add(tcpIdle))
		if _, err := c.Write(out); err != nil {
			return
		}
	}
}

// accepted applies accept to a query's source.
func accepted(accept func(netip.Addr) bool, from net.Addr) bool {
	if accept == nil {
		return true
	}
	var a netip.Addr
	switch f := from.(type) {
	case *net.UDPAddr:
		a = f.AddrPort().Addr()
	case *net.TCPAddr:
		a = f.AddrPort().Addr()
	default:
		ap, err := netip.ParseAddrPort(from.String())
		if err != nil {
			return false
		}
		a = ap.Addr()
	}
	return accept(a.Unmap().WithZone(""))
}
