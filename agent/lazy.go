package agent

import (
	"context"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gaissmai/bart"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/tun"

	"meshd.dev/meshd/netmap"
)

// Lazy WireGuard peers.
//
// Every peer wireguard-go knows costs two goroutines, two 1,024-slot queues,
// timers and handshake state, about 30 KB, whether or not it ever sends a
// packet; at 1,000 peers that was most of an idle daemon's memory, at
// 10,000 most of a gigabyte. Like Tailscale's trimmed WireGuard config, the
// engine therefore puts a peer into the device only when traffic needs it:
//
//   - outbound: the first packet from the TUN to a peer's address (after the
//     packet filter accepted it) configures the peer before the packet goes
//     on to wireguard-go, which then starts the handshake;
//   - inbound: the first WireGuard packet the magic bind attributes to a
//     peer (a handshake initiation, or data under a session the peer still
//     holds from before our restart or trim) configures it before the
//     packet reaches wireguard-go;
//
// and takes it out again after PeerIdleTimeout without data either way. The
// packet that triggers configuration waits for it (one UAPI set, well under
// a millisecond), so nothing is lost; the wait is abandoned if the device
// or bind closes, because wireguard-go's Close waits for the very goroutine
// that is waiting. The filter, the magic bind and status keep all peers.

// DefaultPeerIdleTimeout is how long a peer stays configured in WireGuard
// without data packets (Tailscale trims after 5 minutes too).
const DefaultPeerIdleTimeout = 5 * time.Minute

// activation is why a peer is being configured.
type activation uint8

const (
	activateOutbound  activation = iota + 1 // a packet from the TUN
	activateHandshake                       // its handshake initiation arrived
	// activateStale: a data packet arrived under a session we do not have
	// (we restarted or trimmed it): we must start a handshake at once, or
	// the peer waits out WireGuard's 15 s timeout.
	activateStale
)

// peerActivity is one peer's lazy-configuration state, shared between the
// data path (lock-free reads) and the engine's configurer.
type peerActivity struct {
	key netmap.NodePublic
	// last is when a data packet last went to or came from the peer, in
	// nanoseconds since the lazyPeers epoch; updated at most once a second.
	last       atomic.Int64
	configured atomic.Bool

	// clampMTU, when > 0, is the largest overlay packet the peer's direct
	// path carries, below the overlay MTU: TCP SYNs to and from the peer
	// get their MSS clamped to fit it.
	clampMTU atomic.Int32
	// lastPTB is when the last ICMP "packet too big" for a packet to the
	// peer was sent (nanoseconds since the epoch); errors are rate
	// limited like a router's.
	lastPTB atomic.Int64

	mu     sync.Mutex
	ready  chan struct{} // non-nil while an activation is queued; closed when done
	reason activation
}

// touch records data activity at now (nanoseconds since the epoch).
func (pa *peerActivity) touch(now int64) {
	// Read-mostly: a store per packet would bounce the cache line between
	// the cores encrypting for this peer.
	if last := pa.last.Load(); last == 0 || now-last > int64(time.Second) {
		pa.last.Store(now)
	}
}

// lazyPeers is the engine's table of peers for lazy configuration.
type lazyPeers struct {
	epoch   time.Time
	byKey   atomic.Pointer[map[netmap.NodePublic]*peerActivity]
	byAddr  atomic.Pointer[bart.Table[*peerActivity]]
	queue   chan *peerActivity
	closing chan struct{} // closed before the device closes
	// clamping counts peers with clampMTU set, so that the inbound path
	// looks at nothing while no path needs clamping.
	clamping atomic.Int32
}

func newLazyPeers() *lazyPeers {
	l := &lazyPeers{epoch: time.Now(), queue: make(chan *peerActivity, 256), closing: make(chan struct{})}
	l.byKey.Store(&map[netmap.NodePublic]*peerActivity{})
	l.byAddr.Store(&bart.Table[*peerActivity]{})
	return l
}

