package magicbind

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"meshd.dev/meshd/nat/disco"
	"meshd.dev/meshd/nat/endpoint"
	"meshd.dev/meshd/netmap"
)

type pingWaiter struct {
	p      *peer
	sent   time.Time
	result chan PingResult
}

func (b *Bind) kick() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.kickLocked()
}

func (b *Bind) kickLocked() {
	if b.open == nil {
		return
	}
	select {
	case b.open.wake <- struct{}{}:
	default:
	}
}

// discoLoop sends the pings and call-me-maybes the peers' selectors ask
// for, sleeping until the earliest next wake (at most a second).
func (b *Bind) discoLoop(o *openState) {
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-o.ctx.Done():
			return
		case <-t.C:
		case <-o.wake:
		}
		now := time.Now()
		b.loopMu.Lock()
		peers := make([]*peer, 0, len(b.loop))
		for p := range b.loop {
			peers = append(peers, p)
		}
		b.loopMu.Unlock()
		// With no active peer nothing is due until a send or a disco
		// message wakes the loop: an idle node does not tick.
		next := now.Add(time.Hour)
		if len(peers) > 0 {
			next = now.Add(time.Second)
		}
		b.mu.Lock()
		myEps := b.myEndpointsLocked()
		b.mu.Unlock()
		for _, p := range peers {
			p.mu.Lock()
			act := p.sel.Poll(now)
			idle := true
			if w := p.sel.NextWake(now); !w.IsZero() {
				idle = false
				if w.Before(next) {
					next = w
				}
			}
			dk, home, name := p.disco, p.home, p.name
			var probes []pmtuProbe
			var res *pmtuResult
			if !dk.IsZero() {
				var w time.Time
				probes, res, w = b.pmtuPollLocked(p, now)
				if !w.IsZero() {
					idle = false
					if w.Before(next) {
						next = w
					}
				}
			}
			if idle && !p.sel.Active(now) {
				p.inLoop = false
			}
			leave := !p.inLoop
			held := p.hasHeldLocked()
			p.mu.Unlock()
			if leave {
				b.leaveLoop(p)
			}
			if held {
				// A path may have come some other way (a relay
				// connection, a selector timeout); this bounds the
				// wait to one round.
				b.sendHeld(p)
			}
			if dk.IsZero() {
				continue
			}
			b.logPMTU(p.key, name, res)
			for _, pr := range act.Pings {
				b.sendDiscoUDP(pr.To, dk, disco.Ping{TxID: pr.TxID, NodeKey: b.selfPK})
			}
			b.sendProbes(probes, dk)
			if act.CallMeMaybe && home != 0 && len(myEps) > 0 {
				b.sendDiscoDERP(p, home, dk, disco.CallMeMaybe{Endpoints: myEps})
			}
		}
		d := max(next.Sub(time.Now()), 10*time.Millisecond)
		t.Reset(d)
	}
}

// joinLoopLocked marks p as polled by the disco loop and reports whether
// the caller must add it (joinLoop, after releasing p.mu).
func (p *peer) joinLoopLocked() bool {
	if p.inLoop {
		return false
	}
	p.inLoop = true
	return true
}

// joinLoop adds p to the peers the disco loop polls and wakes the loop.
func (b *Bind) joinLoop(p *peer) {
	b.loopMu.Lock()
	b.loop[p] = struct{}{}
	b.loopMu.Unlock()
	b.kick()
}

// leaveLoop drops p from the disco loop unless it became active again
// since the loop found it idle.
func (b *Bind) leaveLoop(p *peer) {
	b.loopMu.Lock()
	p.mu.Lock()
	if !p.inLoop {
		delete(b.loop, p)
	}
	p.mu.Unlock()
	b.loopMu.Unlock()
}

// polledPeers is how many peers the disco loop polls now (tests).
func (b *Bind) polledPeers() int {
	b.loopMu.Lock()
	defer b.loopMu.Unlock()
	return len(b.loop)
}

