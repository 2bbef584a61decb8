package magicbind

import (
	"net/netip"
	"sync/atomic"

	"meshd.dev/meshd/netmap"
)

// Path indexes of the traffic counters.
const (
	pathDirect = iota
	pathDERP
	numPaths
)

// peerCounters are one peer's traffic counters, for metrics. They are
// atomics outside peer.mu so that a scrape reads them without a lock and
// the data path adds to them once per batch (send) or per run of packets
// from one peer (receive), never through a metrics library.
type peerCounters struct {
	txPackets, txBytes [numPaths]atomic.Uint64
	rxPackets, rxBytes [numPaths]atomic.Uint64
	// pathChanges counts changes of the path sends take: relay to direct,
	// direct to relay, or one direct address to another.
	pathChanges atomic.Uint64
	// handshakesTx counts WireGuard handshake messages (initiations and
	// responses) sent to the peer. Received ones are not counted: telling
	// them apart on the receive path cost every packet a few instructions
	// (bench/README.md), and each one received is answered or answers one
	// sent.
	handshakesTx atomic.Uint64
}

func (c *peerCounters) addTx(path int, bufs [][]byte) {
	var n uint64
	for _, b := range bufs {
		n += uint64(len(b))
	}
	c.txPackets[path].Add(uint64(len(bufs)))
	c.txBytes[path].Add(n)
}

// notePathLocked records the path a send takes (the direct address, or
// zero for the relay) and counts a change from the last one. p.mu held.
func (p *peer) notePathLocked(cur netip.AddrPort) {
	if p.lastPathSet && cur == p.lastPath {
		return
	}
	if p.lastPathSet {
		p.ctr.pathChanges.Add(1)
	}
	p.lastPath, p.lastPathSet = cur, true
	p.sentDirect.Store(cur.IsValid())
}

// countRx adds a run of received packets; p may be nil (no run yet).
func (p *peer) countRx(path int, packets, bytes uint64) {
	if p == nil || packets == 0 {
		return
	}
	p.ctr.rxPackets[path].Add(packets)
	p.ctr.rxBytes[path].Add(bytes)
}

// PeerCounters is a snapshot of one peer's traffic counters since the
// bind was created.
type PeerCounters struct {
	Key netmap.NodePublic
	// Indexed by path: [0] direct UDP, [1] DERP relay.
	TxPackets, TxBytes [2]uint64
	RxPackets, RxBytes [2]uint64
	PathChanges        uint64
	HandshakesTx       uint64
}

// PathNames names the indexes of PeerCounters' arrays, as metric labels.
var PathNames = [2]string{PathDirect, PathDERP}

// Counters calls fn with the counters of every peer the bind knows (the
// map's peers and any WireGuard asked about). fn must not call back into
// the bind.
func (b *Bind) Counters(fn func(PeerCounters)) {
	for k, p := range *b.byKey.Load() {
		c := &p.ctr
		s := PeerCounters{
			Key:          k,
			PathChanges:  c.pathChanges.Load(),
			HandshakesTx: c.handshakesTx.Load(),
		}
		for i := range numPaths {
			s.TxPackets[i], s.TxBytes[i] = c.txPackets[i].Load(), c.txBytes[i].Load()
			s.RxPackets[i], s.RxBytes[i] = c.rxPackets[i].Load(), c.rxBytes[i].Load()
		}
		fn(s)
	}
}

// RelaysConnected reports how many relay connections the bind has and how
// many of them are connected now, for health checks.
func (b *Bind) RelaysConnected() (total, connected int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, r := range b.regions {
		total++
		if r.client.Connected() {
			connected++
		}
	}
	return total, connected
}

// HasDERPMap reports whether the bind has any relay region to use.
func (b *Bind) HasDERPMap() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.derpMap.Regions) > 0
}
