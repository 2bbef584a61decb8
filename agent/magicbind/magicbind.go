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
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.zx2c4.com/wireguard/conn"

	"meshd.dev/meshd/derp"
	"meshd.dev/meshd/nat/disco"
	"meshd.dev/meshd/nat/endpoint"
	"meshd.dev/meshd/nat/stun"
	"meshd.dev/meshd/netmap"
)

// Path names, as `meshd status` shows them.
const (
	PathDirect = "direct"
	PathDERP   = "derp"
	PathNone   = "none"
)

// derpMagicAddr is the address a pong sent through DERP carries (with the
// region id as port), and what WireGuard's UAPI shows for a relayed peer: it
// is never sent to. Tailscale uses the same convention.
var derpMagicAddr = netip.MustParseAddr("127.3.3.40")

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

	// byAddr maps a direct source address to its peer; replaced whole
	// (copy on write) so the receive path reads it without a lock.
	byAddr atomic.Pointer[map[netip.AddrPort]*peer]
	// byKey is the same for DERP sources.
	byKey atomic.Pointer[map[netmap.NodePublic]*peer]
	// loop holds the peers the disco loop polls: those that were active
	// recently. With thousands of idle peers the loop would otherwise walk
	// every one every second. loopMu is taken before a peer's mu, never
	// after.
	loopMu sync.Mutex
	loop   map[*peer]struct{}

	// pmtuHook is told about path MTU results (SetPathMTUHook).
	pmtuHook atomic.Pointer[func(netmap.NodePublic, int, bool)]
	// derpBufs hold relayed packets between the relay's reader and
	// WireGuard's receive call.
	derpBufs sync.Pool
}

// openState is what lives from Open to Close.
type openState struct {
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	derpRx chan derpPacket
	wake   chan struct{}
}

type derpPacket struct {
	p   *peer
	buf *[]byte
	n   int
}

type region struct {
	id     int
	code   string
	client *derp.ReconnectingClient
}

type stunProbe struct {
	region int
	sent   time.Time
}

type pingWaiter struct {
	p      *peer
	sent   time.Time
	result chan PingResult
}

// peer is one WireGuard peer's path state.
type peer struct {
	key netmap.NodePublic
	ep  *Endpoint

	mu    sync.Mutex
	name  string
	disco netmap.DiscoPublic
	home  int
	// heardVia is the relay region the peer's packets last arrived through:
	// a reply path while the map does not yet say where its home is (it
	// has just joined and is still measuring), so our answer to its first
	// handshake is not sent to its NAT and lost.
	heardVia int
	cands    []netip.AddrPort // from the netmap
	sel      *endpoint.Selector
	lastSend time.Time
	inLoop   bool                 // in Bind.loop (or about to be)
	directEP *conn.StdNetEndpoint // cached for the current direct path
	pmtu     pmtuState
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
	b.byAddr.Store(&map[netip.AddrPort]*peer{})
	b.byKey.Store(&map[netmap.NodePublic]*peer{})
	return b
}

// Endpoint is the conn.Endpoint of one peer, stable for the peer's life in
// the bind.
type Endpoint struct {
	p *peer
	b *Bind
}

// ClearSrc is a no-op: the bind does not pin source addresses.
func (e *Endpoint) ClearSrc() {}

// SrcToString is empty: the source is whatever the socket uses.
func (e *Endpoint) SrcToString() string { return "" }

// DstToString is the current path: the direct ip:port, or 127.3.3.40:REGION
// while relayed (what WireGuard's UAPI shows).
func (e *Endpoint) DstToString() string {
	path, addr, _ := e.b.peerPath(e.p, time.Now())
	if path == PathDirect {
		return addr.String()
	}
	e.p.mu.Lock()
	home := e.p.home
	e.p.mu.Unlock()
	return netip.AddrPortFrom(derpMagicAddr, uint16(home)).String()
}

// DstToBytes identifies the peer for WireGuard's cookie MACs: its key, which
// unlike an address does not change with the path.
func (e *Endpoint) DstToBytes() []byte { return e.p.key[:] }

