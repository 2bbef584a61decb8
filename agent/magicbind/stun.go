package magicbind

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"time"

	"meshd.dev/meshd/nat/stun"
	"meshd.dev/meshd/netmap"
)

// stunWait is how long a STUN round waits for answers before choosing the
// home region: regions slower than this are not worth relaying through.
const stunWait = time.Second

type stunProbe struct {
	region int
	sent   time.Time
}

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
		node := relayNode(&reg)
		if node == nil {
			continue
		}
		addr := net.JoinHostPort(node.Host, strconv.Itoa(node.DERPPort))
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
