package magicbind

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"golang.zx2c4.com/wireguard/conn"

	"meshd.dev/meshd/derp"
)

// errNoPath is returned by Send for a peer with neither a direct path nor a
// relay; WireGuard retries its handshake later.
var errNoPath = errors.New("magic bind: no path to peer (no direct path yet and no DERP home)")

// Send sends bufs to the peer of ep over its best path. A handshake
// message to a peer with no path yet, or sent only on a guess (to
// published endpoints, or to a relay still connecting), is held and sent
// again when a path appears (hold.go).
func (b *Bind) Send(bufs [][]byte, cep conn.Endpoint) error {
	ep, ok := cep.(*Endpoint)
	if !ok || ep.b != b {
		return fmt.Errorf("magic bind: foreign endpoint %T", cep)
	}
	now := time.Now()
	sure, err := b.send(ep.p, bufs, now)
	switch {
	case err == nil && !sure:
		b.hold(ep.p, bufs, now)
	case errors.Is(err, errNoPath) && b.hold(ep.p, bufs, now):
		return nil
	}
	return err
}

// send sends bufs to p over its best path, or returns errNoPath. It
// reports whether that path is sure: a direct path disco confirmed, or a
// connected relay; not a guess at the peer's published endpoints, which
// may not know our address yet and drop what we send.
func (b *Bind) send(p *peer, bufs [][]byte, now time.Time) (sure bool, err error) {
	p.mu.Lock()
	if len(bufs) == 1 && isHandshake(bufs[0]) {
		p.ctr.handshakesTx.Add(1)
		if !p.heldAt.IsZero() {
			// WireGuard moved to a new handshake: the held message
			// belongs to one whose state is gone.
			p.heldAt = time.Time{}
		}
	}
	kick := now.Sub(p.lastSend) > 500*time.Millisecond
	p.lastSend = now
	p.sel.NoteActivity(now)
	join := p.joinLoopLocked()
	addr, direct := p.sel.Path(now)
	doubt := direct && p.sel.InDoubt(now)
	p.notePathLocked(directOrZero(addr, direct))
	var dst *conn.StdNetEndpoint
	if direct {
		if p.directEP == nil || p.directEP.AddrPort != addr {
			p.directEP = &conn.StdNetEndpoint{AddrPort: addr}
		}
		dst = p.directEP
	}
	home := p.home
	if home == 0 {
		home = p.heardVia
	}
	p.mu.Unlock()
	if join {
		b.joinLoop(p)
	} else if kick {
		b.kick()
	}
	if direct {
		err := b.std.Send(bufs, dst)
		if err == nil {
			p.ctr.addTx(pathDirect, bufs)
		}
		if doubt && home != 0 {
			// The direct path missed a heartbeat and may have just died:
			// the relay carries a copy until a pong settles it either
			// way. WireGuard drops whichever copy arrives second. The
			// copy never waits for a slow relay: that would pace a
			// direct path that may be fine to the relay's speed.
			if r := b.region(home); r != nil {
				if rerr := b.copyToRelay(r, p, bufs); rerr != nil && err != nil {
					return true, errors.Join(err, rerr)
				}
				return true, nil
			}
		}
		return true, err
	}
	if home != 0 {
		if r := b.region(home); r != nil {
			connected := r.client.Connected()
			if err := b.sendRelay(r, p, bufs); err != nil {
				return false, err
			}
			if connected {
				return true, nil
			}
			// The relay is still being dialled (or is down): it holds these
			// packets until it connects, so the first handshake is not lost
			// to a NAT; the published endpoints may also work (a flat LAN).
			if err := b.sendUnrelayed(p, bufs); err != nil && !errors.Is(err, errNoPath) {
				b.log.Debug("sending to published endpoints while the relay connects", "peer", p.key.ShortString(), "err", err)
			}
			return false, nil
		}
	}
	return false, b.sendUnrelayed(p, bufs)
}

// sendRelay sends bufs to p through relay r (which holds them while it
// connects).
func (b *Bind) sendRelay(r *region, p *peer, bufs [][]byte) error {
	for _, buf := range bufs {
		if err := r.client.Send(p.key, buf); err != nil {
			return fmt.Errorf("magic bind: via DERP region %d: %w", r.id, err)
		}
	}
	p.ctr.addTx(pathDERP, bufs)
	return nil
}

// copyToRelay sends bufs to p through relay r as far as its send queue
// has room, dropping the rest.
func (b *Bind) copyToRelay(r *region, p *peer, bufs [][]byte) error {
	for i, buf := range bufs {
		if err := r.client.TrySend(p.key, buf); err != nil {
			p.ctr.addTx(pathDERP, bufs[:i])
			if errors.Is(err, derp.ErrQueueFull) {
				return nil
			}
			return fmt.Errorf("magic bind: copy via DERP region %d: %w", r.id, err)
		}
	}
	p.ctr.addTx(pathDERP, bufs)
	return nil
}

// sendUnrelayed handles a peer without a usable relay (no DERP map, as in
// the demo and on a flat LAN, or its relay is down): rather than wait for a
// pong, it sends to every candidate the coordinator published; WireGuard
// drops the duplicates, and a candidate that works carries the handshake
// while disco confirms a path.
func (b *Bind) sendUnrelayed(p *peer, bufs [][]byte) error {
	p.mu.Lock()
	cands := p.cands
	p.mu.Unlock()
	if len(cands) == 0 {
		return errNoPath
	}
	var errs []error
	for _, c := range cands {
		if err := b.std.Send(bufs, stdEndpoint(c)); err != nil {
			errs = append(errs, err)
		} else {
			p.ctr.addTx(pathDirect, bufs)
		}
	}
	if len(errs) == len(cands) {
		return errors.Join(errs...)
	}
	return nil
}

// peerPath is the path a send to p would take now.
func (b *Bind) peerPath(p *peer, now time.Time) (path string, addr netip.AddrPort, home int) {
	p.mu.Lock()
	addr, direct := p.sel.Path(now)
	home = p.home
	p.mu.Unlock()
	if direct {
		return PathDirect, addr, home
	}
	if b.relayConnected(home) {
		return PathDERP, netip.AddrPort{}, home
	}
	return PathNone, netip.AddrPort{}, home
}

// directOrZero is the path of a send for counting path changes: the
// direct address, or zero for the relay.
func directOrZero(addr netip.AddrPort, direct bool) netip.AddrPort {
	if direct {
		return addr
	}
	return netip.AddrPort{}
}

func stdEndpoint(a netip.AddrPort) *conn.StdNetEndpoint { return &conn.StdNetEndpoint{AddrPort: a} }
