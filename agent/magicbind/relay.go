package magicbind

import (
	"context"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"time"

	"golang.zx2c4.com/wireguard/conn"

	"meshd.dev/meshd/derp"
	"meshd.dev/meshd/nat/disco"
	"meshd.dev/meshd/netmap"
)

// derpMagicAddr is the address a pong sent through DERP carries (with the
// region id as port), and what WireGuard's UAPI shows for a relayed peer: it
// is never sent to. Tailscale uses the same convention.
var derpMagicAddr = netip.MustParseAddr("127.3.3.40")

type derpPacket struct {
	p   *peer
	buf *[]byte
	n   int
}

type region struct {
	id     int
	code   string
	client *derp.ReconnectingClient
	// node is the relay node dialled; cancel ends the connection when a
	// new DERP map names another (dropStaleRegionsLocked).
	node   netmap.DERPNode
	cancel context.CancelFunc
}

// connectPeerRegionsLocked connects to every region a peer calls home, so
// the first packets to a peer are not lost while a relay connection is
// dialled.
func (b *Bind) connectPeerRegionsLocked() {
	if b.open == nil {
		return
	}
	for _, p := range b.peers {
		p.mu.Lock()
		home := p.home
		p.mu.Unlock()
		if home != 0 {
			b.regionLocked(home)
		}
	}
}

func derpMapEqual(a, b netmap.DERPMap) bool {
	return slices.EqualFunc(a.Regions, b.Regions, func(x, y netmap.DERPRegion) bool {
		return x.ID == y.ID && x.Code == y.Code && slices.Equal(x.Nodes, y.Nodes)
	})
}

// region returns the relay connection for region id, starting it if the
// bind is open and the region is in the DERP map.
func (b *Bind) region(id int) *region {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.regionLocked(id)
}

func (b *Bind) regionLocked(id int) *region {
	if r, ok := b.regions[id]; ok {
		return r
	}
	if b.open == nil {
		return nil
	}
	var reg *netmap.DERPRegion
	for i := range b.derpMap.Regions {
		if b.derpMap.Regions[i].ID == id {
			reg = &b.derpMap.Regions[i]
		}
	}
	if reg == nil {
		return nil
	}
	node := relayNode(reg)
	if node == nil {
		return nil
	}
	url := "https://" + net.JoinHostPort(node.Host, strconv.Itoa(node.DERPPort))
	rc := derp.NewReconnectingClient(url, derp.ClientOptions{
		NodeKey: b.opts.NodeKey, CertFingerprint: node.CertFingerprint, DialContext: b.opts.DERPDialContext,
	}, b.log.With("derp_region", reg.Code))
	o := b.open
	ctx, cancel := context.WithCancel(o.ctx)
	r := &region{id: id, code: reg.Code, client: rc, node: *node, cancel: cancel}
	b.regions[id] = r
	o.wg.Add(1)
	go func() {
		defer o.wg.Done()
		rc.Run(ctx, func(m derp.Message) { b.handleDERP(o, r, m) })
	}()
	b.log.Debug("connecting to DERP region", "region", reg.Code, "url", url)
	return r
}

// relayNode is the node of reg a relay connection dials: the first that
// relays. Every node of a region dials the same one, so that two nodes
// homed in it meet at one server.
func relayNode(reg *netmap.DERPRegion) *netmap.DERPNode {
	for i := range reg.Nodes {
		if !reg.Nodes[i].STUNOnly && reg.Nodes[i].DERPPort > 0 {
			return &reg.Nodes[i]
		}
	}
	return nil
}

// dropStaleRegionsLocked ends the relay connections that the DERP map no
// longer points at: a region gone, or whose first relay node is now
// another server (coordinator replicas' relays, when the oldest replica
// is gone). The next use of the region dials what the map names now.
func (b *Bind) dropStaleRegionsLocked() {
	for id, r := range b.regions {
		var now *netmap.DERPNode
		for i := range b.derpMap.Regions {
			if b.derpMap.Regions[i].ID == id {
				now = relayNode(&b.derpMap.Regions[i])
			}
		}
		if now != nil && *now == r.node {
			continue
		}
		b.log.Info("DERP map changed: leaving a relay it no longer names", "region", r.code, "host", r.node.Host)
		r.cancel()
		delete(b.regions, id)
	}
}

// handleDERP runs on a relay's receive goroutine.
func (b *Bind) handleDERP(o *openState, r *region, m derp.Message) {
	pkt, ok := m.(derp.ReceivedPacket)
	if !ok {
		return
	}
	p := (*b.byKey.Load())[pkt.Source]
	if p != nil {
		p.mu.Lock()
		p.heardVia = r.id
		held := p.hasHeldLocked()
		p.mu.Unlock()
		if held {
			b.sendHeld(p) // heardVia is a path back
		}
	}
	if disco.Looks(pkt.Data) {
		b.handleDisco(pkt.Data, netip.AddrPortFrom(derpMagicAddr, uint16(r.id)), r, pkt.Source)
		return
	}
	if p == nil || len(pkt.Data) > derpBufSize || isHandshake(pkt.Data) && b.handshakes.dup(pkt.Data, time.Now()) {
		return
	}
	buf := b.derpBufs.Get().(*[]byte)
	n := copy(*buf, pkt.Data)
	select {
	case o.derpRx <- derpPacket{p: p, buf: buf, n: n}:
	case <-o.ctx.Done():
		b.derpBufs.Put(buf)
	}
}

// derpBufSize covers a WireGuard packet on a jumbo-frame underlay.
const derpBufSize = 65535

// receiveDERP hands WireGuard the packets relays delivered, as many as are
// waiting, up to the batch.
func (b *Bind) receiveDERP(o *openState) conn.ReceiveFunc {
	return func(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		var pk derpPacket
		select {
		case pk = <-o.derpRx:
		case <-o.ctx.Done():
			return 0, net.ErrClosed
		}
		n := 0
		for {
			sizes[n] = copy(packets[n], (*pk.buf)[:pk.n])
			eps[n] = pk.p.ep
			pk.p.countRx(pathDERP, 1, uint64(sizes[n]))
			b.derpBufs.Put(pk.buf)
			n++
			if n == len(packets) {
				return n, nil
			}
			select {
			case pk = <-o.derpRx:
			default:
				return n, nil
			}
		}
	}
}

// relayConnected reports whether the relay of region home is connected.
func (b *Bind) relayConnected(home int) bool {
	if home == 0 {
		return false
	}
	b.mu.Lock()
	r := b.regions[home]
	b.mu.Unlock()
	return r != nil && r.client.Connected()
}
