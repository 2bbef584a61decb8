// Package tunwrap is the data path between the TUN (a kernel device or
// gVisor's netstack) and wireguard-go: one tun.Device wrapper that decodes
// every packet once per direction (package packet) and hands the decoded
// form to each layer in turn.
//
// Read, the outbound direction (packets the host sends into the tunnel):
//
//	decode -> filter (outbound: learn flows, drop malformed)
//	       -> route to the peer (peer table lookup) -> answer too big
//	       -> clamp MSS -> activate the peer -> wireguard-go
//
// Write, the inbound direction (packets wireguard-go decrypted):
//
//	decode -> filter (inbound: rules and flows) -> clamp MSS -> TUN
//
// The per-peer state (Peers) serves lazy WireGuard configuration (a peer
// enters WireGuard only when traffic needs it; the engine's configurer
// does the configuring) and path MTU blackholes (a peer whose direct path
// carries less than the overlay MTU gets ICMP too-big replies for larger
// packets and TCP MSS clamping). The too-big replies are written to the
// TUN through the same inbound layers as any packet from a peer.
//
// Nothing here allocates per packet or per batch.
package tunwrap

import (
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"golang.zx2c4.com/wireguard/tun"

	"meshd.dev/meshd/filter"
	"meshd.dev/meshd/flowlog"
	"meshd.dev/meshd/packet"
)

// Config says which layers a Wrapper has.
type Config struct {
	// Filter is the packet filter; nil: none (engine tests only).
	Filter *filter.Filter
	// Peers is the peer table; nil: no peer activation, no too-big
	// replies, no MSS clamping (a bind that cannot tell peers apart).
	Peers *Peers
	// Logger receives what goes wrong writing too-big replies.
	Logger *slog.Logger
	// Flows, when set, counts every packet the filter judged, by flow and
	// verdict, for the flow log.
	Flows *flowlog.Table
}

// Wrapper is the tun.Device wireguard-go uses: the TUN with the data path
// layers around it.
type Wrapper struct {
	tun.Device
	filter   *filter.Filter
	peers    *Peers
	log      *slog.Logger
	flows    *flowlog.Table
	redirect atomic.Pointer[Redirect] // see SetRedirect

	// The read path's state: wireguard-go reads from one goroutine.
	out       []packet.Parsed // decoded form of the batch being read
	outSizes  []int           // the batch's sizes before the filter, with a flow log
	tooBig    []byte          // the ICMP error being written, after offset bytes
	tooBigOut [][]byte        // its batch of one

	// Write is called from one goroutine per peer: each call takes its
	// decoded forms from here.
	in sync.Pool // *[]packet.Parsed
}

// New wraps dev in the layers cfg names.
func New(dev tun.Device, cfg Config) *Wrapper {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Wrapper{
		Device: dev, filter: cfg.Filter, peers: cfg.Peers, log: log, flows: cfg.Flows,
		out:       make([]packet.Parsed, dev.BatchSize()),
		outSizes:  make([]int, dev.BatchSize()),
		tooBigOut: make([][]byte, 1),
	}
}

// Read reads a batch from the TUN and passes it through the outbound
// layers. A dropped packet gets sizes[i] = 0: wireguard-go's
// RoutineReadFromTUN skips entries with sizes[i] < 1 (device/send.go), so
// n stays the count read.
func (w *Wrapper) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	n, err := w.Device.Read(bufs, sizes, offset)
	redirect := w.redirect.Load()
	if n <= 0 || (w.filter == nil && w.peers == nil && redirect == nil) {
		return n, err
	}
	bufs, sizes = bufs[:n], sizes[:n]
	if len(w.out) < n {
		w.out = make([]packet.Parsed, n) // only if the device breaks its BatchSize
	}
	pp := w.out[:n]
	for i := range pp {
		if sizes[i] < 1 || offset+sizes[i] > len(bufs[i]) {
			pp[i] = packet.Parsed{}
			continue
		}
		pp[i].Decode(bufs[i][offset : offset+sizes[i]])
	}
	if redirect != nil {
		redirectOut(redirect, bufs, sizes, pp, offset)
	}
	now := time.Now()
	if w.flows != nil {
		if len(w.outSizes) < n {
			w.outSizes = make([]int, n)
		}
		copy(w.outSizes, sizes)
	}
	if w.filter != nil {
		w.filter.OutboundBatch(bufs, pp, offset, sizes, now)
	}
	if w.flows != nil {
		w.countOut(pp, sizes, now)
	}
	if w.peers != nil {
		w.toPeers(bufs, sizes, pp, offset, now)
	}
	return n, err
}

// countOut adds the batch just judged to the flow table: a packet whose
// size the filter set to 0 was dropped, and outbound the filter drops only
// malformed packets.
func (w *Wrapper) countOut(pp []packet.Parsed, sizes []int, now time.Time) {
	fb := w.flows.Begin(now)
	for i := range pp {
		n := w.outSizes[i]
		if n < 1 {
			continue
		}
		v := filter.Accept
		if sizes[i] < 1 {
			v = filter.DropMalformed
		}
		fb.Add(&pp[i], n, filter.Out, v)
	}
	fb.End()
}

// tooBigInterval is the least time between two ICMP errors about one
// peer's path: the sender's kernel learns the path MTU from the first; the
// rest of a burst already built too big is only dropped.
const tooBigInterval = 10 * time.Millisecond