func (b *Bind) myEndpointsLocked() []netip.AddrPort {
	eps := append(slices.Clone(b.selfEps), b.stunEps...)
	slices.SortFunc(eps, func(x, y netip.AddrPort) int { return x.Compare(y) })
	eps = slices.Compact(eps)
	if len(eps) > disco.MaxEndpoints {
		eps = eps[:disco.MaxEndpoints]
	}
	return eps
}

func (b *Bind) sendDiscoUDP(to netip.AddrPort, dk netmap.DiscoPublic, m disco.Message) {
	pkt := disco.Seal(b.opts.DiscoKey, dk, m)
	if err := b.std.Send([][]byte{pkt}, stdEndpoint(to)); err != nil {
		b.log.Debug("disco send", "to", to, "err", err)
	}
}

func (b *Bind) sendDiscoDERP(p *peer, regionID int, dk netmap.DiscoPublic, m disco.Message) {
	r := b.region(regionID)
	if r == nil {
		return
	}
	if err := r.client.Send(p.key, disco.Seal(b.opts.DiscoKey, dk, m)); err != nil {
		b.log.Debug("disco send via DERP", "region", regionID, "err", err)
	}
}

// handleDisco handles a disco packet from src (a UDP address, or the DERP
// magic address when r is set, with derpSrc the relay's sender key).
func (b *Bind) handleDisco(pkt []byte, src netip.AddrPort, r *region, derpSrc netmap.NodePublic) {
	sender, err := disco.Sender(pkt)
	if err != nil {
		return
	}
	b.mu.Lock()
	p := b.byDisco[sender]
	b.mu.Unlock()
	if p == nil {
		return // not a peer of ours (or its disco key is not in our map yet)
	}
	_, msg, err := disco.Open(b.opts.DiscoKey, pkt)
	if err != nil {
		b.log.Debug("disco: bad packet", "src", src, "err", err)
		return
	}
	if r != nil && derpSrc != p.key {
		return // a relayed disco packet must come from its peer's own key
	}
	now := time.Now()
	switch m := msg.(type) {
	case disco.Ping:
		if m.NodeKey != p.key {
			return
		}
		pong := disco.Pong{TxID: m.TxID, Src: src}
		if r != nil {
			b.sendDiscoDERP(p, r.id, sender, pong)
			return
		}
		p.mu.Lock()
		p.sel.PingedFrom(now, src)
		p.mu.Unlock()
		b.learnAddr(src, p)
		b.sendDiscoUDP(src, sender, pong)
		b.kick()
	case disco.Pong:
		if r == nil {
			p.mu.Lock()
			probe, res := b.pmtuPongLocked(p, now, m.TxID, src)
			ok := !probe && p.sel.HandlePong(now, m.TxID, src)
			name := p.name
			p.mu.Unlock()
			if probe {
				b.logPMTU(p.key, name, res)
				return
			}
			if ok {
				b.learnAddr(src, p)
				b.sendHeld(p) // the first direct path, perhaps
			}
		}
		b.mu.Lock()
		w := b.waiters[m.TxID]
		delete(b.waiters, m.TxID)
		b.mu.Unlock()
		if w != nil && w.p == p {
			p.mu.Lock()
			res := PingResult{Latency: now.Sub(w.sent), Peer: p.name}
			p.mu.Unlock()
			if r != nil {
				res.Path, res.DERPRegion, res.DERPCode = PathDERP, r.id, r.code
			} else {
				res.Path, res.Addr = PathDirect, src
				b.learnAddr(src, p)
			}
			select {
			case w.result <- res:
			default:
			}
		}
	case disco.CallMeMaybe:
		if r == nil {
			return // only meaningful through the relay
		}
		p.mu.Lock()
		for _, ep := range m.Endpoints {
			p.sel.AddCandidate(ep, endpoint.FromCallMeMaybe)
		}
		// NoteActivity wakes an idle peer so the selector probes; new
		// candidates are pinged at the next Poll, which the kick makes
		// immediate.
		p.sel.NoteActivity(now)
		join := p.joinLoopLocked()
		p.mu.Unlock()
		if join {
			b.joinLoop(p)
		}
		b.kick()
		// The peer is pinging us right now: ping every endpoint it listed
		// at once too, known or not, so our NAT opens towards it while
		// its pings are on the way (simultaneous open). These pings are
		// not the selector's: their pongs only tell the peer, whose pings
		// now get through, and our own next probe finds the path.
		for _, ep := range m.Endpoints {
			b.sendDiscoUDP(ep, sender, disco.Ping{TxID: disco.NewTxID(), NodeKey: b.selfPK})
		}
	}
}

