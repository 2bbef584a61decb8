package magicbind

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"time"

	"golang.zx2c4.com/wireguard/conn"

	"meshd.dev/meshd/nat/disco"
	"meshd.dev/meshd/nat/stun"
	"meshd.dev/meshd/netmap"
)

// stunWait is how long a STUN round waits for answers before choosing the
// home region: regions slower than this are not worth relaying through.
const stunWait = time.Second

// stunLoop measures, from the WireGuard socket itself (so the public
// mapping is the one peers must use), the public endpoint and the latency
// to every region, then picks the home region. It runs a round at Open, on
// DERP map changes and every STUNInterval.
func (b *Bind) stunLoop(o *openState) {
	b.mu.Lock()
	b.startSTUNLocked()
	b.mu.Unlock()
	t := time.NewTicker(b.opts.STUNInterval)
	defer t.Stop()
	for {
		select {
		case <-o.ctx.Done():
			return
		case <-t.C:
			b.mu.Lock()
			b.startSTUNLocked()
			b.mu.Unlock()
		}
	}
}

// startSTUNLocked sends one round of binding requests and schedules the
// evaluation of its answers.
func (b *Bind) startSTUNLocked() {
	o := b.open
	if o == nil {
		return
	}
	dm := b.derpMap
	o.wg.Add(1)
	go func() {
		defer o.wg.Done()
		b.stunRound(o.ctx, dm)
	}()
}

func (b *Bind) stunRound(ctx context.Context, dm netmap.DERPMap) {
	round := time.Now()
	for _, reg := range dm.Regions {
		for _, n := range reg.Nodes {
			// 0 and -1 both mean the node runs no STUN (netmap.DERPNode).
			if n.STUNPort <= 0 {
				continue
			}
			port := n.STUNPort
			addrs, err := resolve(ctx, n.Host)
			if err != nil {
				b.log.Debug("STUN server address", "host", n.Host, "err", err)
				continue
			}
			for _, a := range addrs {
				tx, req := stun.NewRequest()
				b.mu.Lock()
				b.stunTx[tx] = stunProbe{region: reg.ID, sent: time.Now()}
				b.mu.Unlock()
				if err := b.sendDiscoRaw(netip.AddrPortFrom(a, uint16(port)), req); err != nil {
					b.log.Debug("STUN send", "to", a, "err", err)
				}
			}
		}
	}
	select {
	case <-ctx.Done():
		return
	case <-time.After(stunWait):
	}
	b.mu.Lock()
	for tx, pr := range b.stunTx {
		if !pr.sent.After(round.Add(-stunWait)) {
			delete(b.stunTx, tx)
		}
	}
	if !derpMapEqual(b.derpMap, dm) {
		// The map changed during the round (a round started at Open
		// with no map yet, say): the round the change started decides.
		b.mu.Unlock()
		return
	}
	home := b.home
	best := time.Duration(0)
	inMap := func(id int) bool {
		return slices.ContainsFunc(dm.Regions, func(r netmap.DERPRegion) bool { return r.ID == id })
	}
	for id, lat := range b.stunLat {
		if !inMap(id) {
			continue // answered for a region no longer in the map
		}
		if best == 0 || lat < best || (lat == best && id < home) {
			home, best = id, lat
		}
	}
	if best == 0 && !inMap(home) {
		// No STUN answer (UDP blocked, or no STUN servers) and no home
		// yet: every region still relays over TCP, so the one whose
		// relay accepts a TCP connection fastest is home.
		prev := b.home
		b.mu.Unlock()
		home, best = b.fastestRelay(ctx, dm)
		b.mu.Lock()
		if !derpMapEqual(b.derpMap, dm) {
			b.mu.Unlock()
			return
		}
		if b.home != prev {
			// A late STUN answer made a home meanwhile: it measured UDP,
			// which is what peers' direct attempts use; keep it.
			home = b.home
		}
	}
	changed := home != b.home
	b.home = home
	b.stunLat = map[int]time.Duration{}
	if home != 0 {
		b.regionLocked(home) // keep the home connection up
	}
	b.mu.Unlock()
	if changed {
		b.log.Info("home DERP region", "region", home, "latency", best)
		b.notify()
	}
}

// relayDialTimeout bounds one relay's TCP connect when measuring relay
// latency without STUN.
const relayDialTimeout = 2 * time.Second