func (l *lazyPeers) now() int64 { return int64(time.Since(l.epoch)) }

// publish installs the tables for the peers in want, keeping the state of
// peers that stay. configured says which are in the device.
func (l *lazyPeers) publish(want map[netmap.NodePublic]wgPeer, configured map[netmap.NodePublic]wgPeer) {
	old := *l.byKey.Load()
	byKey := make(map[netmap.NodePublic]*peerActivity, len(want))
	byAddr := &bart.Table[*peerActivity]{}
	for k, w := range want {
		pa := old[k]
		if pa == nil {
			pa = &peerActivity{key: k}
		}
		_, ok := configured[k]
		pa.configured.Store(ok)
		byKey[k] = pa
		for _, p := range w.AllowedIPs {
			byAddr.Insert(p, pa)
		}
	}
	// Peers that left the map: anything waiting on them gives up (the
	// packet is then dropped by WireGuard, which has no such peer).
	for k, pa := range old {
		if _, ok := byKey[k]; !ok {
			pa.configured.Store(false)
			if pa.clampMTU.Swap(0) > 0 {
				l.clamping.Add(-1)
			}
			pa.finish()
		}
	}
	l.byKey.Store(&byKey)
	l.byAddr.Store(byAddr)
}

// setPathMTU is the magic bind's path MTU hook: a peer whose direct path
// loses packets above pathMTU gets TCP MSS clamping, one whose path
// carries full-size packets again loses it.
func (l *lazyPeers) setPathMTU(k netmap.NodePublic, pathMTU int, lost bool) {
	pa := (*l.byKey.Load())[k]
	if pa == nil {
		return
	}
	v := int32(0)
	if lost && pathMTU >= minClampMTU {
		v = int32(pathMTU)
	}
	switch old := pa.clampMTU.Swap(v); {
	case old == 0 && v > 0:
		l.clamping.Add(1)
	case old > 0 && v == 0:
		l.clamping.Add(-1)
	}
}

// minClampMTU is the smallest path MTU clamped to: IPv6's minimum, below
// which the MSS would make no sense.
const minClampMTU = 1280

// clampSYN clamps the MSS of a TCP SYN in pkt to fit a path that carries
// overlay packets of up to mtu bytes.
func clampSYN(pkt []byte, mtu int32) {
	hdr := int32(40) // IPv4 + TCP
	if len(pkt) > 0 && pkt[0]>>4 == 6 {
		hdr = 60
	}
	ClampMSS(pkt, uint16(mtu-hdr))
}

// sameShape reports whether want has exactly the keys and addresses the
// published tables were built from, so that maps which change only
// endpoints or online state cost no rebuild.
func sameShape(a, b map[netmap.NodePublic]wgPeer) bool {
	if len(a) != len(b) {
		return false
	}
	for k, x := range a {
		y, ok := b[k]
		if !ok || !x.equalIPs(y) {
			return false
		}
	}
	return true
}

// ensure makes sure pa is configured in the device, queueing it for the
// configurer and waiting until it is done or abort closes. It reports
// whether the peer is configured.
func (l *lazyPeers) ensure(pa *peerActivity, why activation, abort <-chan struct{}) bool {
	if pa.configured.Load() {
		return true
	}
	pa.mu.Lock()
	if pa.configured.Load() {
		pa.mu.Unlock()
		return true
	}
	queued := pa.ready != nil
	if !queued {
		pa.ready = make(chan struct{})
		pa.reason = why
	} else if why == activateStale {
		pa.reason = why // the stronger need: a handshake from our side
	}
	ready := pa.ready
	pa.mu.Unlock()
	if !queued {
		select {
		case l.queue <- pa:
		case <-abort:
			return false
		case <-l.closing:
			return false
		}
	}
	select {
	case <-ready:
		return pa.configured.Load()
	case <-abort:
	case <-l.closing:
	}
	return false
}

