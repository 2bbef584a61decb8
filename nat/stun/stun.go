// Package stun answers and asks STUN binding requests (RFC 8489), the way
// nodes learn the public ip:port their NAT maps a UDP socket to. Message
// encoding is github.com/pion/stun/v3; this package adds the server loop,
// strict response parsing, and a one-shot request for callers that own a
// socket.
package stun

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"time"

	pion "github.com/pion/stun/v3"
)

// DefaultPort is the IANA STUN port.
const DefaultPort = 3478

// maxMessageLen bounds what the server reads; a binding request is 20-100
// bytes, and anything near a datagram's maximum is not one.
const maxMessageLen = 1500

// software names this implementation in responses, as RFC 8489 suggests.
var software = pion.NewSoftware("meshd")

// TxID is a STUN transaction ID; a response carries its request's.
type TxID [pion.TransactionIDSize]byte

// Is reports whether b looks like a STUN message (by its magic cookie). It
// is cheap, so a socket shared with WireGuard and disco can demultiplex.
func Is(b []byte) bool { return pion.IsMessage(b) }

// NewRequest returns a binding request with a fresh transaction ID.
func NewRequest() (TxID, []byte) {
	m := pion.MustBuild(pion.TransactionID, pion.BindingRequest, software, pion.Fingerprint)
	return TxID(m.TransactionID), m.Raw
}

// Response returns the success response to the binding request req that
// arrived from src, carrying src as XOR-MAPPED-ADDRESS. It returns an error
// for anything that is not a well-formed binding request, which the server
// drops without answering: a STUN server must not be an amplifier for
// spoofed junk.
func Response(req []byte, src netip.AddrPort) ([]byte, error) {
	if len(req) > maxMessageLen {
		return nil, fmt.Errorf("stun: %d-byte message is too long for a binding request", len(req))
	}
	m := &pion.Message{Raw: append([]byte(nil), req...)}
	if err := m.Decode(); err != nil {
		return nil, fmt.Errorf("stun: %w", err)
	}
	if m.Type != pion.BindingRequest {
		return nil, fmt.Errorf("stun: %s is not a binding request", m.Type)
	}
	if m.Contains(pion.AttrFingerprint) {
		if err := pion.Fingerprint.Check(m); err != nil {
			return nil, fmt.Errorf("stun: request fingerprint: %w", err)
		}
	}
	src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
	if !src.IsValid() {
		return nil, errors.New("stun: invalid source address")
	}
	resp, err := pion.Build(
		pion.NewTransactionIDSetter(m.TransactionID),
		pion.BindingSuccess,
		software,
		&pion.XORMappedAddress{IP: src.Addr().AsSlice(), Port: int(src.Port())},
		pion.Fingerprint,
	)
	if err != nil {
		return nil, fmt.Errorf("stun: build response: %w", err)
	}
	return resp.Raw, nil
}

// ParseResponse decodes a binding success response and returns its
// transaction ID and the mapped address (XOR-MAPPED-ADDRESS, or the legacy
// MAPPED-ADDRESS from old servers).
func ParseResponse(b []byte) (TxID, netip.AddrPort, error) {
	m := &pion.Message{Raw: append([]byte(nil), b...)}
	if err := m.Decode(); err != nil {
		return TxID{}, netip.AddrPort{}, fmt.Errorf("stun: %w", err)
	}
	tx := TxID(m.TransactionID)
	if m.Type != pion.BindingSuccess {
		return tx, netip.AddrPort{}, fmt.Errorf("stun: %s is not a binding success response", m.Type)
	}
	if m.Contains(pion.AttrFingerprint) {
		if err := pion.Fingerprint.Check(m); err != nil {
			return tx, netip.AddrPort{}, fmt.Errorf("stun: response fingerprint: %w", err)
		}
	}
	var ip net.IP
	var port int
	var xor pion.XORMappedAddress
	if err := xor.GetFrom(m); err == nil {
		ip, port = xor.IP, xor.Port
	} else {
		var mapped pion.MappedAddress
		if err2 := mapped.GetFrom(m); err2 != nil {
			return tx, netip.AddrPort{}, fmt.Errorf("stun: response has no mapped address: %w", err)
		}
		ip, port = mapped.IP, mapped.Port
	}
	addr, ok := netip.AddrFromSlice(ip)
	if !ok || port <= 0 || port > 0xffff {
		return tx, netip.AddrPort{}, fmt.Errorf("stun: response has invalid mapped address %v:%d", ip, port)
	}
	return tx, netip.AddrPortFrom(addr.Unmap(), uint16(port)), nil
}