// toPeers is the outbound peer layer: for each packet still in the batch
// it finds the destination's peer (one lookup per run of packets to one
// destination), answers and drops a packet too big for the peer's path,
// clamps the MSS of SYNs to such a peer, and makes sure the peer is in
// WireGuard before wireguard-go sees the packet, so the first SYN is not
// lost. A dropped packet is no activity: it neither activates the peer nor
// keeps it configured.
func (w *Wrapper) toPeers(bufs [][]byte, sizes []int, pp []packet.Parsed, offset int, now time.Time) {
	table := w.peers.byAddr.Load()
	mono := w.peers.Now()
	var lastDst packet.Addr
	var last *Peer
	looked := false
	for i := range pp {
		p := &pp[i]
		if sizes[i] < 1 || !p.Valid() {
			continue
		}
		pa := last
		if !looked || p.Dst != lastDst {
			pa, _ = table.Lookup(p.Dst.Netip())
			lastDst, last, looked = p.Dst, pa, true
		}
		if pa == nil {
			continue
		}
		b := bufs[i][offset : offset+sizes[i]]
		if m := pa.clampMTU.Load(); m > 0 {
			if len(b) > int(m) {
				// The direct path would drop it: drop it here and tell
				// the sender, as a router with that MTU would.
				w.answerTooBig(pa, p, b, int(m), offset, mono)
				sizes[i] = 0
				continue
			}
			clampMSS(p, b, m)
		}
		pa.Touch(mono)
		if !pa.configured.Load() {
			w.peers.Ensure(pa, ActivateOutbound, nil)
		}
	}
}

// answerTooBig writes the ICMP error for p (bytes b), too big for pa's
// path of mtu bytes, to the TUN through the inbound layers, unless one
// went out for pa within tooBigInterval. The filter lets it in: it quotes
// a packet the filter has just let out, whose flow it therefore knows.
func (w *Wrapper) answerTooBig(pa *Peer, p *packet.Parsed, b []byte, mtu, offset int, now int64) {
	if last := pa.lastTooBig.Load(); last != 0 && now-last < int64(tooBigInterval) {
		return
	}
	if len(w.tooBig) < offset+packet.TooBigLen {
		w.tooBig = make([]byte, offset+packet.TooBigLen) // once: the offset is wireguard-go's
	}
	n := p.TooBig(w.tooBig[offset:], b, mtu)
	if n == 0 {
		return
	}
	pa.lastTooBig.Store(now)
	w.tooBigOut[0] = w.tooBig[:offset+n]
	if _, err := w.Write(w.tooBigOut, offset); err != nil {
		w.log.Debug("write ICMP packet too big", "err", err)
	}
}

// Write passes a batch wireguard-go decrypted through the inbound layers
// and writes what is left to the TUN. Dropped packets are taken out of
// bufs in place, keeping the order; that is safe for wireguard-go, which
// returns its buffers to the pools through its own element list and
// truncates bufs after Write (device/receive.go). It returns the number
// of packets written; a batch with nothing left does not reach the device.
func (w *Wrapper) Write(bufs [][]byte, offset int) (int, error) {
	clamping := w.peers != nil && w.peers.clamping.Load() > 0
	redirect := w.redirect.Load()
	if w.filter == nil && !clamping && w.flows == nil && redirect == nil {
		return w.Device.Write(bufs, offset)
	}
	ppp, _ := w.in.Get().(*[]packet.Parsed)
	if ppp == nil || len(*ppp) < len(bufs) {
		s := make([]packet.Parsed, max(len(bufs), w.Device.BatchSize()))
		ppp = &s
	}
	defer w.in.Put(ppp)
	pp := *ppp
	now := time.Now()
	var in filter.InBatch
	if w.filter != nil {
		in = w.filter.BeginIn(now)
	}
	fb := w.flows.Begin(now)
	// One pass: each packet is decoded and judged while its header is in
	// cache, its decoded form going straight to its place in the kept
	// batch.
	k := 0
	for i, b := range bufs {
		if offset > len(b) {
			b = nil
		} else {
			b = b[offset:]
		}
		p := &pp[k]
		p.Decode(b)
		v := filter.Accept
		if w.filter != nil {
			v = in.Judge(p, b)
		}
		if w.flows != nil {
			fb.Add(p, len(b), filter.In, v)
		}
		if v != filter.Accept {
			continue
		}
		if k != i {
			bufs[k] = bufs[i] // a pointer store, with a write barrier check
		}
		k++
	}
	fb.End()
	if w.filter != nil {
		in.Done(k)
	}
	if k == 0 {
		return 0, nil
	}
	bufs, pp = bufs[:k], pp[:k]
	if clamping {
		w.clampFromPeers(bufs, pp, offset)
	}
	if redirect != nil {
		redirectIn(redirect, bufs, pp, offset)
	}
	return w.Device.Write(bufs, offset)
}

// clampFromPeers is the inbound peer layer: it clamps the MSS of TCP SYNs
// from peers whose direct path is smaller than the overlay MTU, so this
// host's TCP never builds segments that path drops.
func (w *Wrapper) clampFromPeers(bufs [][]byte, pp []packet.Parsed, offset int) {
	table := w.peers.byAddr.Load()
	for i := range pp {
		p := &pp[i]
		if !p.IsTCPSyn() {
			continue
		}
		if pa, _ := table.Lookup(p.Src.Netip()); pa != nil {
			if m := pa.clampMTU.Load(); m > 0 {
				clampMSS(p, bufs[i][offset:], m)
			}
		}
	}
}

// clampMSS clamps the MSS of p (bytes b), if it is a TCP SYN, to fit a
// path that carries overlay packets of up to mtu bytes.
func clampMSS(p *packet.Parsed, b []byte, mtu int32) {
	if !p.IsTCPSyn() {
		return
	}
	hdr := int32(40) // IPv4 + TCP
	if p.Version == 6 {
		hdr = 60
	}
	p.ClampMSS(b, uint16(mtu-hdr))
}