// PingResult is the answer to one Ping.
type PingResult struct {
	Peer string // the peer's hostname
	// Path is PathDirect (Addr is where the pong came from) or PathDERP
	// (through DERPRegion).
	Path       string
	Addr       netip.AddrPort
	DERPRegion int
	DERPCode   string
	Latency    time.Duration
}

// Ping sends a disco ping to the peer with key k over every path at once
// (each candidate address and its home relay) and returns the first pong,
// preferring a direct one that arrives shortly after a relayed one. Direct
// pongs also teach the bind the path.
func (b *Bind) Ping(ctx context.Context, k netmap.NodePublic) (PingResult, error) {
	b.mu.Lock()
	p := b.peers[k]
	open := b.open != nil
	b.mu.Unlock()
	if p == nil {
		return PingResult{}, fmt.Errorf("ping: %s is not a peer", k.ShortString())
	}
	if !open {
		return PingResult{}, fmt.Errorf("ping: the data plane is not up")
	}
	now := time.Now()
	p.mu.Lock()
	p.sel.NoteActivity(now) // a ping is a reason to look for paths
	dk, home, name := p.disco, p.home, p.name
	cands := slices.Clone(p.cands)
	for _, c := range p.sel.State(now).Candidates {
		cands = append(cands, c.Addr)
	}
	p.mu.Unlock()
	if dk.IsZero() {
		return PingResult{}, fmt.Errorf("ping: the peer has no disco key (too old, or not connected yet)")
	}
	slices.SortFunc(cands, func(x, y netip.AddrPort) int { return x.Compare(y) })
	cands = slices.Compact(cands)
	res := make(chan PingResult, len(cands)+1)
	var txs []disco.TxID
	newWaiter := func() disco.TxID {
		tx := disco.NewTxID()
		b.mu.Lock()
		b.waiters[tx] = &pingWaiter{p: p, sent: time.Now(), result: res}
		b.mu.Unlock()
		txs = append(txs, tx)
		return tx
	}
	defer func() {
		b.mu.Lock()
		for _, tx := range txs {
			delete(b.waiters, tx)
		}
		b.mu.Unlock()
	}()
	for _, c := range cands {
		b.sendDiscoUDP(c, dk, disco.Ping{TxID: newWaiter(), NodeKey: b.selfPK})
	}
	if home != 0 {
		b.sendDiscoDERP(p, home, dk, disco.Ping{TxID: newWaiter(), NodeKey: b.selfPK})
	}
	b.kick()
	var first PingResult
	select {
	case first = <-res:
	case <-ctx.Done():
		return PingResult{}, fmt.Errorf("ping %s: no reply: %w", name, ctx.Err())
	}
	if first.Path == PathDirect {
		return first, nil
	}
	// A direct pong usually beats the relay; give a slower one a moment.
	t := time.NewTimer(min(first.Latency/2+20*time.Millisecond, 250*time.Millisecond))
	defer t.Stop()
	select {
	case r := <-res:
		if r.Path == PathDirect {
			return r, nil
		}
	case <-t.C:
	case <-ctx.Done():
	}
	return first, nil
}

// reprobeAll starts a probe round (with call-me-maybe) to every peer, so
// peers learn a new public endpoint of ours and punch through to it at once
// rather than at their next scheduled round.
func (b *Bind) reprobeAll() {
	b.mu.Lock()
	peers := make([]*peer, 0, len(b.peers))
	for _, p := range b.peers {
		peers = append(peers, p)
	}
	b.mu.Unlock()
	for _, p := range peers {
		p.mu.Lock()
		p.sel.Reprobe()
		p.mu.Unlock()
	}
	b.kick()
}