// DstIP is the direct path's address, or zero while relayed.
func (e *Endpoint) DstIP() netip.Addr {
	if path, addr, _ := e.b.peerPath(e.p, time.Now()); path == PathDirect {
		return addr.Addr()
	}
	return netip.Addr{}
}

// SrcIP is zero: the bind does not pin source addresses.
func (e *Endpoint) SrcIP() netip.Addr { return netip.Addr{} }

// EndpointFor is the endpoint string to configure in WireGuard for the peer
// with key k (UAPI "endpoint="): its node key.
func EndpointFor(k netmap.NodePublic) string { return k.String() }

// ParseEndpoint accepts the strings EndpointFor makes. A peer not yet in the
// network map gets its endpoint now and its paths when the map arrives.
func (b *Bind) ParseEndpoint(s string) (conn.Endpoint, error) {
	k, err := netmap.ParseNodePublic(s)
	if err != nil {
		return nil, fmt.Errorf("magic bind endpoint %q: want a node key: %w", s, err)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.peerLocked(k).ep, nil
}

func (b *Bind) peerLocked(k netmap.NodePublic) *peer {
	if p, ok := b.peers[k]; ok {
		return p
	}
	p := &peer{key: k, sel: endpoint.New(b.opts.Paths)}
	p.ep = &Endpoint{p: p, b: b}
	b.peers[k] = p
	b.publishKeysLocked()
	return p
}

func (b *Bind) publishKeysLocked() {
	m := make(map[netmap.NodePublic]*peer, len(b.peers))
	for k, p := range b.peers {
		m[k] = p
	}
	b.byKey.Store(&m)
}

// SetNetworkMap brings the bind's peers, their disco keys, candidate
// endpoints and home regions, and the DERP map in line with nm.
func (b *Bind) SetNetworkMap(nm *netmap.NetworkMap) {
	b.mu.Lock()
	defer b.mu.Unlock()
	seen := make(map[netmap.NodePublic]bool, len(nm.Peers))
	b.byDisco = make(map[netmap.DiscoPublic]*peer, len(nm.Peers))
	addrs := map[netip.AddrPort]*peer{}
	for _, n := range nm.Peers {
		if n.NodeKey.IsZero() || n.NodeKey == b.selfPK {
			continue
		}
		seen[n.NodeKey] = true
		p := b.peerLocked(n.NodeKey)
		p.mu.Lock()
		p.name, p.disco, p.home = n.Hostname, n.DiscoKey, n.HomeDERP
		p.cands = slices.Clone(n.Endpoints)
		p.sel.SetCandidates(n.Endpoints)
		for _, c := range p.sel.State(time.Now()).Candidates {
			addrs[c.Addr] = p
		}
		p.mu.Unlock()
		if !n.DiscoKey.IsZero() {
			b.byDisco[n.DiscoKey] = p
		}
	}
	for k := range b.peers {
		if !seen[k] {
			// WireGuard removes the peer too; its endpoint stays valid
			// (sends go nowhere) until then.
			delete(b.peers, k)
		}
	}
	b.publishKeysLocked()
	b.byAddr.Store(&addrs)
	b.selfEps = slices.Clone(nm.Self.Endpoints)
	mapChanged := !derpMapEqual(b.derpMap, nm.DERPMap)
	b.derpMap = nm.DERPMap
	if mapChanged && b.open != nil {
		b.kickLocked()
		b.startSTUNLocked()
	}
	b.connectPeerRegionsLocked()
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

// learnAddr ties a direct source address to p (after an authenticated ping
// or pong from it).
func (b *Bind) learnAddr(a netip.AddrPort, p *peer) {
	if (*b.byAddr.Load())[a] == p {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.peers[p.key] != p {
		return // removed meanwhile
	}
	old := *b.byAddr.Load()
	m := make(map[netip.AddrPort]*peer, len(old)+1)
	for k, v := range old {
		m[k] = v
	}
	m[a] = p
	b.byAddr.Store(&m)
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

// errNoPath is returned by Send for a peer with neither a direct path nor a
// relay; WireGuard retries its handshake later.
var errNoPath = errors.New("magic bind: no path to peer (no direct path yet and no DERP home)")

// Send sends bufs to the peer of ep over its best path.
func (b *Bind) Send(bufs [][]byte, cep conn.Endpoint) error {
	ep, ok := cep.(*Endpoint)
	if !ok || ep.b != b {
		return fmt.Errorf("magic bind: foreign endpoint %T", cep)
	}
	p := ep.p
	now := time.Now()
	p.mu.Lock()
	kick := now.Sub(p.lastSend) > 500*time.Millisecond
	p.lastSend = now
	p.sel.NoteActivity(now)
	join := p.joinLoopLocked()
	addr, direct := p.sel.Path(now)
	doubt := direct && p.sel.InDoubt(now)
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
		if doubt && home != 0 {
			// The direct path missed a heartbeat and may have just died:
			// the relay carries a copy until a pong settles it either
			// way. WireGuard drops whichever copy arrives second. The
			// copy never waits for a slow relay: that would pace a
			// direct path that may be fine to the relay's speed.
			if r := b.region(home); r != nil {
				if rerr := b.copyToRelay(r, p, bufs); rerr != nil && err != nil {
					return errors.Join(err, rerr)
				}
				return nil
			}
		}
		return err
	}
	if home != 0 {
		if r := b.region(home); r != nil {
			connected := r.client.Connected()
			if err := b.sendRelay(r, p, bufs); err != nil {
				return err
			}
			if connected {
				return nil
			}
			// The relay is still being dialled (or is down): it holds these
			// packets until it connects, so the first handshake is not lost
			// to a NAT; the published endpoints may also work (a flat LAN).
			if err := b.sendUnrelayed(p, bufs); err != nil && !errors.Is(err, errNoPath) {
				b.log.Debug("sending to published endpoints while the relay connects", "peer", p.key.ShortString(), "err", err)
			}
			return nil
		}
	}
	return b.sendUnrelayed(p, bufs)
}

// sendRelay sends bufs to p through relay r (which holds them while it
// connects).
func (b *Bind) sendRelay(r *region, p *peer, bufs [][]byte) error {
	for _, buf := range bufs {
		if err := r.client.Send(p.key, buf); err != nil {
			return fmt.Errorf("magic bind: via DERP region %d: %w", r.id, err)
		}
	}
	return nil
}

// copyToRelay sends bufs to p through relay r as far as its send queue
// has room, dropping the rest.
func (b *Bind) copyToRelay(r *region, p *peer, bufs [][]byte) error {
	for _, buf := range bufs {
		if err := r.client.TrySend(p.key, buf); err != nil {
			if errors.Is(err, derp.ErrQueueFull) {
				return nil
			}
			return fmt.Errorf("magic bind: copy via DERP region %d: %w", r.id, err)
		}
	}
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
		}
	}
	if len(errs) == len(cands) {
		return errors.Join(errs...)
	}
	return nil
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
	var node *netmap.DERPNode
	for i := range reg.Nodes {
		if !reg.Nodes[i].STUNOnly && reg.Nodes[i].DERPPort > 0 {
			node = &reg.Nodes[i]
			break
		}
	}
	if node == nil {
		return nil
	}
	url := "https://" + net.JoinHostPort(node.Host, strconv.Itoa(node.DERPPort))
	rc := derp.NewReconnectingClient(url, derp.ClientOptions{
		NodeKey: b.opts.NodeKey, CertFingerprint: node.CertFingerprint, DialContext: b.opts.DERPDialContext,
	}, b.log.With("derp_region", reg.Code))
	r := &region{id: id, code: reg.Code, client: rc}
	b.regions[id] = r
	o := b.open
	o.wg.Add(1)
	go func() {
		defer o.wg.Done()
		rc.Run(o.ctx, func(m derp.Message) { b.handleDERP(o, r, m) })
	}()
	b.log.Debug("connecting to DERP region", "region", reg.Code, "url", url)
	return r
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
		p.mu.Unlock()
	}
	if disco.Looks(pkt.Data) {
		b.handleDisco(pkt.Data, netip.AddrPortFrom(derpMagicAddr, uint16(r.id)), r, pkt.Source)
		return
	}
	if p == nil || len(pkt.Data) > derpBufSize {
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

// wrapReceive turns the UDP socket's receive function into one that hands
// WireGuard only WireGuard packets from known peers, each with its peer's
// endpoint, and handles disco and STUN itself. Packets it consumes get
// size 0, which WireGuard skips.
func (b *Bind) wrapReceive(fn conn.ReceiveFunc) conn.ReceiveFunc {
	return func(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		n, err := fn(packets, sizes, eps)
		addrs := *b.byAddr.Load()
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
				p := addrs[src]
				if p == nil {
					// Not from a path we know: WireGuard would roam
					// the peer to a raw address we cannot keep.
					sizes[i] = 0
					continue
				}
				eps[i] = p.ep
			}
		}
		return n, err
	}
}

