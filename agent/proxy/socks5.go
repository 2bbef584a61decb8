// Package proxy provides the outbound proxies a userspace (netstack) node
// offers to applications that cannot use a TUN device: a SOCKS5 server
// (CONNECT only, no authentication, RFC 1928) and an HTTP CONNECT proxy.
// Both dial through a caller-supplied function, normally the node's netstack.
package proxy

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// DialFunc opens a TCP connection to addr ("host:port").
type DialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// SOCKS5 protocol constants (RFC 1928).
const (
	socks5Version = 5

	authNone         = 0x00
	authNoAcceptable = 0xff

	cmdConnect = 0x01

	atypIPv4   = 0x01
	atypDomain = 0x03
	atypIPv6   = 0x04

	repSucceeded           = 0x00
	repGeneralFailure      = 0x01
	repNetworkUnreachable  = 0x03
	repHostUnreachable     = 0x04
	repConnectionRefused   = 0x05
	repCommandNotSupported = 0x07
	repAddrNotSupported    = 0x08
)

// handshakeTimeout bounds how long a client may take to say where it wants
// to go, so idle half-open connections cannot pile up.
const handshakeTimeout = 10 * time.Second

// socksError is a protocol error with the reply code to send, if any.
type socksError struct {
	rep byte // 0: close without a reply
	msg string
}

func (e *socksError) Error() string { return "socks5: " + e.msg }

// readGreeting reads the method-selection message and reports whether the
// client offers "no authentication".
func readGreeting(r io.Reader) (bool, error) {
	var hdr [2]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return false, fmt.Errorf("socks5: read greeting: %w", err)
	}
	if hdr[0] != socks5Version {
		return false, &socksError{msg: fmt.Sprintf("version %d is not SOCKS5", hdr[0])}
	}
	if hdr[1] == 0 {
		return false, &socksError{msg: "greeting offers no methods"}
	}
	methods := make([]byte, hdr[1])
	if _, err := io.ReadFull(r, methods); err != nil {
		return false, fmt.Errorf("socks5: read methods: %w", err)
	}
	for _, m := range methods {
		if m == authNone {
			return true, nil
		}
	}
	return false, nil
}

// readRequest reads a CONNECT request and returns the target as
// "host:port". The host is an IP literal or a domain name of 1-255 bytes.
func readRequest(r io.Reader) (string, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return "", fmt.Errorf("socks5: read request: %w", err)
	}
	if hdr[0] != socks5Version {
		return "", &socksError{rep: repGeneralFailure, msg: fmt.Sprintf("request version %d", hdr[0])}
	}
	if hdr[2] != 0 {
		return "", &socksError{rep: repGeneralFailure, msg: "reserved byte is not zero"}
	}
	var host string
	switch hdr[3] {
	case atypIPv4:
		var b [4]byte
		if _, err := io.ReadFull(r, b[:]); err != nil {
			return "", fmt.Errorf("socks5: read address: %w", err)
		}
		host = netip.AddrFrom4(b).String()
	case atypIPv6:
		var b [16]byte
		if _, err := io.ReadFull(r, b[:]); err != nil {
			return "", fmt.Errorf("socks5: read address: %w", err)
		}
		host = netip.AddrFrom16(b).String()
	case atypDomain:
		var n [1]byte
		if _, err := io.ReadFull(r, n[:]); err != nil {
			return "", fmt.Errorf("socks5: read address: %w", err)
		}
		if n[0] == 0 {
			return "", &socksError{rep: repAddrNotSupported, msg: "empty domain name"}
		}
		b := make([]byte, n[0])
		if _, err := io.ReadFull(r, b); err != nil {
			return "", fmt.Errorf("socks5: read address: %w", err)
		}
		for _, c := range b {
			// Hostnames only: anything else (brackets, colons, spaces) could
			// make the host:port we build ambiguous.
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_') {
				return "", &socksError{rep: repAddrNotSupported, msg: fmt.Sprintf("bad character %q in domain name", c)}
			}
		}
		host = string(b)
	default:
		return "", &socksError{rep: repAddrNotSupported, msg: fmt.Sprintf("address type %d", hdr[3])}
	}
	var pb [2]byte
	if _, err := io.ReadFull(r, pb[:]); err != nil {
		return "", fmt.Errorf("socks5: read port: %w", err)
	}
	// The command is checked after the whole request is read so that the
	// error reply is sent on a connection in a well-defined state.
	if hdr[1] != cmdConnect {
		return "", &socksError{rep: repCommandNotSupported, msg: fmt.Sprintf("command %d not supported (only CONNECT)", hdr[1])}
	}
	port := binary.BigEndian.Uint16(pb[:])
	if port == 0 {
		return "", &socksError{rep: repAddrNotSupported, msg: "port 0"}
	}
	return net.JoinHostPort(host, strconv.Itoa(int(port))), nil
}