// Request sends one binding request to server on pc and waits for the
// matching response, ignoring unrelated datagrams. The caller must not be
// reading pc concurrently.
func Request(ctx context.Context, pc net.PacketConn, server netip.AddrPort) (mapped netip.AddrPort, rtt time.Duration, err error) {
	tx, req := NewRequest()
	if d, ok := ctx.Deadline(); ok {
		pc.SetReadDeadline(d)
		defer pc.SetReadDeadline(time.Time{})
	}
	stop := context.AfterFunc(ctx, func() { pc.SetReadDeadline(time.Now()) })
	defer stop()
	start := time.Now()
	if _, err := pc.WriteTo(req, net.UDPAddrFromAddrPort(server)); err != nil {
		return mapped, 0, fmt.Errorf("stun: send to %s: %w", server, err)
	}
	buf := make([]byte, maxMessageLen)
	for {
		n, _, err := pc.ReadFrom(buf)
		if err != nil {
			if ctx.Err() != nil {
				err = ctx.Err()
			}
			return mapped, 0, fmt.Errorf("stun: no answer from %s: %w", server, err)
		}
		if !Is(buf[:n]) {
			continue
		}
		got, addr, err := ParseResponse(buf[:n])
		if err != nil || got != tx {
			continue
		}
		return addr, time.Since(start), nil
	}
}

// Server answers binding requests on one UDP socket.
type Server struct {
	pc  net.PacketConn
	log *slog.Logger
}

// NewServer serves on pc, which the Server owns from now on.
func NewServer(pc net.PacketConn, log *slog.Logger) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{pc: pc, log: log}
}

// Listen opens a UDP socket on addr ("host:port") and returns a Server.
func Listen(addr string, log *slog.Logger) (*Server, error) {
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		return nil, fmt.Errorf("stun: listen on %s: %w", addr, err)
	}
	return NewServer(pc, log), nil
}

// Addr is the socket's local address.
func (s *Server) Addr() net.Addr { return s.pc.LocalAddr() }

// AddrPort is Addr as a netip.AddrPort.
func (s *Server) AddrPort() netip.AddrPort {
	return s.pc.LocalAddr().(*net.UDPAddr).AddrPort()
}

// Serve answers requests until ctx ends or the socket fails, then closes
// the socket.
func (s *Server) Serve(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() { s.pc.Close() })
	defer stop()
	defer s.pc.Close()
	udp, _ := s.pc.(*net.UDPConn)
	buf := make([]byte, maxMessageLen+1)
	for {
		var n int
		var src netip.AddrPort
		var err error
		if udp != nil {
			n, src, err = udp.ReadFromUDPAddrPort(buf)
		} else {
			var a net.Addr
			n, a, err = s.pc.ReadFrom(buf)
			if ua, ok := a.(*net.UDPAddr); ok {
				src = ua.AddrPort()
			}
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("stun: read: %w", err)
		}
		resp, err := Response(buf[:n], src)
		if err != nil {
			s.log.Debug("stun: dropped datagram", "from", src, "err", err)
			continue
		}
		if _, err := s.pc.WriteTo(resp, net.UDPAddrFromAddrPort(src)); err != nil {
			s.log.Debug("stun: reply failed", "to", src, "err", err)
		}
	}
}