func (b *Bind) kick() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.kickLocked()
}

func (b *Bind) kickLocked() {
	if b.open == nil {
		return
	}
	select {
	case b.open.wake <- struct{}{}:
	default:
	}
}

// discoLoop sends the pings and call-me-maybes the peers' selectors ask
// for, sleeping until the earliest next wake (at most a second).
func (b *Bind) discoLoop(o *openState) {
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-o.ctx.Done():
			return
		case <-t.C:
		case <-o.wake:
		}
		now := time.Now()
		b.loopMu.Lock()
		peers := make([]*peer, 0, len(b.loop))
		for p := range b.loop {
			peers = append(peers, p)
		}
		b.loopMu.Unlock()
		// With no active peer nothing is due until a send or a disco
		// message wakes the loop: an idle node does not tick.
		next := now.Add(time.Hour)
		if len(peers) > 0 {
			next = now.Add(time.Second)
		}
		b.mu.Lock()
		myEps := b.myEndpointsLocked()
		b.mu.Unlock()
		for _, p := range peers {
			p.mu.Lock()
			act := p.sel.Poll(now)
			idle := true
			if w := p.sel.NextWake(now); !w.IsZero() {
				idle = false
				if w.Before(next) {
					next = w
				}
			}
			dk, home, name := p.disco, p.home, p.name
			var probes []pmtuProbe
			var res *pmtuResult
			if !dk.IsZero() {
				var w time.Time
				probes, res, w = b.pmtuPollLocked(p, now)
				if !w.IsZero() {
					idle = false
					if w.Before(next) {
						next = w
					}
				}
			}
			if idle && !p.sel.Active(now) {
				p.inLoop = false
			}
			leave := !p.inLoop
			p.mu.Unlock()
			if leave {
				b.leaveLoop(p)
			}
			if dk.IsZero() {
				continue
			}
			b.logPMTU(p.key, name, res)
			for _, pr := range act.Pings {
				b.sendDiscoUDP(pr.To, dk, disco.Ping{TxID: pr.TxID, NodeKey: b.selfPK})
			}
			b.sendProbes(probes, dk)
			if act.CallMeMaybe && home != 0 && len(myEps) > 0 {
				b.sendDiscoDERP(p, home, dk, disco.CallMeMaybe{Endpoints: myEps})
			}
		}
		d := max(next.Sub(time.Now()), 10*time.Millisecond)
		t.Reset(d)
	}
}

