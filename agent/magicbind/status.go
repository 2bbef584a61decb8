package magicbind

import (
	"net/netip"
	"slices"
	"strconv"
	"time"

	"meshd.dev/meshd/netmap"
)

// Path names, as `meshd status` shows them.
const (
	PathDirect = "direct"
	PathDERP   = "derp"
	PathNone   = "none"
)

// PeerStatus is one peer's path, for `meshd status`.
type PeerStatus struct {
	// Path is PathDirect, PathDERP or PathNone.
	Path string
	// Addr is the direct address in use (Path == PathDirect).
	Addr netip.AddrPort
	// DERPRegion and DERPCode are the relay used (Path == PathDERP).
	DERPRegion int
	DERPCode   string
	Latency    time.Duration
	// PathMTU is the largest overlay packet (inner IP packet) that crossed
	// the direct path in use in its last probe round; 0 while unknown
	// (relayed, not probed yet, or Options.OverlayMTU unset) and when not
	// even the smallest probe got through.
	PathMTU int
	// MTUProblem is set when the direct path in use drops packets of the
	// full OverlayMTU: bulk traffic would stall there. MTUProblemText says
	// what to do.
	MTUProblem bool
	// OverlayMTU is the MTU the probes tested (Options.OverlayMTU), set
	// with a probe result.
	OverlayMTU int
}

// Endpoint formats the path's endpoint: "ip:port", or "derp:CODE".
func (s PeerStatus) Endpoint() string {
	switch s.Path {
	case PathDirect:
		return s.Addr.String()
	case PathDERP:
		return "derp:" + s.DERPCode
	}
	return ""
}

// PeerStatus reports the path packets to the peer with key k take now: a
// direct path that missed its heartbeat shows as the relay, which carries
// copies of the traffic until a pong settles it.
func (b *Bind) PeerStatus(k netmap.NodePublic) PeerStatus {
	b.mu.Lock()
	p := b.peers[k]
	b.mu.Unlock()
	if p == nil {
		return PeerStatus{Path: PathNone}
	}
	now := time.Now()
	path, addr, home := b.peerPath(p, now)
	if path == PathDirect {
		p.mu.Lock()
		doubt := p.sel.InDoubt(now)
		p.mu.Unlock()
		if doubt && b.relayConnected(home) {
			// The direct path missed its heartbeat: what arrives now
			// arrives through the relay, so say so rather than wait for
			// the path's trust to lapse.
			path, addr = PathDERP, netip.AddrPort{}
		}
	}
	st := PeerStatus{Path: path, Addr: addr}
	if path == PathDirect {
		p.mu.Lock()
		if pm := p.pmtu; pm.current(addr, int(b.overlayMTU.Load())) {
			st.PathMTU, st.MTUProblem, st.OverlayMTU = pm.pathMTU, pm.lost, pm.overlay
		}
		p.mu.Unlock()
	}
	if path == PathDERP {
		st.DERPRegion = home
		b.mu.Lock()
		st.DERPCode = b.regionCodeLocked(home)
		b.mu.Unlock()
	}
	return st
}

func (b *Bind) regionCodeLocked(id int) string {
	for _, r := range b.derpMap.Regions {
		if r.ID == id {
			return r.Code
		}
	}
	return strconv.Itoa(id)
}

// HomeDERP is the region this node receives relayed packets on (0 before
// one is known).
func (b *Bind) HomeDERP() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.home
}

// STUNEndpoints are the public ip:port mappings of the UDP socket that STUN
// servers reported, to publish as candidates.
func (b *Bind) STUNEndpoints() []netip.AddrPort {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.stunEps)
}