// reply builds a SOCKS5 reply carrying bound address bnd (zero: 0.0.0.0:0).
func reply(rep byte, bnd netip.AddrPort) []byte {
	a := bnd.Addr().Unmap()
	out := []byte{socks5Version, rep, 0}
	if a.Is6() {
		out = append(out, atypIPv6)
		b := a.As16()
		out = append(out, b[:]...)
	} else {
		out = append(out, atypIPv4)
		b := netip.IPv4Unspecified().As4()
		if a.Is4() {
			b = a.As4()
		}
		out = append(out, b[:]...)
	}
	return binary.BigEndian.AppendUint16(out, bnd.Port())
}

// replyCode maps a dial error onto the closest SOCKS5 reply.
func replyCode(err error) byte {
	var se *socksError
	switch {
	case errors.As(err, &se) && se.rep != 0:
		return se.rep
	case errors.Is(err, ErrNoRoute):
		return repHostUnreachable
	case isRefused(err):
		return repConnectionRefused
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return repHostUnreachable
	}
	return repNetworkUnreachable
}

// ErrNoRoute is returned by dial functions for a destination that is not in
// the tailnet; the proxies report it as "host unreachable".
var ErrNoRoute = errors.New("no route to host in the tailnet")

// isRefused reports whether err is a refused connection. gVisor's netstack
// does not return a syscall errno, hence the fallback on its message.
func isRefused(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED) || strings.Contains(strings.ToLower(err.Error()), "connection refused")
}

// Server accepts proxy connections and relays them through Dial.
type Server struct {
	Dial DialFunc
	Log  *slog.Logger
}

// ServeSOCKS5 serves SOCKS5 on ln until ctx ends or ln fails.
func (s *Server) ServeSOCKS5(ctx context.Context, ln net.Listener) error {
	return serve(ctx, ln, func(c net.Conn) { s.handleSOCKS5(ctx, c) })
}

func serve(ctx context.Context, ln net.Listener, handle func(net.Conn)) error {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("proxy accept: %w", err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Closing on ctx end unblocks the relay so Serve can return.
			stopConn := context.AfterFunc(ctx, func() { c.Close() })
			defer stopConn()
			handle(c)
		}()
	}
}

func (s *Server) handleSOCKS5(ctx context.Context, c net.Conn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(handshakeTimeout))
	br := bufio.NewReader(c)
	ok, err := readGreeting(br)
	if err != nil {
		s.logf("socks5 greeting from %v: %v", c.RemoteAddr(), err)
		return
	}
	if !ok {
		c.Write([]byte{socks5Version, authNoAcceptable})
		return
	}
	if _, err := c.Write([]byte{socks5Version, authNone}); err != nil {
		return
	}
	target, err := readRequest(br)
	if err != nil {
		var se *socksError
		if errors.As(err, &se) && se.rep != 0 {
			c.Write(reply(se.rep, netip.AddrPort{}))
		}
		s.logf("socks5 request from %v: %v", c.RemoteAddr(), err)
		return
	}
	dctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	out, err := s.Dial(dctx, "tcp", target)
	cancel()
	if err != nil {
		c.Write(reply(replyCode(err), netip.AddrPort{}))
		s.logf("socks5 connect %s: %v", target, err)
		return
	}
	defer out.Close()
	var bnd netip.AddrPort
	if ta, ok := out.LocalAddr().(*net.TCPAddr); ok {
		bnd = ta.AddrPort()
	}
	if _, err := c.Write(reply(repSucceeded, bnd)); err != nil {
		return
	}
	c.SetDeadline(time.Time{})
	// Bytes the client sent right after its request are in br's buffer.
	Relay(c, br, out)
}

func (s *Server) logf(format string, args ...any) {
	if s.Log != nil {
		s.Log.Debug(fmt.Sprintf(format, args...))
	}
}

// Relay copies both ways between client (read through clientR, which may
// hold bytes already buffered from it) and target until both directions
// finish, half-closing so that protocols that signal end-of-request with a
// FIN keep working.
func Relay(client net.Conn, clientR io.Reader, target net.Conn) {
	done := make(chan struct{})
	go func() {
		io.Copy(target, clientR)
		closeWrite(target)
		close(done)
	}()
	io.Copy(client, target)
	closeWrite(client)
	<-done
}

func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
		return
	}
	c.Close()
}
