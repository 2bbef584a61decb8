// Package magicbind is the agent's WireGuard conn.Bind that sends each peer's
// packets over the best path it currently has: a direct UDP ip:port that
// recently answered a disco ping, or else the peer's home DERP relay.
//
// WireGuard sees one stable endpoint per peer, keyed by the peer's node key
// (Bind.EndpointFor gives the string to configure), never a raw address: the
// path is chosen per send, and every received packet, whatever address or
// relay it came from, is handed to WireGuard with that same endpoint, so
// WireGuard's own roaming never fights the path selection.
//
// One UDP socket (conn.StdNetBind's, for its recvmmsg/sendmmsg and UDP
// GSO/GRO) carries WireGuard, disco and STUN; they are told apart by their
// first bytes. Per peer, a nat/endpoint.Selector decides which pings to send
// and which path to use; traffic starts on DERP at once and moves to a
// direct path when a pong arrives.
package magicbind

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"golang.zx2c4.com/wireguard/conn"

	"meshd.dev/meshd/nat/disco"
	"meshd.dev/meshd/nat/endpoint"
	"meshd.dev/meshd/nat/stun"
	"meshd.dev/meshd/netmap"
)

// Options configure a Bind.
type Options struct {
	// NodeKey is this node's WireGuard key: the DERP identity.
	NodeKey netmap.NodePrivate
	// DiscoKey seals and opens disco messages.
	DiscoKey netmap.DiscoPrivate
	// Paths holds the path selection timing; zero fields take defaults.
	Paths endpoint.Config
	// STUNInterval is how often the public mapping of the socket and the
	// latency to each DERP region are re-measured (default 20s).
	STUNInterval time.Duration
	// OnChange, if set, is called (from a background goroutine) when the
	// home DERP region or the STUN-learnt endpoints change, so the agent
	// can report them to the coordinator at once.
	OnChange func()
	// DERPDialContext opens the TCP connections to relays; nil uses a
	// net.Dialer.
	DERPDialContext func(ctx context.Context, network, addr string) (net.Conn, error)
	// OverlayMTU is the tunnel's MTU. When set, every active peer's
	// confirmed direct path is probed with disco pings padded to the size
	// of the largest WireGuard packet this MTU produces, so a path that
	// drops them (a smaller link whose ICMP is filtered) is reported in
	// PeerStatus instead of silently blackholing bulk transfers. 0: no
	// probing.
	OverlayMTU int
	// PMTUInterval is how often an active peer's direct path is probed
	// again (default 5m); a new direct path is probed at once.
	PMTUInterval time.Duration
	// PMTUTimeout is how long each probe waits for its pong before it is
	// sent again (default 1s); a size unanswered after three tries is lost.
	PMTUTimeout time.Duration
	Logger      *slog.Logger
}

// Bind is the magic bind. Create it with New; WireGuard calls Open and
// Close. SetNetworkMap feeds it peers and the DERP map.
type Bind struct {
	opts   Options
	log    *slog.Logger
	std    conn.Bind
	selfPK netmap.NodePublic

	mu      sync.Mutex
	peers   map[netmap.NodePublic]*peer
	byDisco map[netmap.DiscoPublic]*peer
	derpMap netmap.DERPMap
	selfEps []netip.AddrPort // what the coordinator has for us
	stunEps []netip.AddrPort // public mappings learnt over STUN
	home    int
	regions map[int]*region
	stunTx  map[stun.TxID]stunProbe
	stunLat map[int]time.Duration
	waiters map[disco.TxID]*pingWaiter
	open    *openState // nil while closed
	mapGen  uint64     // counts SetNetworkMap calls

	// addrs maps a direct source address to its peer; the receive path
	// reads it without a lock (addrs.go).
	addrs addrIndex
	// byKey maps a DERP source to its peer; replaced whole (copy on
	// write, once per map that adds or removes peers) so the relay's
	// receive path reads it without a lock.
	byKey atomic.Pointer[map[netmap.NodePublic]*peer]
	// loop holds the peers the disco loop polls: those that were active
	// recently. With thousands of idle peers the loop would otherwise walk
	// every one every second. loopMu is taken before a peer's mu, never
	// after.
	loopMu sync.Mutex
	loop   map[*peer]struct{}

	// pmtuHook is told about path MTU results (SetPathMTUHook).
	pmtuHook atomic.Pointer[func(netmap.NodePublic, int, bool)]
	// overlayMTU is the tunnel MTU the probes test: Options.OverlayMTU
	// until SetOverlayMTU changes it.
	overlayMTU atomic.Int64
	// derpBufs hold relayed packets between the relay's reader and
	// WireGuard's receive call.
	derpBufs sync.Pool
	// handshakes drops second copies of handshake messages, by any path.
	handshakes handshakeDedup
}

