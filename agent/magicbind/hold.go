package magicbind

import (
	"context"
	"errors"
	"hash/maphash"
	"log/slog"
	"sync"
	"time"
)

// WireGuard's handshake messages (wireguard-go device/noise-protocol.go:
// MessageInitiationType/Size, MessageResponseType/Size) and its handshake
// retry interval (device/constants.go: RekeyTimeout).
const (
	wgInitiationType = 1
	wgInitiationSize = 148
	wgResponseType   = 2
	wgResponseSize   = 92
	wgRekeyTimeout   = 5 * time.Second
)

// holdFor is how long a held handshake message stays worth sending.
//
// Holding one for less than RekeyTimeout is indistinguishable, for
// WireGuard, from the network delaying it, which the protocol tolerates:
// the initiator waits in handshakeInitiationCreated with the same
// ephemeral key and sender index until it makes a fresh initiation after
// RekeyTimeout, so a late response still completes the handshake; the
// responder accepts an initiation whose TAI64N timestamp is newer than the
// last one it consumed from that peer, so a late initiation is as good as
// a prompt one; a copy that arrives twice is dropped before WireGuard
// (handshakeDedup), which does not always catch it as a replay. A
// message older than that answers or starts a handshake WireGuard has
// given up (a response to it matches no sender index) and could trip the
// responder's 20 ms initiation flood limit just before the fresh one: it
// is dropped.
const holdFor = wgRekeyTimeout

// isInitiation reports whether pkt is a WireGuard handshake initiation:
// the type is a little-endian uint32 whose upper bytes are zero.
func isInitiation(pkt []byte) bool {
	return len(pkt) == wgInitiationSize && pkt[0] == wgInitiationType && pkt[1] == 0 && pkt[2] == 0 && pkt[3] == 0
}

// isHandshake reports whether pkt is a WireGuard handshake initiation or
// response.
func isHandshake(pkt []byte) bool {
	return isInitiation(pkt) ||
		len(pkt) == wgResponseSize && pkt[0] == wgResponseType && pkt[1] == 0 && pkt[2] == 0 && pkt[3] == 0
}

// hold keeps the last handshake message in bufs, which could not be sent
// to p for want of a path or went only to a guess (published endpoints:
// the peer drops packets from an address its map does not have yet), so
// that sendHeld can send it as soon as a sure path appears instead of
// WireGuard retrying only after RekeyTimeout. It reports whether bufs had
// one. Data is not held: WireGuard stages it until the handshake
// completes; nor are cookie replies, which answer a packet just received.
func (b *Bind) hold(p *peer, bufs [][]byte, now time.Time) bool {
	for i := len(bufs) - 1; i >= 0; i-- {
		if !isHandshake(bufs[i]) {
			continue
		}
		p.mu.Lock()
		if p.held == nil {
			p.held = new([wgInitiationSize]byte)
		}
		p.heldLen = copy(p.held[:], bufs[i])
		p.heldAt = now
		p.mu.Unlock()
		if b.log.Enabled(context.Background(), slog.LevelDebug) { // ShortString allocates
			b.log.Debug("holding handshake message until the peer has a sure path", "peer", p.key.ShortString(), "type", bufs[i][0])
		}
		return true
	}
	return false
}

// sendHeld sends p's held handshake message if it is still fresh and p
// now has a path, keeping it while that path is only a guess; a stale one
// is dropped. Called wherever a path may have appeared: a confirmed direct
// path, a new map (home region, endpoints, DERP map), a relayed packet
// from the peer, and each disco loop round.
func (b *Bind) sendHeld(p *peer) {
	now := time.Now()
	p.mu.Lock()
	if p.heldAt.IsZero() {
		p.mu.Unlock()
		return
	}
	at := p.heldAt
	p.heldAt = time.Time{}
	if now.Sub(at) >= holdFor {
		p.mu.Unlock()
		return
	}
	var pkt [wgInitiationSize]byte
	n := copy(pkt[:], p.held[:p.heldLen])
	p.mu.Unlock()
	sure, err := b.send(p, [][]byte{pkt[:n]}, now)
	if errors.Is(err, errNoPath) || err == nil && !sure {
		// Keep it for a better path, with its age: a guess that reached
		// the peer makes a later copy a replay, which the peer drops.
		p.mu.Lock()
		if p.heldAt.IsZero() { // not superseded meanwhile
			p.heldLen = copy(p.held[:], pkt[:n])
			p.heldAt = at
		}
		p.mu.Unlock()
	}
	if err != nil && !errors.Is(err, errNoPath) {
		b.log.Debug("sending held handshake message", "peer", p.key.ShortString(), "err", err)
		return
	}
	if err == nil {
		b.log.Debug("sent held handshake message", "peer", p.key.ShortString(), "held", now.Sub(at), "sure", sure)
	}
}

// hasHeldLocked reports whether p holds a handshake message (the caller
// holds p.mu).
func (p *peer) hasHeldLocked() bool { return !p.heldAt.IsZero() }

// handshakeDedup remembers the handshake messages recently handed to
// WireGuard, so that a second copy of one is dropped here. Copies are
// normal: sendHeld sends a held message again once a sure path appears,
// and one sent to a guess and then relayed arrives by both paths.
// WireGuard is meant to drop the later copy as a replay, but wireguard-go
// checks an initiation's timestamp under a read lock and records it under
// the write lock a moment later (device/noise-protocol.go,
// ConsumeMessageInitiation; responses likewise), so two copies taken by
// two handshake workers at once are both consumed. The responder then
// answers twice, keeps only the second session, and the initiator, which
// completed on the first answer, sends data under keys the responder has
// dropped: nothing gets through until WireGuard gives up on the session
// 15 s later (seen in TestPMTULab). Dropping exact copies here fixes that
// for any WireGuard above the bind. Handshake messages are a few per peer
// per two minutes, so a small ring is enough; it costs the data path
// nothing (a length and type check).
type handshakeDedup struct {
	mu   sync.Mutex
	seed maphash.Seed
	next int
	seen [32]struct {
		h  uint64
		at time.Time
	}
}

func (d *handshakeDedup) init() { d.seed = maphash.MakeSeed() }

// dup reports whether the handshake message pkt was handed on within
// holdFor before now, and records it as handed on if not.
func (d *handshakeDedup) dup(pkt []byte, now time.Time) bool {
	h := maphash.Bytes(d.seed, pkt)
	d.mu.Lock()
	defer d.mu.Unlock()
	for i := range d.seen {
		if e := &d.seen[i]; e.h == h && !e.at.IsZero() && now.Sub(e.at) < holdFor {
			return true
		}
	}
	e := &d.seen[d.next]
	e.h, e.at = h, now
	d.next = (d.next + 1) % len(d.seen)
	return false
}