// finish wakes everyone waiting on pa's activation.
func (pa *peerActivity) finish() {
	pa.mu.Lock()
	if pa.ready != nil {
		close(pa.ready)
		pa.ready = nil
	}
	pa.mu.Unlock()
}

// runLazy is the configurer: it adds queued peers to the device and trims
// idle ones, until ctx ends.
func (e *engine) runLazy(ctx context.Context) {
	l := e.lazy
	var trimTick <-chan time.Time // nil, never ready, when nothing is trimmed
	if e.lazyOn {
		t := time.NewTicker(min(max(e.cfg.peerIdle/4, time.Second), 30*time.Second))
		defer t.Stop()
		trimTick = t.C
	}
	var batch []*peerActivity
	for {
		select {
		case <-ctx.Done():
			return
		case pa := <-l.queue:
			batch = append(batch[:0], pa)
		drain:
			for len(batch) < cap(l.queue) {
				select {
				case pa := <-l.queue:
					batch = append(batch, pa)
				default:
					break drain
				}
			}
			e.activate(batch)
		case <-trimTick:
			e.trim()
		}
	}
}

// activate adds the peers in batch to the device in one UAPI set.
func (e *engine) activate(batch []*peerActivity) {
	e.mu.Lock()
	next := make(map[netmap.NodePublic]wgPeer, len(e.peers)+len(batch))
	for k, p := range e.peers {
		next[k] = p
	}
	now := e.lazy.now()
	var added []*peerActivity
	for _, pa := range batch {
		w, ok := e.want[pa.key]
		if _, have := next[pa.key]; !ok || have {
			continue
		}
		pa.mu.Lock()
		// A peer that lost the session must hear from us at once: turning
		// on persistent keepalive sends one now, which starts a handshake.
		w.Keepalive = pa.reason == activateStale
		pa.mu.Unlock()
		next[pa.key] = w
		pa.last.Store(now)
		added = append(added, pa)
	}
	if diff := uapiDiff(e.peers, next); diff != "" {
		if err := e.dev.IpcSet(diff); err != nil {
			e.cfg.log.Warn("configure WireGuard peer on first packet", "peers", len(added), "err", err)
			added = nil
		} else {
			e.peers = next
		}
	}
	for _, pa := range added {
		pa.configured.Store(true)
	}
	e.mu.Unlock()
	for _, pa := range batch {
		pa.finish()
	}
	if len(added) > 0 {
		e.cfg.log.Debug("WireGuard peers configured on demand", "added", len(added), "configured", len(next))
	}
}

// trim removes peers idle for longer than peerIdle from the device.
func (e *engine) trim() {
	l := e.lazy
	byKey := *l.byKey.Load()
	e.mu.Lock()
	defer e.mu.Unlock()
	idle := int64(e.cfg.peerIdle)
	var gone []*peerActivity
	for k := range e.peers {
		pa := byKey[k]
		if pa == nil || l.now()-pa.last.Load() < idle {
			continue
		}
		// Unflag first, then look again: a packet that saw the flag set
		// just before is one WireGuard may now drop (the next one waits
		// for a fresh activation); one that touched it since keeps it.
		pa.configured.Store(false)
		if l.now()-pa.last.Load() < idle {
			pa.configured.Store(true)
			continue
		}
		gone = append(gone, pa)
	}
	if len(gone) == 0 {
		return
	}
	next := make(map[netmap.NodePublic]wgPeer, len(e.peers))
	for k, p := range e.peers {
		next[k] = p
	}
	for _, pa := range gone {
		delete(next, pa.key)
	}
	if err := e.dev.IpcSet(uapiDiff(e.peers, next)); err != nil {
		for _, pa := range gone {
			pa.configured.Store(true)
		}
		e.cfg.log.Warn("remove idle WireGuard peers", "peers", len(gone), "err", err)
		return
	}
	e.peers = next
	e.cfg.log.Debug("idle WireGuard peers removed", "removed", len(gone), "configured", len(next))
}

