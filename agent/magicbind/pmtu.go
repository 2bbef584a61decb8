package magicbind

import (
	"fmt"
	"net/netip"
	"slices"
	"time"

	"meshd.dev/meshd/nat/disco"
	"meshd.dev/meshd/netmap"
)

// Path MTU probing.
//
// A direct path between two jumbo-frame hosts can cross a smaller link
// whose router drops the ICMP "fragmentation needed" it should send (common
// in clouds). Then full-size WireGuard packets, sent with DF, vanish while
// small ones (handshakes, disco pings, keystrokes) get through: the tunnel
// looks up but bulk transfers hang. Each confirmed direct path is therefore
// probed with disco pings padded (inside the sealed box, so no middlebox
// can trim them) to exactly the UDP payload of the largest WireGuard data
// packet the overlay MTU produces, plus a short ladder below it; the
// largest size that draws a pong is the path MTU the peer reports.
//
// DF: wireguard-go's StdNetBind sets no IP_MTU_DISCOVER, so its sockets use
// the kernel default (net.ipv4.ip_no_pmtu_disc=0: IP_PMTUDISC_WANT, and
// the IPv6 equivalent). Every datagram no larger than the cached path MTU
// (the route's, i.e. the interface MTU, until an ICMP lowers it) goes out
// with DF set and whole; a larger one is fragmented locally. So when ICMP is
// lost, nothing lowers the cache, the probes leave whole with DF exactly
// like WireGuard's own full-size packets, and the oversized ones vanish:
// the blackhole is seen. When ICMP does get back, the kernel caches the
// smaller path MTU and fragments both the probes and WireGuard's packets
// locally: they arrive, and the probe rightly reports no loss. The socket is
// shared with WireGuard, so the bind does not change its mode: forcing DF
// (IP_PMTUDISC_DO or PROBE) would turn that working fragmentation into
// EMSGSIZE or silent loss for WireGuard's own packets.

const (
	// wgDataOverhead is what WireGuard adds to an inner packet inside the
	// UDP payload: the 16-byte data header and the 16-byte Poly1305 tag.
	// The IP packet on the wire is then MTU + 60 (IPv4) or + 80 (IPv6).
	wgDataOverhead = 32
	// pmtuAttempts is how often an unanswered size is tried in one round
	// before it counts as lost: one lost datagram must not raise an alarm.
	pmtuAttempts = 3
	// Defaults for Options.PMTUInterval and Options.PMTUTimeout.
	defaultPMTUInterval = 5 * time.Minute
	defaultPMTUTimeout  = time.Second
)

// pmtuLadder are the overlay sizes probed below the overlay MTU: the IPv6
// minimum (which every path must carry), what a 1500-byte underlay carries
// over IPv6, and what a 9000-byte one does.
var pmtuLadder = [...]int{1280, 1420, 8920}

// probeSizes returns the overlay packet sizes to probe for overlay MTU
// mtu, ascending, the largest being mtu itself; sizes whose probe would not
// fit in a disco packet are left out.
func probeSizes(mtu int) []int {
	var sizes []int
	for _, s := range pmtuLadder {
		if s < mtu {
			sizes = append(sizes, s)
		}
	}
	sizes = append(sizes, mtu)
	return slices.DeleteFunc(sizes, func(s int) bool { return s+wgDataOverhead > disco.MaxPacketLen })
}

// pmtuState is one peer's path MTU knowledge; guarded by peer.mu.
type pmtuState struct {
	// addr is the direct path the result is for; a result is shown only
	// while that is the path in use.
	addr     netip.AddrPort
	finished time.Time // end of the last complete round
	known    bool
	pathMTU  int  // largest overlay size that got through; 0: none did
	lost     bool // the full overlay size did not get through
	overlay  int  // the overlay MTU the round tested
	round    *pmtuRound
}

// current reports whether st is a result for direct path addr at overlay
// MTU mtu, the only result worth showing.
func (st *pmtuState) current(addr netip.AddrPort, mtu int) bool {
	return st.known && st.addr == addr && st.overlay == mtu
}