// openState is what lives from Open to Close.
type openState struct {
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	derpRx chan derpPacket
	wake   chan struct{}
}

// New returns a Bind for the node with the given keys. It does nothing until
// WireGuard opens it.
func New(opts Options) *Bind {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.STUNInterval == 0 {
		opts.STUNInterval = 20 * time.Second
	}
	if opts.PMTUInterval <= 0 {
		opts.PMTUInterval = defaultPMTUInterval
	}
	if opts.PMTUTimeout <= 0 {
		opts.PMTUTimeout = defaultPMTUTimeout
	}
	b := &Bind{
		opts: opts, log: opts.Logger, std: conn.NewStdNetBind(), selfPK: opts.NodeKey.Public(),
		peers: map[netmap.NodePublic]*peer{}, byDisco: map[netmap.DiscoPublic]*peer{},
		regions: map[int]*region{}, stunTx: map[stun.TxID]stunProbe{}, stunLat: map[int]time.Duration{},
		waiters: map[disco.TxID]*pingWaiter{}, loop: map[*peer]struct{}{},
	}
	b.derpBufs.New = func() any { buf := make([]byte, derpBufSize); return &buf }
	b.overlayMTU.Store(int64(opts.OverlayMTU))
	b.addrs.init()
	b.handshakes.init()
	b.byKey.Store(&map[netmap.NodePublic]*peer{})
	return b
}

// Open opens the UDP socket on port, connects to the home DERP region and
// starts path discovery.
func (b *Bind) Open(port uint16) ([]conn.ReceiveFunc, uint16, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.open != nil {
		return nil, 0, conn.ErrBindAlreadyOpen
	}
	fns, actual, err := b.std.Open(port)
	if err != nil {
		return nil, 0, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	o := &openState{ctx: ctx, cancel: cancel, derpRx: make(chan derpPacket, 256), wake: make(chan struct{}, 1)}
	b.open = o
	out := make([]conn.ReceiveFunc, 0, len(fns)+1)
	for _, fn := range fns {
		out = append(out, b.wrapReceive(fn))
	}
	out = append(out, b.receiveDERP(o))
	b.connectPeerRegionsLocked()
	o.wg.Add(2)
	go func() {
		defer o.wg.Done()
		b.discoLoop(o)
	}()
	go func() {
		defer o.wg.Done()
		b.stunLoop(o)
	}()
	return out, actual, nil
}

// Close closes the socket and the relay connections; the receive functions
// return net.ErrClosed.
func (b *Bind) Close() error {
	b.mu.Lock()
	o := b.open
	b.open = nil
	// The relay connections' Run loops end with o.ctx.
	b.regions = map[int]*region{}
	b.mu.Unlock()
	err := b.std.Close()
	if o != nil {
		o.cancel()
		o.wg.Wait()
	}
	return err
}

// SetMark sets SO_MARK on the UDP socket.
func (b *Bind) SetMark(mark uint32) error { return b.std.SetMark(mark) }

// BatchSize is the UDP socket's batch size.
func (b *Bind) BatchSize() int { return b.std.BatchSize() }

// wrapReceive turns the UDP socket's receive function into one that hands
// WireGuard only WireGuard packets from known peers, each with its peer's
// endpoint, and handles disco and STUN itself. Packets it consumes get
// size 0, which WireGuard skips.
func (b *Bind) wrapReceive(fn conn.ReceiveFunc) conn.ReceiveFunc {
	return func(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		n, err := fn(packets, sizes, eps)
		addrs := b.addrs.table.Load()
		// Traffic is counted per run of packets from one peer (a GRO
		// batch is one run), so the counters cost a few atomic adds per
		// batch.
		var run *peer
		var runPk, runB uint64
		for i := 0; i < n; i++ {
			se, ok := eps[i].(*conn.StdNetEndpoint)
			if !ok {
				sizes[i] = 0
				continue
			}
			src := netip.AddrPortFrom(se.Addr().Unmap(), se.Port())
			pkt := packets[i][:sizes[i]]
			switch {
			case disco.Looks(pkt):
				b.handleDisco(pkt, src, nil, netmap.NodePublic{})
				sizes[i] = 0
			case stun.Is(pkt):
				b.handleSTUN(pkt, src)
				sizes[i] = 0
			default:
				p := addrs.lookup(src)
				if p == nil {
					// Not from a path we know: WireGuard would roam
					// the peer to a raw address we cannot keep.
					sizes[i] = 0
					continue
				}
				if isHandshake(pkt) && b.handshakes.dup(pkt, time.Now()) {
					sizes[i] = 0
					continue
				}
				eps[i] = p.ep
				if p != run {
					run.countRx(pathDirect, runPk, runB)
					run, runPk, runB = p, 0, 0
				}
				runPk++
				runB += uint64(len(pkt))
			}
		}
		run.countRx(pathDirect, runPk, runB)
		return n, err
	}
}
