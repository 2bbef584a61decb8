package magicbind

import (
	"fmt"
	"net/netip"
	"time"

	"golang.zx2c4.com/wireguard/conn"

	"meshd.dev/meshd/netmap"
)

// Endpoint is the conn.Endpoint of one peer, stable for the peer's life in
// the bind.
type Endpoint struct {
	p *peer
	b *Bind
}

// ClearSrc is a no-op: the bind does not pin source addresses.
func (e *Endpoint) ClearSrc() {}

// SrcToString is empty: the source is whatever the socket uses.
func (e *Endpoint) SrcToString() string { return "" }

// DstToString is the current path: the direct ip:port, or 127.3.3.40:REGION
// while relayed (what WireGuard's UAPI shows).
func (e *Endpoint) DstToString() string {
	path, addr, _ := e.b.peerPath(e.p, time.Now())
	if path == PathDirect {
		return addr.String()
	}
	e.p.mu.Lock()
	home := e.p.home
	e.p.mu.Unlock()
	return netip.AddrPortFrom(derpMagicAddr, uint16(home)).String()
}

// DstToBytes identifies the peer for WireGuard's cookie MACs: its key, which
// unlike an address does not change with the path.
func (e *Endpoint) DstToBytes() []byte { return e.p.key[:] }

// DstIP is the direct path's address, or zero while relayed.
func (e *Endpoint) DstIP() netip.Addr {
	if path, addr, _ := e.b.peerPath(e.p, time.Now()); path == PathDirect {
		return addr.Addr()
	}
	return netip.Addr{}
}

// SendMayStall reports whether a send to the peer may wait on the peer's
// own path: true unless its last send took a direct path, which waits
// only on the UDP socket all peers share. A relay's queue for the peer
// can hold a send (derp.Client.Send waits for room), and so can a relay
// still connecting. WireGuard's run-to-completion fork times only the
// sends that may stall (internal/wireguard/device.SendStallReporter).
func (e *Endpoint) SendMayStall() bool { return !e.p.sentDirect.Load() }

// SrcIP is zero: the bind does not pin source addresses.
func (e *Endpoint) SrcIP() netip.Addr { return netip.Addr{} }

// EndpointFor is the endpoint string to configure in WireGuard for the peer
// with key k (UAPI "endpoint="): its node key.
func EndpointFor(k netmap.NodePublic) string { return k.String() }

// ParseEndpoint accepts the strings EndpointFor makes. A peer not yet in the
// network map gets its endpoint now and its paths when the map arrives.
func (b *Bind) ParseEndpoint(s string) (conn.Endpoint, error) {
	k, err := netmap.ParseNodePublic(s)
	if err != nil {
		return nil, fmt.Errorf("magic bind endpoint %q: want a node key: %w", s, err)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.peerLocked(k).ep, nil
}

// Key is the node key of the endpoint's peer: every packet the bind hands
// WireGuard carries its sender's Endpoint, so a layer above the bind can
// attribute received packets to peers without a lookup by address.
func (e *Endpoint) Key() netmap.NodePublic { return e.p.key }