// pmtuRound is a probe round in progress.
type pmtuRound struct {
	addr    netip.AddrPort
	overlay int // the overlay MTU it tests
	sizes   []int
	ok      []bool
	tx      map[disco.TxID]int // ping -> index into sizes
	attempt int
	sent    time.Time
}

// pmtuProbe is a padded ping to send.
type pmtuProbe struct {
	to   netip.AddrPort
	tx   disco.TxID
	size int // overlay packet size it stands for
}

// pmtuResult is a round's conclusion, logged by the caller outside locks.
type pmtuResult struct {
	addr    netip.AddrPort
	pathMTU int
	lost    bool
	overlay int       // the overlay MTU tested
	was     pmtuState // the state before, to log changes only
}

// pmtuPollLocked advances p's probing at now: it returns the pings to send,
// a finished round's result (nil if none finished or nothing changed), and
// when to be polled next (zero: nothing scheduled). Only an active peer on
// a confirmed direct path is probed. Called with p.mu held.
func (b *Bind) pmtuPollLocked(p *peer, now time.Time) (probes []pmtuProbe, res *pmtuResult, wake time.Time) {
	mtu := int(b.overlayMTU.Load())
	if mtu <= 0 {
		return nil, nil, time.Time{}
	}
	st := &p.pmtu
	addr, direct := p.sel.Path(now)
	active := p.sel.Active(now)
	if r := st.round; r != nil {
		if !direct || !active || addr != r.addr {
			// The path changed or went idle mid-round: what came back so
			// far says nothing about the path now in use.
			st.round = nil
		} else if now.Sub(r.sent) >= b.opts.PMTUTimeout {
			if r.attempt >= pmtuAttempts || !slices.Contains(r.ok, false) {
				return nil, b.finishRoundLocked(p, now), now.Add(b.opts.PMTUInterval)
			}
			r.attempt++
			return b.sendRoundLocked(r, now), nil, now.Add(b.opts.PMTUTimeout)
		} else {
			return nil, nil, r.sent.Add(b.opts.PMTUTimeout)
		}
	}
	if !direct || !active {
		return nil, nil, time.Time{}
	}
	// A result for another overlay MTU (SetOverlayMTU changed it) is
	// stale: probe the new size at once.
	if st.known && addr == st.addr && st.overlay == mtu && now.Sub(st.finished) < b.opts.PMTUInterval {
		return nil, nil, st.finished.Add(b.opts.PMTUInterval)
	}
	sizes := probeSizes(mtu)
	r := &pmtuRound{addr: addr, overlay: mtu, sizes: sizes, ok: make([]bool, len(sizes)), tx: map[disco.TxID]int{}, attempt: 1}
	st.round = r
	return b.sendRoundLocked(r, now), nil, now.Add(b.opts.PMTUTimeout)
}

// SetOverlayMTU changes the tunnel MTU the probes test (the agent follows
// the underlay's MTU). Every active direct path is probed again for the new
// size at its next poll; results for the old size stop being shown.
func (b *Bind) SetOverlayMTU(mtu int) {
	if b.overlayMTU.Swap(int64(mtu)) != int64(mtu) {
		b.kick()
	}
}

// sendRoundLocked makes a ping for every size not yet answered.
func (b *Bind) sendRoundLocked(r *pmtuRound, now time.Time) []pmtuProbe {
	r.sent = now
	var probes []pmtuProbe
	for i, size := range r.sizes {
		if r.ok[i] {
			continue
		}
		tx := disco.NewTxID()
		r.tx[tx] = i
		probes = append(probes, pmtuProbe{to: r.addr, tx: tx, size: size})
	}
	return probes
}