// joinLoopLocked marks p as polled by the disco loop and reports whether
// the caller must add it (joinLoop, after releasing p.mu).
func (p *peer) joinLoopLocked() bool {
	if p.inLoop {
		return false
	}
	p.inLoop = true
	return true
}

// joinLoop adds p to the peers the disco loop polls and wakes the loop.
func (b *Bind) joinLoop(p *peer) {
	b.loopMu.Lock()
	b.loop[p] = struct{}{}
	b.loopMu.Unlock()
	b.kick()
}

// leaveLoop drops p from the disco loop unless it became active again
// since the loop found it idle.
func (b *Bind) leaveLoop(p *peer) {
	b.loopMu.Lock()
	p.mu.Lock()
	if !p.inLoop {
		delete(b.loop, p)
	}
	p.mu.Unlock()
	b.loopMu.Unlock()
}

// polledPeers is how many peers the disco loop polls now (tests).
func (b *Bind) polledPeers() int {
	b.loopMu.Lock()
	defer b.loopMu.Unlock()
	return len(b.loop)
}

func (b *Bind) myEndpointsLocked() []netip.AddrPort {
	eps := append(slices.Clone(b.selfEps), b.stunEps...)
	slices.SortFunc(eps, func(x, y netip.AddrPort) int { return x.Compare(y) })
	eps = slices.Compact(eps)
	if len(eps) > disco.MaxEndpoints {
		eps = eps[:disco.MaxEndpoints]
	}
	return eps
}

