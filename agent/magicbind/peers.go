package magicbind

import (
	"maps"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
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
	// held[:heldLen] is the last handshake message WireGuard sent while
	// the peer had no sure path, sent again when one appears (hold.go);
	// heldAt is when (zero: nothing held). The buffer is allocated at the
	// first hold and reused.
	held    *[wgInitiationSize]byte
	heldLen int
	heldAt  time.Time
	// lastPath is the path the last send took (the direct address, or
	// zero for the relay), to count path changes; lastPathSet says one was
	// taken.
	lastPath    netip.AddrPort
	lastPathSet bool
	// sentDirect is lastPath.IsValid() for readers without mu: the last
	// send took a direct path, where a send waits only on the UDP socket
	// every peer shares (Endpoint.SendMayStall).
	sentDirect atomic.Bool

	ctr peerCounters // read without mu (metrics.go)

	// Guarded by Bind.mu:
	// mapGen is the Bind.mapGen of the last map that had the peer.
	mapGen uint64
	// learnt are the addresses the peer proved with disco (addrIndex),
	// oldest first.
	learnt []netip.AddrPort
}

// peerLocked returns the peer with key k, adding it (and publishing the
// key table) if it is new: WireGuard parsed an endpoint for a peer the map
// does not have yet. That copies the key table, which is fine for the odd
// peer; SetNetworkMap adds a whole map's peers with addPeerLocked and
// publishes once.
func (b *Bind) peerLocked(k netmap.NodePublic) *peer {
	if p, ok := b.peers[k]; ok {
		return p
	}
	p := b.addPeerLocked(k)
	b.publishKeysLocked()
	return p
}

// addPeerLocked adds a peer to b.peers without publishing it in byKey.
func (b *Bind) addPeerLocked(k netmap.NodePublic) *peer {
	p := &peer{key: k, sel: endpoint.New(b.opts.Paths)}
	p.ep = &Endpoint{p: p, b: b}
	b.peers[k] = p
	return p
}

func (b *Bind) publishKeysLocked() {
	m := maps.Clone(b.peers)
	b.byKey.Store(&m)
}

// SetNetworkMap brings the bind's peers, their disco keys, candidate
// endpoints and home regions, and the DERP map in line with nm.
//
// Its cost is one pass over the map plus the changes: the key table is
// published once if peers came or went, and only the addresses of peers
// whose endpoints changed are touched in the address index, so a map
// that changes nothing for the bind publishes nothing.
func (b *Bind) SetNetworkMap(nm *netmap.NetworkMap) {
	for _, p := range b.setNetworkMap(nm) {
		b.sendHeld(p) // the map may have given it a path
	}
}

// setNetworkMap applies nm and returns the peers that hold a handshake
// initiation.
func (b *Bind) setNetworkMap(nm *netmap.NetworkMap) (held []*peer) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.mapGen++
	keysChanged := false
	for _, n := range nm.Peers {
		if n.NodeKey.IsZero() || n.NodeKey == b.selfPK {
			continue
		}
		p, ok := b.peers[n.NodeKey]
		if !ok {
			p = b.addPeerLocked(n.NodeKey)
			keysChanged = true
		}
		p.mapGen = b.mapGen
		if b.updatePeerLocked(p, n) {
			held = append(held, p)
		}
	}
	for k, p := range b.peers {
		if p.mapGen != b.mapGen {
			// WireGuard removes the peer too; its endpoint stays valid
			// (sends go nowhere) until then.
			delete(b.peers, k)
			b.forgetPeerLocked(p)
			keysChanged = true
		}
	}
	if keysChanged {
		b.publishKeysLocked()
	}
	b.selfEps = slices.Clone(nm.Self.Endpoints)
	mapChanged := !derpMapEqual(b.derpMap, nm.DERPMap)
	b.derpMap = nm.DERPMap
	if mapChanged && b.open != nil {
		b.dropStaleRegionsLocked()
		b.kickLocked()
		b.startSTUNLocked()
	}
	b.connectPeerRegionsLocked()
	return held
}

// updatePeerLocked applies p's node n from the map and reports whether p
// holds a handshake initiation.
func (b *Bind) updatePeerLocked(p *peer, n *netmap.Node) (held bool) {
	p.mu.Lock()
	held = p.hasHeldLocked()
	p.name, p.home = n.Hostname, n.HomeDERP
	oldDisco := p.disco
	p.disco = n.DiscoKey
	old := p.cands
	moved := !slices.Equal(old, n.Endpoints)
	if moved {
		p.cands = slices.Clone(n.Endpoints)
		p.sel.SetCandidates(n.Endpoints)
	}
	p.mu.Unlock()
	if oldDisco != n.DiscoKey && b.byDisco[oldDisco] == p {
		delete(b.byDisco, oldDisco)
	}
	if !n.DiscoKey.IsZero() && b.byDisco[n.DiscoKey] != p {
		b.byDisco[n.DiscoKey] = p
	}
	if !moved {
		return held
	}
	for _, a := range old {
		if !slices.Contains(n.Endpoints, a) {
			b.addrs.unclaim(a, p)
		}
	}
	for _, a := range n.Endpoints {
		b.addrs.claim(a, p)
	}
	return held
}

// forgetPeerLocked drops what the tables hold for p, which left the map:
// its addresses, published and learnt, and its disco key.
func (b *Bind) forgetPeerLocked(p *peer) {
	p.mu.Lock()
	cands, dk := p.cands, p.disco
	p.mu.Unlock()
	b.addrs.forget(p, cands)
	if b.byDisco[dk] == p {
		delete(b.byDisco, dk)
	}
}

// learnAddr ties a direct source address to p (after an authenticated ping
// or pong from it). Once it is tied, the next ping or pong from it takes
// no lock.
func (b *Bind) learnAddr(a netip.AddrPort, p *peer) {
	if e := b.addrs.table.Load().find(a); e != nil && e.p == p && e.learnt {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.peers[p.key] != p {
		return // removed meanwhile
	}
	b.addrs.learn(a, p)
}
