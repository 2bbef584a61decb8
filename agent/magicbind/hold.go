package magicbind

import (
	"context"
	"errors"
	"log/slog"
	"time"
)

// WireGuard's handshake initiation (wireguard-go device/noise-protocol.go:
// MessageInitiationType, MessageInitiationSize) and its retry interval
// (device/constants.go: RekeyTimeout).
const (
	wgInitiationType = 1
	wgInitiationSize = 148
	wgRekeyTimeout   = 5 * time.Second
)

// holdFor is how long a held initiation stays worth sending. WireGuard
// sends a fresh initiation (new ephemeral key, new sender index) after
// RekeyTimeout, and from then on a response to the old one matches no
// handshake; so does a late copy racing the fresh one, which could also
// trip the responder's 20 ms initiation flood limit and cost the fresh
// one. Before that the initiator still waits in handshakeInitiationCreated
// with the old keys, and the responder accepts any initiation whose
// TAI64N timestamp is newer than the last one it consumed from us: a late
// initiation is as good as a prompt one.
const holdFor = wgRekeyTimeout

// isInitiation reports whether pkt is a WireGuard handshake initiation:
// the type is a little-endian uint32 whose upper bytes are zero.
func isInitiation(pkt []byte) bool {
	return len(pkt) == wgInitiationSize && pkt[0] == wgInitiationType && pkt[1] == 0 && pkt[2] == 0 && pkt[3] == 0
}

// hold keeps the last handshake initiation in bufs, which could not be
// sent to p for want of a path or went only to a guess (published
// endpoints: the peer drops packets from an address its map does not have
// yet), so that sendHeld can send it as soon as a sure path appears
// instead of WireGuard retrying only after RekeyTimeout. It reports
// whether bufs had one. Other packets are not held: WireGuard
// stages data until the handshake completes, and a response or cookie
// reply answers a peer that reached us and so has a path.
func (b *Bind) hold(p *peer, bufs [][]byte, now time.Time) bool {
	for i := len(bufs) - 1; i >= 0; i-- {
		if !isInitiation(bufs[i]) {
			continue
		}
		p.mu.Lock()
		if p.held == nil {
			p.held = new([wgInitiationSize]byte)
		}
		copy(p.held[:], bufs[i])
		p.heldAt = now
		p.mu.Unlock()
		if b.log.Enabled(context.Background(), slog.LevelDebug) { // ShortString allocates
			b.log.Debug("holding handshake initiation until the peer has a sure path", "peer", p.key.ShortString())
		}
		return true
	}
	return false
}

// sendHeld sends p's held initiation if it is still fresh and p now has a
// path, keeping it while that path is only a guess; a stale one is
// dropped. Called wherever a path may have appeared:
// a confirmed direct path, a new map (home region, endpoints, DERP map), a
// relayed packet from the peer, and each disco loop round.
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
	pkt := *p.held
	p.mu.Unlock()
	sure, err := b.send(p, [][]byte{pkt[:]}, now)
	if errors.Is(err, errNoPath) || err == nil && !sure {
		// Keep it for a better path, with its age: a guess that reached
		// the peer makes a later copy a replay, which the peer drops.
		p.mu.Lock()
		if p.heldAt.IsZero() { // not superseded meanwhile
			*p.held = pkt
			p.heldAt = at
		}
		p.mu.Unlock()
	}
	if err != nil && !errors.Is(err, errNoPath) {
		b.log.Debug("sending held handshake initiation", "peer", p.key.ShortString(), "err", err)
		return
	}
	if err == nil {
		b.log.Debug("sent held handshake initiation", "peer", p.key.ShortString(), "held", now.Sub(at), "sure", sure)
	}
}

// hasHeld reports whether p holds an initiation (the caller holds p.mu).
func (p *peer) hasHeldLocked() bool { return !p.heldAt.IsZero() }