func (b *Bind) sendDiscoUDP(to netip.AddrPort, dk netmap.DiscoPublic, m disco.Message) {
	pkt := disco.Seal(b.opts.DiscoKey, dk, m)
	if err := b.std.Send([][]byte{pkt}, stdEndpoint(to)); err != nil {
		b.log.Debug("disco send", "to", to, "err", err)
	}
}

func (b *Bind) sendDiscoDERP(p *peer, regionID int, dk netmap.DiscoPublic, m disco.Message) {
	r := b.region(regionID)
	if r == nil {
		return
	}
	if err := r.client.Send(p.key, disco.Seal(b.opts.DiscoKey, dk, m)); err != nil {
		b.log.Debug("disco send via DERP", "region", regionID, "err", err)
	}
}

// handleDisco handles a disco packet from src (a UDP address, or the DERP
// magic address when r is set, with derpSrc the relay's sender key).
func (b *Bind) handleDisco(pkt []byte, src netip.AddrPort, r *region, derpSrc netmap.NodePublic) {
	sender, err := disco.Sender(pkt)
	if err != nil {
		return
	}
	b.mu.Lock()
	p := b.byDisco[sender]
	b.mu.Unlock()
	if p == nil {
		return // not a peer of ours (or its disco key is not in our map yet)
	}
	_, msg, err := disco.Open(b.opts.DiscoKey, pkt)
	if err != nil {
		b.log.Debug("disco: bad packet", "src", src, "err", err)
		return
	}
	if r != nil && derpSrc != p.key {
		return // a relayed disco packet must come from its peer's own key
	}
	now := time.Now()
	switch m := msg.(type) {
	case disco.Ping:
		if m.NodeKey != p.key {
			return
		}
		pong := disco.Pong{TxID: m.TxID, Src: src}
		if r != nil {
			b.sendDiscoDERP(p, r.id, sender, pong)
			return
		}
		p.mu.Lock()
		p.sel.PingedFrom(now, src)
		p.mu.Unlock()
		b.learnAddr(src, p)
		b.sendDiscoUDP(src, sender, pong)
		b.kick()
	case disco.Pong:
		if r == nil {
			p.mu.Lock()
			probe, res := b.pmtuPongLocked(p, now, m.TxID, src)
			ok := !probe && p.sel.HandlePong(now, m.TxID, src)
			name := p.name
			p.mu.Unlock()
			if probe {
				b.logPMTU(p.key, name, res)
				return
			}
			if ok {
				b.learnAddr(src, p)
			}
		}
		b.mu.Lock()
		w := b.waiters[m.TxID]
		delete(b.waiters, m.TxID)
		b.mu.Unlock()
		if w != nil && w.p == p {
			p.mu.Lock()
			res := PingResult{Latency: now.Sub(w.sent), Peer: p.name}
			p.mu.Unlock()
			if r != nil {
				res.Path, res.DERPRegion, res.DERPCode = PathDERP, r.id, r.code
			} else {
				res.Path, res.Addr = PathDirect, src
				b.learnAddr(src, p)
			}
			select {
			case w.result <- res:
			default:
			}
		}
	case disco.CallMeMaybe:
		if r == nil {
			return // only meaningful through the relay
		}
		p.mu.Lock()
		for _, ep := range m.Endpoints {
			p.sel.AddCandidate(ep, endpoint.FromCallMeMaybe)
		}
		// NoteActivity wakes an idle peer so the selector probes; new
		// candidates are pinged at the next Poll, which the kick makes
		// immediate.
		p.sel.NoteActivity(now)
		join := p.joinLoopLocked()
		p.mu.Unlock()
		if join {
			b.joinLoop(p)
		}
		b.kick()
		// The peer is pinging us right now: ping every endpoint it listed
		// at once too, known or not, so our NAT opens towards it while
		// its pings are on the way (simultaneous open). These pings are
		// not the selector's: their pongs only tell the peer, whose pings
		// now get through, and our own next probe finds the path.
		for _, ep := range m.Endpoints {
			b.sendDiscoUDP(ep, sender, disco.Ping{TxID: disco.NewTxID(), NodeKey: b.selfPK})
		}
	}
}