// finishRoundLocked records the round's outcome and returns it if it
// differs from what was known for the path.
func (b *Bind) finishRoundLocked(p *peer, now time.Time) *pmtuResult {
	st := &p.pmtu
	r := st.round
	st.round = nil
	largest := 0
	for i, ok := range r.ok {
		if ok {
			largest = r.sizes[i]
		}
	}
	lost := !r.ok[len(r.ok)-1]
	was := *st
	was.round = nil
	st.addr, st.finished, st.known, st.pathMTU, st.lost, st.overlay = r.addr, now, true, largest, lost, r.overlay
	if was.known && was.addr == r.addr && was.pathMTU == largest && was.lost == lost && was.overlay == r.overlay {
		return nil
	}
	return &pmtuResult{addr: r.addr, pathMTU: largest, lost: lost, overlay: r.overlay, was: was}
}

// pmtuPongLocked notes a direct pong from src; it reports whether the pong
// answered a probe (and finishes the round early when every size got
// through). Called with p.mu held.
func (b *Bind) pmtuPongLocked(p *peer, now time.Time, tx disco.TxID, src netip.AddrPort) (probe bool, res *pmtuResult) {
	r := p.pmtu.round
	if r == nil {
		return false, nil
	}
	i, ok := r.tx[tx]
	if !ok {
		return false, nil
	}
	delete(r.tx, tx)
	if src != r.addr {
		return true, nil
	}
	r.ok[i] = true
	if !slices.Contains(r.ok, false) {
		return true, b.finishRoundLocked(p, now)
	}
	return true, nil
}

// sendProbes sends padded pings, each exactly as large as the WireGuard
// data packet its size stands for.
func (b *Bind) sendProbes(probes []pmtuProbe, dk netmap.DiscoPublic) {
	for _, pr := range probes {
		m := disco.Ping{TxID: pr.tx, NodeKey: b.selfPK, Padding: disco.PaddingFor(pr.size + wgDataOverhead)}
		b.sendDiscoUDP(pr.to, dk, m)
	}
}

// logPMTU logs a changed probe result: a warning when full-size packets are
// lost (once per change, not per round), an info line when they cross
// again.
func (b *Bind) logPMTU(k netmap.NodePublic, name string, res *pmtuResult) {
	if res == nil {
		return
	}
	if fn := b.pmtuHook.Load(); fn != nil {
		(*fn)(k, res.pathMTU, res.lost)
	}
	mtu := res.overlay
	switch {
	case res.lost:
		b.log.Warn("path MTU problem: "+MTUProblemText(name, res.pathMTU, mtu),
			"peer", name, "path", res.addr, "path_mtu", res.pathMTU, "overlay_mtu", mtu)
	case res.was.known && res.was.lost:
		b.log.Info("direct path carries full-size packets again", "peer", name, "path", res.addr, "overlay_mtu", mtu)
	default:
		b.log.Debug("direct path carries full-size packets", "peer", name, "path", res.addr, "overlay_mtu", mtu)
	}
}

// MTUProblemText says what is wrong with a direct path that drops
// full-size packets and what to do about it, for logs and `meshd status`.
// pathMTU is the largest overlay size that got through (0: none of the
// probed sizes did).
func MTUProblemText(peer string, pathMTU, overlayMTU int) string {
	if pathMTU == 0 {
		return fmt.Sprintf("peer %s: direct path drops even %d-byte packets (overlay MTU %d): "+
			"allow ICMP fragmentation-needed on the path, or fix the link MTUs between the hosts", peer, probeSizes(overlayMTU)[0], overlayMTU)
	}
	return fmt.Sprintf("peer %s: direct path drops packets over %d bytes (overlay MTU %d; TCP to it is clamped, larger packets are answered with ICMP packet-too-big): "+
		"run `meshd daemon --mtu %d`, or allow ICMP fragmentation-needed on the path", peer, pathMTU, overlayMTU, pathMTU)
}

// SetPathMTUHook registers fn, called from the bind's goroutines whenever a
// peer's probe result changes: the largest overlay packet size its direct
// path carries, and whether that is less than the overlay MTU. The agent
// uses it to clamp TCP MSS towards such peers. fn must not block.
func (b *Bind) SetPathMTUHook(fn func(k netmap.NodePublic, pathMTU int, lost bool)) {
	b.pmtuHook.Store(&fn)
}
