package agent

import (
	"context"
	"net/netip"
	"sync"
	"time"

	"golang.zx2c4.com/wireguard/conn"

	"meshd.dev/meshd/agent/tunwrap"
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
// The peer table and the outbound side live in package tunwrap; the
// inbound side (lazyBind) and the configurer (runLazy) are here.

// DefaultPeerIdleTimeout is how long a peer stays configured in WireGuard
// without data packets (Tailscale trims after 5 minutes too).
const DefaultPeerIdleTimeout = 5 * time.Minute

// publishPeers gives the peer table the peers of want and which of them
// are configured. The caller holds e.mu.
func (e *engine) publishPeers(want map[netmap.NodePublic]wgPeer) {
	addrs := make(map[netmap.NodePublic][]netip.Prefix, len(want))
	for k, w := range want {
		addrs[k] = w.AllowedIPs
	}
	e.lazy.Publish(addrs, func(k netmap.NodePublic) bool {
		_, ok := e.peers[k]
		return ok
	})
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
	var batch []*tunwrap.Peer
	for {
		select {
		case <-ctx.Done():
			return
		case pa := <-l.Activations():
			batch = append(batch[:0], pa)
		drain:
			for len(batch) < cap(l.Activations()) {
				select {
				case pa := <-l.Activations():
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
func (e *engine) activate(batch []*tunwrap.Peer) {
	e.mu.Lock()
	next := make(map[netmap.NodePublic]wgPeer, len(e.peers)+len(batch))
	for k, p := range e.peers {
		next[k] = p
	}
	var added []*tunwrap.Peer
	for _, pa := range batch {
		w, ok := e.want[pa.Key()]
		if _, have := next[pa.Key()]; !ok || have {
			continue
		}
		// A peer that lost the session must hear from us at once: turning
		// on persistent keepalive sends one now, which starts a handshake.
		w.Keepalive = pa.Reason() == tunwrap.ActivateStale
		next[pa.Key()] = w
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
		e.lazy.Configured(pa)
	}
	e.mu.Unlock()
	for _, pa := range batch {
		pa.Finish()
	}
	if len(added) > 0 {
		e.cfg.log.Debug("WireGuard peers configured on demand", "added", len(added), "configured", len(next))
	}
}

// trim removes peers idle for longer than peerIdle from the device.
func (e *engine) trim() {
	l := e.lazy
	e.mu.Lock()
	defer e.mu.Unlock()
	var gone []*tunwrap.Peer
	for k := range e.peers {
		if pa := l.Lookup(k); pa != nil && l.TrimIfIdle(pa, e.cfg.peerIdle) {
			gone = append(gone, pa)
		}
	}
	if len(gone) == 0 {
		return
	}
	next := make(map[netmap.NodePublic]wgPeer, len(e.peers))
	for k, p := range e.peers {
		next[k] = p
	}
	for _, pa := range gone {
		delete(next, pa.Key())
	}
	if err := e.dev.IpcSet(uapiDiff(e.peers, next)); err != nil {
		for _, pa := range gone {
			l.Configured(pa) // still in the device; idle again from now
		}
		e.cfg.log.Warn("remove idle WireGuard peers", "peers", len(gone), "err", err)
		return
	}
	e.peers = next
	e.cfg.log.Debug("idle WireGuard peers removed", "removed", len(gone), "configured", len(next))
}

// keyedEndpoint is an endpoint that names its peer (the magic bind's).
type keyedEndpoint interface {
	Key() netmap.NodePublic
}

// lazyBind wraps the magic bind so that WireGuard packets from peers not
// yet in the device configure them first.
type lazyBind struct {
	conn.Bind
	l *tunwrap.Peers

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
		now := b.l.Now()
		var lastEP conn.Endpoint
		var last *tunwrap.Peer
		for i := 0; i < n; i++ {
			if sizes[i] < 1 {
				continue
			}
			pa := last
			if eps[i] != lastEP {
				pa = nil
				if ke, ok := eps[i].(keyedEndpoint); ok {
					pa = b.l.Lookup(ke.Key())
				}
				lastEP, last = eps[i], pa
			}
			if pa == nil {
				continue
			}
			var why tunwrap.Activation
			switch packets[i][0] {
			case wgData:
				if sizes[i] <= wgKeepaliveSize {
					continue
				}
				pa.Touch(now)
				why = tunwrap.ActivateStale
			case wgInitiation:
				why = tunwrap.ActivateHandshake
			default:
				continue
			}
			if !pa.Configured() {
				b.l.Ensure(pa, why, abort)
			}
		}
		return n, err
	}
}