// fastestRelay measures the TCP connect time to each region's relay (all
// at once) and returns the region that answered first with its latency; the
// first region of the map, latency 0, when none answered; 0 for an empty
// map. Only the TCP handshake is timed, so a relay is not made to do TLS
// for a measurement.
func (b *Bind) fastestRelay(ctx context.Context, dm netmap.DERPMap) (region int, latency time.Duration) {
	if len(dm.Regions) == 0 {
		return 0, 0
	}
	dial := b.opts.DERPDialContext
	if dial == nil {
		dial = (&net.Dialer{}).DialContext
	}
	ctx, cancel := context.WithTimeout(ctx, relayDialTimeout)
	defer cancel()
	type answer struct {
		region int
		lat    time.Duration
	}
	answers := make(chan answer, len(dm.Regions))
	n := 0
	for _, reg := range dm.Regions {
		i := slices.IndexFunc(reg.Nodes, func(n netmap.DERPNode) bool { return !n.STUNOnly && n.DERPPort > 0 })
		if i < 0 {
			continue
		}
		addr := net.JoinHostPort(reg.Nodes[i].Host, strconv.Itoa(reg.Nodes[i].DERPPort))
		n++
		go func(id int) {
			start := time.Now()
			c, err := dial(ctx, "tcp", addr)
			if err != nil {
				answers <- answer{region: id}
				return
			}
			lat := time.Since(start)
			c.Close()
			answers <- answer{region: id, lat: max(lat, time.Nanosecond)}
		}(reg.ID)
	}
	// The dials start together, so the first to connect is the fastest;
	// the others finish into the buffered channel and close their
	// connections.
	for range n {
		if a := <-answers; a.lat > 0 {
			return a.region, a.lat
		}
	}
	b.log.Debug("no relay answered over TCP either; taking the first region", "region", dm.Regions[0].ID)
	return dm.Regions[0].ID, 0
}

func (b *Bind) notify() {
	if b.opts.OnChange != nil {
		b.opts.OnChange()
	}
}

// sendDiscoRaw sends a datagram (STUN) from the WireGuard socket.
func (b *Bind) sendDiscoRaw(to netip.AddrPort, pkt []byte) error {
	return b.std.Send([][]byte{pkt}, stdEndpoint(to))
}

func resolve(ctx context.Context, host string) ([]netip.Addr, error) {
	if a, err := netip.ParseAddr(host); err == nil {
		return []netip.Addr{a.Unmap()}, nil
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	addrs, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
	if err != nil {
		return nil, fmt.Errorf("resolve %s: %w", host, err)
	}
	for i := range addrs {
		addrs[i] = addrs[i].Unmap()
	}
	return addrs, nil
}

// handleSTUN records a binding response that arrived on the socket.
func (b *Bind) handleSTUN(pkt []byte, src netip.AddrPort) {
	tx, mapped, err := stun.ParseResponse(pkt)
	if err != nil {
		return // a request to us, or junk: we are not a STUN server
	}
	now := time.Now()
	b.mu.Lock()
	pr, ok := b.stunTx[tx]
	if !ok {
		b.mu.Unlock()
		return
	}
	delete(b.stunTx, tx)
	lat := now.Sub(pr.sent)
	if cur, ok := b.stunLat[pr.region]; !ok || lat < cur {
		b.stunLat[pr.region] = lat
	}
	mapped = netip.AddrPortFrom(mapped.Addr().Unmap(), mapped.Port())
	changed := false
	if b.home == 0 {
		// The first answer makes a home at once, so peers can reach us
		// through it before the round ends; the round's end picks the
		// fastest.
		b.home = pr.region
		b.regionLocked(pr.region)
		changed = true
	}
	if !slices.Contains(b.stunEps, mapped) {
		b.stunEps = append(b.stunEps, mapped)
		// Keep the newest few: a rebinding NAT leaves stale mappings.
		if len(b.stunEps) > 4 {
			b.stunEps = b.stunEps[len(b.stunEps)-4:]
		}
		changed = true
	}
	b.mu.Unlock()
	if changed {
		b.log.Info("public endpoint from STUN", "endpoint", mapped, "server", src)
		b.reprobeAll()
		b.notify()
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

func stdEndpoint(a netip.AddrPort) *conn.StdNetEndpoint { return &conn.StdNetEndpoint{AddrPort: a} }

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