// lazyTUN sits between the packet filter and wireguard-go and configures
// the peer of every outbound packet's destination before WireGuard sees it.
type lazyTUN struct {
	tun.Device
	l *lazyPeers
	// raw is the TUN itself, under the filter: ICMP errors this host
	// generates go straight to it. nil sends none.
	raw tun.Device
	log *slog.Logger
	// ptb holds the ICMP error being written; only Read uses it, and
	// wireguard-go reads from one goroutine.
	ptb    []byte
	ptbOut [][]byte
}

// ptbInterval is the least time between two ICMP errors about one peer's
// path: the sender's kernel learns the path MTU from the first; the rest
// of a burst already built too big is only dropped.
const ptbInterval = 10 * time.Millisecond

// Read reads a batch and activates the peers it is addressed to. Packets
// the filter dropped (size 0) are skipped; a run of packets to one
// destination costs one lookup.
func (t *lazyTUN) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	n, err := t.Device.Read(bufs, sizes, offset)
	if n <= 0 {
		return n, err
	}
	table := t.l.byAddr.Load()
	now := t.l.now()
	var lastDst netip.Addr
	var last *peerActivity
	for i := 0; i < n; i++ {
		if sizes[i] < 1 {
			continue
		}
		dst, ok := packetDst(bufs[i][offset : offset+sizes[i]])
		if !ok {
			continue
		}
		pa := last
		if dst != lastDst {
			pa, _ = table.Lookup(dst)
			lastDst, last = dst, pa
		}
		if pa == nil {
			continue
		}
		if m := pa.clampMTU.Load(); m > 0 {
			if sizes[i] > int(m) {
				// The direct path would drop it: drop it here and tell
				// the sender, as a router with that MTU would.
				t.packetTooBig(pa, bufs[i][offset:offset+sizes[i]], int(m), offset, now)
				sizes[i] = 0
				continue
			}
			clampSYN(bufs[i][offset:offset+sizes[i]], m)
		}
		pa.touch(now)
		if !pa.configured.Load() {
			t.l.ensure(pa, activateOutbound, nil)
		}
	}
	return n, err
}

// packetTooBig writes the ICMP error for pkt, too big for pa's path of
// mtu bytes, to the TUN, unless one went out for pa within ptbInterval.
func (t *lazyTUN) packetTooBig(pa *peerActivity, pkt []byte, mtu, offset int, now int64) {
	if t.raw == nil {
		return
	}
	if last := pa.lastPTB.Load(); last != 0 && now-last < int64(ptbInterval) {
		return
	}
	if len(t.ptb) < offset+ptbBufLen {
		t.ptb = make([]byte, offset+ptbBufLen)
		t.ptbOut = make([][]byte, 1)
	}
	n := PacketTooBig(t.ptb[offset:], pkt, mtu)
	if n == 0 {
		return
	}
	pa.lastPTB.Store(now)
	t.ptbOut[0] = t.ptb[:offset+n]
	if _, err := t.raw.Write(t.ptbOut, offset); err != nil {
		t.log.Debug("write ICMP packet too big", "err", err)
	}
}

// Write clamps the MSS of TCP SYNs from peers whose direct path is
// smaller than the overlay MTU, so this host's TCP never builds segments
// that path drops; then it writes the batch.
func (t *lazyTUN) Write(bufs [][]byte, offset int) (int, error) {
	if t.l.clamping.Load() > 0 {
		table := t.l.byAddr.Load()
		for _, b := range bufs {
			pkt := b[offset:]
			if !isTCPSYN(pkt) {
				continue
			}
			src, ok := packetSrc(pkt)
			if !ok {
				continue
			}
			if pa, _ := table.Lookup(src); pa != nil {
				if m := pa.clampMTU.Load(); m > 0 {
					clampSYN(pkt, m)
				}
			}
		}
	}
	return t.Device.Write(bufs, offset)
}

