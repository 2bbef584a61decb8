package tunwrap

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gaissmai/bart"

	"meshd.dev/meshd/netmap"
)

// Activation is why a peer is being configured in WireGuard.
type Activation uint8

const (
	// ActivateOutbound: a packet from the TUN is addressed to the peer.
	ActivateOutbound Activation = iota + 1
	// ActivateHandshake: the peer's handshake initiation arrived.
	ActivateHandshake
	// ActivateStale: a data packet arrived under a session we do not have
	// (we restarted or trimmed it): we must start a handshake at once, or
	// the peer waits out WireGuard's 15 s timeout.
	ActivateStale
)

// Peer is one peer's data path state, shared between the data path
// (lock-free reads) and the engine's configurer, which puts the peer into
// WireGuard when traffic needs it and takes it out when idle.
type Peer struct {
	key netmap.NodePublic
	// last is when a data packet last went to or came from the peer, in
	// nanoseconds since the table's epoch; updated at most once a second.
	last       atomic.Int64
	configured atomic.Bool

	// clampMTU, when > 0, is the largest overlay packet the peer's direct
	// path carries, below the overlay MTU: larger packets to the peer are
	// answered with an ICMP error, and TCP SYNs to and from it get their
	// MSS clamped to fit.
	clampMTU atomic.Int32
	// lastTooBig is when the last ICMP error for a packet to the peer was
	// sent (nanoseconds since the epoch); errors are rate limited like a
	// router's.
	lastTooBig atomic.Int64

	mu     sync.Mutex
	ready  chan struct{} // non-nil while an activation is queued; closed when done
	reason Activation
}

// Key is the peer's node key.
func (pa *Peer) Key() netmap.NodePublic { return pa.key }

// Configured reports whether the peer is in WireGuard now.
func (pa *Peer) Configured() bool { return pa.configured.Load() }

// Reason is why the queued activation of pa was asked for; the strongest
// reason wins when several packets asked.
func (pa *Peer) Reason() Activation {
	pa.mu.Lock()
	defer pa.mu.Unlock()
	return pa.reason
}

// Touch records data activity at now (Peers.Now).
func (pa *Peer) Touch(now int64) {
	// Read-mostly: a store per packet would bounce the cache line between
	// the cores encrypting for this peer.
	if last := pa.last.Load(); last == 0 || now-last > int64(time.Second) {
		pa.last.Store(now)
	}
}

// Finish wakes everyone waiting on pa's activation; the configurer calls
// it for every peer it took from Activations, configured or not.
func (pa *Peer) Finish() {
	pa.mu.Lock()
	if pa.ready != nil {
		close(pa.ready)
		pa.ready = nil
	}
	pa.mu.Unlock()
}

// Peers is the table of every peer of the network map, by node key and by
// the prefixes it routes, with their data path state. The tables are
// replaced whole (Publish) and read without locks.
type Peers struct {
	epoch   time.Time
	byKey   atomic.Pointer[map[netmap.NodePublic]*Peer]
	byAddr  atomic.Pointer[bart.Table[*Peer]]
	queue   chan *Peer
	closing chan struct{} // closed by Close
	close   sync.Once
	// clamping counts peers with clampMTU set, so that the inbound path
	// looks at nothing while no path needs clamping.
	clamping atomic.Int32
}

// NewPeers returns an empty table.
func NewPeers() *Peers {
	l := &Peers{epoch: time.Now(), queue: make(chan *Peer, 256), closing: make(chan struct{})}
	l.byKey.Store(&map[netmap.NodePublic]*Peer{})
	l.byAddr.Store(&bart.Table[*Peer]{})
	return l
}

// Now is the table's clock: nanoseconds since it was made.
func (l *Peers) Now() int64 { return int64(time.Since(l.epoch)) }

// Close releases every wait for an activation, now and later: the device
// is closing, and wireguard-go's Close waits for the very goroutines that
// wait.
func (l *Peers) Close() { l.close.Do(func() { close(l.closing) }) }

// Publish installs the tables for the peers in want (each with the
// prefixes it routes), keeping the state of peers that stay. configured
// says which are in WireGuard.
func (l *Peers) Publish(want map[netmap.NodePublic][]netip.Prefix, configured func(netmap.NodePublic) bool) {
	old := *l.byKey.Load()
	byKey := make(map[netmap.NodePublic]*Peer, len(want))
	byAddr := &bart.Table[*Peer]{}
	for k, prefixes := range want {
		pa := old[k]
		if pa == nil {
			pa = &Peer{key: k}
		}
		pa.configured.Store(configured(k))
		byKey[k] = pa
		for _, p := range prefixes {
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
			pa.Finish()
		}
	}
	l.byKey.Store(&byKey)
	l.byAddr.Store(byAddr)
}

// Lookup returns the peer with node key k, or nil.
func (l *Peers) Lookup(k netmap.NodePublic) *Peer { return (*l.byKey.Load())[k] }

// minClampMTU is the smallest path MTU clamped to: IPv6's minimum, below
// which the MSS would make no sense.
const minClampMTU = 1280

// SetPathMTU is the magic bind's path MTU hook: a peer whose direct path
// loses packets above pathMTU gets too-big replies and TCP MSS clamping,
// one whose path carries full-size packets again loses them.
func (l *Peers) SetPathMTU(k netmap.NodePublic, pathMTU int, lost bool) {
	pa := l.Lookup(k)
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

// Ensure makes sure pa is configured in WireGuard, queueing it for the
// configurer (Activations) and waiting until that is done, abort closes or
// the table closes. It reports whether the peer is configured.
func (l *Peers) Ensure(pa *Peer, why Activation, abort <-chan struct{}) bool {
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
	} else if why == ActivateStale {
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

// Activations delivers the peers waiting to be configured.
func (l *Peers) Activations() <-chan *Peer { return l.queue }

// Configured records that pa is now in WireGuard, with data activity now
// (its idle time starts over).
func (l *Peers) Configured(pa *Peer) {
	pa.last.Store(l.Now())
	pa.configured.Store(true)
}

// TrimIfIdle marks pa as leaving WireGuard if it has had no data for idle,
// and reports whether it did; the configurer then removes it, or calls
// Configured again if it could not.
func (l *Peers) TrimIfIdle(pa *Peer, idle time.Duration) bool {
	if l.Now()-pa.last.Load() < int64(idle) {
		return false
	}
	// Unflag first, then look again: a packet that saw the flag set just
	// before is one WireGuard may now drop (the next one waits for a fresh
	// activation); one that touched it since keeps it.
	pa.configured.Store(false)
	if l.Now()-pa.last.Load() < int64(idle) {
		pa.configured.Store(true)
		return false
	}
	return true
}