// PeerStatus is one peer's path, for `meshd status`.
type PeerStatus struct {
	// Path is PathDirect, PathDERP or PathNone.
	Path string
	// Addr is the direct address in use (Path == PathDirect).
	Addr netip.AddrPort
	// DERPRegion and DERPCode are the relay used (Path == PathDERP).
	DERPRegion int
	DERPCode   string
	Latency    time.Duration
	// PathMTU is the largest overlay packet (inner IP packet) that crossed
	// the direct path in use in its last probe round; 0 while unknown
	// (relayed, not probed yet, or Options.OverlayMTU unset) and when not
	// even the smallest probe got through.
	PathMTU int
	// MTUProblem is set when the direct path in use drops packets of the
	// full OverlayMTU: bulk traffic would stall there. MTUProblemText says
	// what to do.
	MTUProblem bool
	// OverlayMTU is the MTU the probes tested (Options.OverlayMTU), set
	// with a probe result.
	OverlayMTU int
}

// Endpoint formats the path's endpoint: "ip:port", or "derp:CODE".
func (s PeerStatus) Endpoint() string {
	switch s.Path {
	case PathDirect:
		return s.Addr.String()
	case PathDERP:
		return "derp:" + s.DERPCode
	}
	return ""
}

// PeerStatus reports the path packets to the peer with key k take now: a
// direct path that missed its heartbeat shows as the relay, which carries
// copies of the traffic until a pong settles it.
func (b *Bind) PeerStatus(k netmap.NodePublic) PeerStatus {
	b.mu.Lock()
	p := b.peers[k]
	b.mu.Unlock()
	if p == nil {
		return PeerStatus{Path: PathNone}
	}
	now := time.Now()
	path, addr, home := b.peerPath(p, now)
	if path == PathDirect {
		p.mu.Lock()
		doubt := p.sel.InDoubt(now)
		p.mu.Unlock()
		if doubt && b.relayConnected(home) {
			// The direct path missed its heartbeat: what arrives now
			// arrives through the relay, so say so rather than wait for
			// the path's trust to lapse.
			path, addr = PathDERP, netip.AddrPort{}
		}
	}
	st := PeerStatus{Path: path, Addr: addr}
	if path == PathDirect {
		p.mu.Lock()
		if pm := p.pmtu; pm.known && pm.addr == addr {
			st.PathMTU, st.MTUProblem, st.OverlayMTU = pm.pathMTU, pm.lost, b.opts.OverlayMTU
		}
		p.mu.Unlock()
	}
	if path == PathDERP {
		st.DERPRegion = home
		b.mu.Lock()
		st.DERPCode = b.regionCodeLocked(home)
		b.mu.Unlock()
	}
	return st
}

func (b *Bind) regionCodeLocked(id int) string {
	for _, r := range b.derpMap.Regions {
		if r.ID == id {
			return r.Code
		}
	}
	return strconv.Itoa(id)
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

// HomeDERP is the region this node receives relayed packets on (0 before
// one is known).
func (b *Bind) HomeDERP() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.home
}

// STUNEndpoints are the public ip:port mappings of the UDP socket that STUN
// servers reported, to publish as candidates.
func (b *Bind) STUNEndpoints() []netip.AddrPort {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.stunEps)
}