// isTCPSYN is a cheap first test for a TCP SYN without IPv6 extension
// headers or IPv4 options beyond what the header length says; ClampMSS
// does the full parse.
func isTCPSYN(p []byte) bool {
	const flagSYN = 0x02
	switch {
	case len(p) >= 20 && p[0]>>4 == 4 && p[9] == 6:
		ihl := int(p[0]&0x0f) * 4
		return len(p) >= ihl+14 && p[ihl+13]&flagSYN != 0
	case len(p) >= 40 && p[0]>>4 == 6 && p[6] == 6:
		return len(p) >= 54 && p[53]&flagSYN != 0
	}
	return false
}

// packetSrc is an IP packet's source address.
func packetSrc(p []byte) (netip.Addr, bool) { return packetAddr(p, 12, 8) }

// packetDst is an IP packet's destination address.
func packetDst(p []byte) (netip.Addr, bool) { return packetAddr(p, 16, 24) }

// packetAddr is the address at offset at4 of an IPv4 header or at6 of an
// IPv6 one.
func packetAddr(p []byte, at4, at6 int) (netip.Addr, bool) {
	if len(p) < 1 {
		return netip.Addr{}, false
	}
	switch p[0] >> 4 {
	case 4:
		if len(p) >= 20 {
			return netip.AddrFrom4([4]byte(p[at4 : at4+4])), true
		}
	case 6:
		if len(p) >= 40 {
			return netip.AddrFrom16([16]byte(p[at6 : at6+16])), true
		}
	}
	return netip.Addr{}, false
}

// keyedEndpoint is an endpoint that names its peer (the magic bind's).
type keyedEndpoint interface {
	Key() netmap.NodePublic
}

// lazyBind wraps the magic bind so that WireGuard packets from peers not
// yet in the device configure them first.
type lazyBind struct {
	conn.Bind
	l *lazyPeers

	mu    sync.Mutex
	abort chan struct{} // closed by Close: wireguard-go waits for receivers
}

// WireGuard message types and the size of a keepalive (a data message with
// an empty payload), which is not activity: a peer that keeps its session
// warm does not keep ours configured.
const (
	wgInitiation    = 1
	wgData          = 4
	wgKeepaliveSize = 32
)

func (b *lazyBind) Open(port uint16) ([]conn.ReceiveFunc, uint16, error) {
	fns, p, err := b.Bind.Open(port)
	if err != nil {
		return nil, 0, err
	}
	abort := make(chan struct{})
	b.mu.Lock()
	b.abort = abort
	b.mu.Unlock()
	out := make([]conn.ReceiveFunc, len(fns))
	for i, fn := range fns {
		out[i] = b.wrap(fn, abort)
	}
	return out, p, nil
}

func (b *lazyBind) Close() error {
	b.mu.Lock()
	if b.abort != nil {
		close(b.abort)
		b.abort = nil
	}
	b.mu.Unlock()
	return b.Bind.Close()
}

func (b *lazyBind) wrap(fn conn.ReceiveFunc, abort <-chan struct{}) conn.ReceiveFunc {
	return func(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		n, err := fn(packets, sizes, eps)
		if n <= 0 {
			return n, err
		}
		byKey := *b.l.byKey.Load()
		now := b.l.now()
		var lastEP conn.Endpoint
		var last *peerActivity
		for i := 0; i < n; i++ {
			if sizes[i] < 1 {
				continue
			}
			pa := last
			if eps[i] != lastEP {
				pa = nil
				if ke, ok := eps[i].(keyedEndpoint); ok {
					pa = byKey[ke.Key()]
				}
				lastEP, last = eps[i], pa
			}
			if pa == nil {
				continue
			}
			var why activation
			switch packets[i][0] {
			case wgData:
				if sizes[i] <= wgKeepaliveSize {
					continue
				}
				pa.touch(now)
				why = activateStale
			case wgInitiation:
				why = activateHandshake
			default:
				continue
			}
			if !pa.configured.Load() {
				b.l.ensure(pa, why, abort)
			}
		}
		return n, err
	}
}
