package tunwrap

import (
	"net/netip"

	"meshd.dev/meshd/packet"
)

// Redirect moves TCP port From of some of this node's own addresses to
// another local port in the data path: a peer connects to ADDR:From, the
// host's socket listens on ADDR:To. It is how the SSH server takes port
// 22 of the tailnet addresses in kernel TUN mode while an SSH server of
// the host listens on 0.0.0.0:22 (which Linux would not let a socket on
// ADDR:22 share). The packet filter sees From in both directions.
type Redirect struct {
	From    uint16
	Targets []RedirectTarget
}

// RedirectTarget is one address and the local port From goes to there.
type RedirectTarget struct {
	Addr netip.Addr
	To   uint16
}

// SetRedirect replaces the redirect (nil: none).
func (w *Wrapper) SetRedirect(r *Redirect) { w.redirect.Store(r) }

// to returns the port a packet to dst:port goes to, or 0.
func (r *Redirect) to(p *packet.Parsed) uint16 {
	if p.Proto != packet.ProtoTCP || !p.HasPorts || p.DstPort != r.From {
		return 0
	}
	dst := p.Dst.Netip()
	for _, t := range r.Targets {
		if t.Addr == dst {
			return t.To
		}
	}
	return 0
}

// isTarget reports whether p comes from a redirect target's local port.
func (r *Redirect) isTarget(p *packet.Parsed) bool {
	if p.Proto != packet.ProtoTCP || !p.HasPorts {
		return false
	}
	src := p.Src.Netip()
	for _, t := range r.Targets {
		if t.To == p.SrcPort && t.Addr == src {
			return true
		}
	}
	return false
}

// redirectIn rewrites accepted inbound packets to From into To.
func redirectIn(r *Redirect, bufs [][]byte, pp []packet.Parsed, offset int) {
	for i := range pp {
		if to := r.to(&pp[i]); to != 0 {
			pp[i].SetTCPPort(bufs[i][offset:], false, to)
		}
	}
}

// redirectOut rewrites outbound packets from To back to From, before the
// filter and the peers see them.
func redirectOut(r *Redirect, bufs [][]byte, sizes []int, pp []packet.Parsed, offset int) {
	for i := range pp {
		if sizes[i] > 0 && r.isTarget(&pp[i]) {
			pp[i].SetTCPPort(bufs[i][offset:offset+sizes[i]], true, r.From)
		}
	}
}
