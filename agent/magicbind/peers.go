package magicbind

import (
	"net/netip"
	"slices"
	"sync"
	"time"

	"golang.zx2c4.com/wireguard/conn"

	"meshd.dev/meshd/nat/endpoint"
	"meshd.dev/meshd/netmap"
)

// peer is one WireGuard peer's path state.
type peer struct {
	key netmap.NodePublic
	ep  *Endpoint

	mu    sync.Mutex
	name  string
	disco netmap.DiscoPublic
	home  int
	// heardVia is the relay region the peer's packets last arrived through:
	// a reply path while the map does not yet say where its home is (it
	// has just joined and is still measuring), so our answer to its first
	// handshake is not sent to its NAT and lost.
	heardVia int
	cands    []netip.AddrPort // from the netmap
	sel      *endpoint.Selector
	lastSend time.Time
	inLoop   bool                 // in Bind.loop (or about to be)
	directEP *conn.StdNetEndpoint // cached for the current direct path
	pmtu     pmtuState
}

func (b *Bind) peerLocked(k netmap.NodePublic) *peer {
	if p, ok := b.peers[k]; ok {
		return p
	}
	p := &peer{key: k, sel: endpoint.New(b.opts.Paths)}
	p.ep = &Endpoint{p: p, b: b}
	b.peers[k] = p
	b.publishKeysLocked()
	return p
}

func (b *Bind) publishKeysLocked() {
	m := make(map[netmap.NodePublic]*peer, len(b.peers))
	for k, p := range b.peers {
		m[k] = p
	}
	b.byKey.Store(&m)
}

// SetNetworkMap brings the bind's peers, their disco keys, candidate
// endpoints and home regions, and the DERP map in line with nm.
func (b *Bind) SetNetworkMap(nm *netmap.NetworkMap) {
	b.mu.Lock()
	defer b.mu.Unlock()
	seen := make(map[netmap.NodePublic]bool, len(nm.Peers))
	b.byDisco = make(map[netmap.DiscoPublic]*peer, len(nm.Peers))
	addrs := map[netip.AddrPort]*peer{}
	for _, n := range nm.Peers {
		if n.NodeKey.IsZero() || n.NodeKey == b.selfPK {
			continue
		}
		seen[n.NodeKey] = true
		p := b.peerLocked(n.NodeKey)
		p.mu.Lock()
		p.name, p.disco, p.home = n.Hostname, n.DiscoKey, n.HomeDERP
		p.cands = slices.Clone(n.Endpoints)
		p.sel.SetCandidates(n.Endpoints)
		for _, c := range p.sel.State(time.Now()).Candidates {
			addrs[c.Addr] = p
		}
		p.mu.Unlock()
		if !n.DiscoKey.IsZero() {
			b.byDisco[n.DiscoKey] = p
		}
	}
	for k := range b.peers {
		if !seen[k] {
			// WireGuard removes the peer too; its endpoint stays valid
			// (sends go nowhere) until then.
			delete(b.peers, k)
		}
	}
	b.publishKeysLocked()
	b.byAddr.Store(&addrs)
	b.selfEps = slices.Clone(nm.Self.Endpoints)
	mapChanged := !derpMapEqual(b.derpMap, nm.DERPMap)
	b.derpMap = nm.DERPMap
	if mapChanged && b.open != nil {
		b.kickLocked()
		b.startSTUNLocked()
	}
	b.connectPeerRegionsLocked()
}

// learnAddr ties a direct source address to p (after an authenticated ping
// or pong from it).
func (b *Bind) learnAddr(a netip.AddrPort, p *peer) {
	if (*b.byAddr.Load())[a] == p {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.peers[p.key] != p {
		return // removed meanwhile
	}
	old := *b.byAddr.Load()
	m := make(map[netip.AddrPort]*peer, len(old)+1)
	for k, v := range old {
		m[k] = v
	}
	m[a] = p
	b.byAddr.Store(&m)
}
