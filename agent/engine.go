package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.zx2c4.com/wireguard/tun"
	"golang.zx2c4.com/wireguard/tun/netstack"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/agent/magicbind"
	"meshd.dev/meshd/agent/proxy"
	"meshd.dev/meshd/agent/tunwrap"
	"meshd.dev/meshd/filter"
	"meshd.dev/meshd/flowlog"
	"meshd.dev/meshd/internal/wireguard/device"
	"meshd.dev/meshd/netmap"
)

// TUNUserspace selects gVisor's netstack instead of a kernel TUN device.
const TUNUserspace = "userspace"

// cgnatRange is the IPv4 range tailnet addresses come from.
var cgnatRange = netip.MustParsePrefix("100.64.0.0/10")

// engineConfig is what the data plane needs to start.
type engineConfig struct {
	tunName    string // interface name or TUNUserspace
	mtu        int
	port       int
	nodeKey    netmap.NodePrivate
	addrs      []netip.Prefix // the node's own tailnet addresses
	forwards   []Forward
	filter     *filter.Filter    // nil: no packet filter (engine tests only)
	bind       magicbind.Options // its NodeKey is nodeKey
	log        *slog.Logger
	localAddrs func() ([]netip.Prefix, error)
	// peerIdle > 0 configures peers in WireGuard only while they have
	// traffic (see lazy.go), removing them after this long idle; 0
	// configures every peer of the map up front.
	peerIdle time.Duration
	// dns, when set, is served on the MagicDNS addresses (dns.go).
	dns *magicDNS
	// flows, when set, counts packets for the flow log.
	flows *flowlog.Table
	// metrics, when set, are served on the resolver addresses' port 80
	// and, if metricsPort is not 0, on that port of the node's tailnet
	// addresses (metrics_listen.go).
	metrics     *agentMetrics
	metricsPort uint16
}

// engine is the running data plane: a TUN (kernel or netstack), the bind,
// and the wireguard-go device between them.
type engine struct {
	cfg  engineConfig
	bind *magicbind.Bind
	dev  *device.Device
	tnet *netstack.Net // userspace mode only
	link *kernelLink   // kernel mode only
	wrap *tunwrap.Wrapper
	port uint16
	mtu  int // the TUN's MTU; changes only in kernel mode (setMTU)

	mu    sync.Mutex
	peers map[netmap.NodePublic]wgPeer // configured in the device
	// want is every peer of the map; with lazy configuration only those
	// with recent traffic are in peers.
	want    map[netmap.NodePublic]wgPeer
	routes  []netip.Prefix
	subnets []netip.Prefix // accepted subnet and exit routes, in meshd's table
	throws  []netip.Prefix // LAN prefixes thrown back to main (--exit-node-allow-lan-access)
	prefs   localapi.RoutePrefs
	router  routerState // kernel mode: forwarding and SNAT for this node's routes

	lazy       *tunwrap.Peers // per-peer data path state
	lazyOn     bool           // peers are configured on demand and trimmed
	lazyCancel context.CancelFunc
	lazyWG     sync.WaitGroup

	closeOnce sync.Once
	fwdCancel context.CancelFunc
	fwdWG     sync.WaitGroup

	dnsSrv *dnsServer // MagicDNS listeners, when cfg.dns is set

	started time.Time // when the data plane came up, for health grace periods
	metSrv  *metricsServer
}

func newEngine(cfg engineConfig) (_ *engine, err error) {
	cfg.bind.NodeKey = cfg.nodeKey
	e := &engine{cfg: cfg, peers: map[netmap.NodePublic]wgPeer{}, mtu: cfg.mtu, started: time.Now()}
	var tdev tun.Device
	if cfg.tunName == TUNUserspace {
		local := netmap.AddrsOf(cfg.addrs)
		if cfg.dns != nil {
			local = append(local, resolverAddrs...) // after ours: see dns.go
		}
		tdev, e.tnet, err = netstack.CreateNetTUN(local, nil, cfg.mtu)
		if err != nil {
			return nil, fmt.Errorf("userspace network stack: %w", err)
		}
	} else {
		tdev, e.link, err = createKernelTUN(cfg.tunName, cfg.mtu, cfg.addrs)
		if err != nil {
			return nil, err
		}
	}
	// The per-peer data path state (lazy configuration, MSS clamping, too
	// big replies) tells which peer sent a packet from the magic bind's
	// per-peer endpoints, and learns each direct path's MTU from it.
	e.bind = magicbind.New(cfg.bind)
	e.lazy = tunwrap.NewPeers()
	e.lazyOn = cfg.peerIdle > 0
	e.bind.SetPathMTUHook(e.lazy.SetPathMTU)
	devBind := &lazyBind{Bind: e.bind, l: e.lazy}
	// The data path (packet filter, peer table) sits right next to the TUN.
	e.wrap = tunwrap.New(tdev, tunwrap.Config{Filter: cfg.filter, Peers: e.lazy, Logger: cfg.log, Flows: cfg.flows})
	tdev = e.wrap
	e.dev = device.NewDevice(tdev, devBind, wgLogger(cfg.log))
	// gVisor answers some packets on the writer's goroutine and hands
	// every packet it emits to the TUN reader over an unbuffered channel:
	// written from a UDP receive goroutine, that is a deadlock with
	// BindUpdate (internal/wireguard/device/inline.go). The device then
	// keeps inbound batches on upstream's pipeline.
	e.dev.SetTUNWriteWaitsForRead(cfg.tunName == TUNUserspace)
	// Run to completion (the device's default on up to 4 Ps) stays off
	// in netstack mode until the first-dial stall seen there once is
	// explained (internal/wireguard/README.md, "Stalls seen with it on").
	// A kernel TUN keeps the default: the stall seen in TestKernelTUN was
	// a saved map without the peer's endpoints, which fails the same way
	// with it off. Measured gain: bench/throughput.md, "Run-to-completion
	// lever".
	if cfg.tunName == TUNUserspace {
		e.dev.SetRunToCompletion(false)
	}
	defer func() {
		if err != nil {
			e.close()
		}
	}()
	{
		ctx, cancel := context.WithCancel(context.Background())
		e.lazyCancel = cancel
		e.lazyWG.Add(1)
		go func() {
			defer e.lazyWG.Done()
			e.runLazy(ctx)
		}()
	}
	if err := e.up(); err != nil {
		return nil, err
	}
	st, err := e.stats()
	if err != nil {
		return nil, err
	}
	e.port = st.ListenPort
	if len(cfg.forwards) > 0 {
		if err := e.startForwards(); err != nil {
			return nil, err
		}
	}
	if cfg.dns != nil {
		if err := e.startDNS(); err != nil {
			cfg.log.Warn("MagicDNS not served on every address; the tunnel works without it", "err", err)
		}
	}
	if cfg.metrics != nil {
		if err := e.startMetrics(); err != nil {
			cfg.log.Warn("metrics not served on every tailnet address; the tunnel works without them", "err", err)
		}
	}
	return e, nil
}

// up sets the device's key and UDP port and brings it up. AutoPort asks
// for DefaultPort and, when another process holds it (several daemons on
// one host, sidecars with host networking), takes a random port with a log
// line, as tailscaled does; a port the user chose stays an error when taken.
//
// The bind is opened by IpcSet if the TUN already brought the device up
// (netstack reports up at once), else by Up, so either may find the port
// taken; a failed attempt leaves the bind closed, ready for another.
func (e *engine) up() error {
	port := e.cfg.port
	if port == AutoPort {
		port = DefaultPort
	}
	k := e.cfg.nodeKey.Raw()
	cfg := fmt.Sprintf("private_key=%x\nlisten_port=%d\n", k[:], port)
	if e.link != nil {
		// The tunnel's own UDP packets bypass meshd's routing table, so
		// an exit node's default route never carries the tunnel itself.
		cfg += fmt.Sprintf("fwmark=%d\n", bypassMark)
	}
	err := e.dev.IpcSet(cfg)
	if err == nil {
		err = e.dev.Up()
	}
	if err == nil && port != 0 {
		// The TUN's first up event brings the device up from a goroutine
		// of wireguard-go's; when that attempt finds the port taken,
		// wireguard-go forgets the port, and our Up then binds a random
		// one without an error. The port actually bound is the truth.
		st, serr := e.stats()
		switch {
		case serr != nil:
			err = serr
		case int(st.ListenPort) != port:
			err = fmt.Errorf("bound port %d instead: %w", st.ListenPort, syscall.EADDRINUSE)
		}
	}
	if err != nil && e.cfg.port == AutoPort && errors.Is(err, syscall.EADDRINUSE) {
		if err = e.dev.IpcSet("listen_port=0\n"); err == nil {
			err = e.dev.Up()
		}
		if err == nil {
			st, err := e.stats()
			if err != nil {
				return err
			}
			e.cfg.log.Warn("default WireGuard UDP port in use (another meshd or tailscaled on this host?); listening on a random port instead: pass --port to choose one",
				"default_port", DefaultPort, "port", st.ListenPort)
			return nil
		}
	}
	switch {
	case errors.Is(err, syscall.EADDRINUSE):
		return fmt.Errorf("WireGuard: UDP port %d is already in use (another meshd or tailscaled on this host?): pass a free --port, or --port 0 for a random one: %w", port, err)
	case err != nil:
		return fmt.Errorf("WireGuard up (UDP port %d): %w", port, err)
	}
	return nil
}

// wantPeers is the WireGuard configuration of nm's peers, each with the
// magic bind's per-peer endpoint.
func (e *engine) wantPeers(nm *netmap.NetworkMap) map[netmap.NodePublic]wgPeer {
	locals, _ := e.cfg.localAddrs() // best effort: only used to rank endpoints
	want := wgPeersFromMap(nm, func(c []netip.AddrPort) netip.AddrPort { return pickEndpoint(locals, c) })
	setMagicEndpoints(want)
	return want
}

// applyMap reconciles WireGuard peers and kernel routes with nm.
func (e *engine) applyMap(nm *netmap.NetworkMap) error {
	want := e.wantPeers(nm)
	e.bind.SetNetworkMap(nm)
	e.mu.Lock()
	defer e.mu.Unlock()
	var errs []error
	target := want
	if e.lazyOn {
		// Only peers already configured stay (with the map's endpoint and
		// addresses); the rest wait for their first packet.
		target = make(map[netmap.NodePublic]wgPeer, len(e.peers))
		for k, have := range e.peers {
			if w, ok := want[k]; ok {
				w.Keepalive = have.Keepalive
				target[k] = w
			}
		}
	}
	if diff := uapiDiff(e.peers, target); diff != "" {
		if err := e.dev.IpcSet(diff); err != nil {
			errs = append(errs, fmt.Errorf("configure WireGuard peers: %w", err))
		} else {
			e.peers = target
		}
	}
	if e.want == nil || !sameShape(e.want, want) {
		e.publishPeers(want)
	}
	e.want = want
	if e.link != nil {
		routes := tailnetRoutes(e.cfg.addrs, nm)
		if !slices.Equal(routes, e.routes) {
			if err := e.link.setRoutes(routes, e.cfg.addrs); err != nil {
				errs = append(errs, err)
			}
			e.routes = routes
		}
		subnets, throws := tableRoutes(e.cfg.addrs, nm, e.prefs, e.cfg.localAddrs)
		if !slices.Equal(subnets, e.subnets) || !slices.Equal(throws, e.throws) {
			if err := e.link.setTableRoutes(subnets, throws, e.cfg.addrs); err != nil {
				errs = append(errs, err)
			}
			e.subnets, e.throws = subnets, throws
		}
	}
	return errors.Join(errs...)
}

// tailnetRoutes is the set of routes through the TUN: the whole CGNAT range
// when our IPv4 address is in it, the /48 our IPv6 address is in (the
// coordinator allocates a tailnet's IPv6 addresses from one ULA /48), and
// any peer prefix outside those (subnet routes). Whole ranges rather than
// per-peer routes keep the kernel table constant as peers come and go;
// WireGuard's cryptokey routing drops packets to addresses no peer has.
func tailnetRoutes(self []netip.Prefix, nm *netmap.NetworkMap) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range self {
		switch {
		case p.Addr().Is4() && cgnatRange.Contains(p.Addr()):
			out = append(out, cgnatRange)
		case p.Addr().Is6():
			r, _ := p.Addr().Prefix(48)
			out = append(out, r)
		}
	}
	slices.SortFunc(out, netmap.ComparePrefix)
	return slices.Compact(out)
}

// tableRoutes are the routes of meshd's own table: the accepted subnet
// routes and, with --exit-node, the default routes (always, so that with
// the exit node gone traffic fails closed in WireGuard instead of leaking
// out of the LAN); throws are the LAN prefixes that --exit-node-allow-lan-
// access sends back to the main table.
func tableRoutes(self []netip.Prefix, nm *netmap.NetworkMap, p localapi.RoutePrefs, locals func() ([]netip.Prefix, error)) (routes, throws []netip.Prefix) {
	routes = subnetRoutes(self, nm)
	if p.ExitNode == "" {
		return routes, nil
	}
	routes = append(routes, netmap.ExitRouteV4, netmap.ExitRouteV6)
	slices.SortFunc(routes, netmap.ComparePrefix)
	routes = slices.Compact(routes)
	if p.ExitNodeAllowLANAccess && locals != nil {
		ls, _ := locals()
		for _, l := range ls {
			a := l.Addr()
			if a.IsLoopback() || a.IsLinkLocalUnicast() || l.Bits() == l.Addr().BitLen() ||
				netmap.TailnetIPv4Range.Contains(a) || netmap.TailnetIPv6Range.Contains(a) {
				continue
			}
			throws = append(throws, l.Masked())
		}
		slices.SortFunc(throws, netmap.ComparePrefix)
		throws = slices.Compact(throws)
	}
	return routes, throws
}

// subnetRoutes are the peer prefixes outside the tailnet's ranges: the
// subnet routes this node accepted and the exit routes of its exit node
// (routedMap has cut the rest). They go into meshd's own routing table,
// never the host's main one.
func subnetRoutes(self []netip.Prefix, nm *netmap.NetworkMap) []netip.Prefix {
	covered := tailnetRoutes(self, nm)
	var out []netip.Prefix
	for _, n := range nm.Peers {
		for _, p := range n.AllowedIPs {
			if p.Bits() == 0 {
				out = append(out, p)
				continue
			}
			if slices.ContainsFunc(covered, func(c netip.Prefix) bool { return c.Bits() <= p.Bits() && c.Contains(p.Addr()) }) {
				continue
			}
			if slices.Contains(self, p) {
				continue
			}
			out = append(out, p)
		}
	}
	slices.SortFunc(out, netmap.ComparePrefix)
	return slices.Compact(out)
}

func (e *engine) stats() (*wgDeviceStats, error) {
	var b strings.Builder
	if err := e.dev.IpcGetOperation(&b); err != nil {
		return nil, fmt.Errorf("read WireGuard state: %w", err)
	}
	return parseUAPIGet(b.String())
}

// dial opens a TCP connection to addr inside the tailnet.
func (e *engine) dial(ctx context.Context, addr netip.AddrPort) (net.Conn, error) {
	if e.tnet != nil {
		return e.tnet.DialContextTCPAddrPort(ctx, addr)
	}
	var d net.Dialer
	return d.DialContext(ctx, "tcp", addr.String())
}

// listen opens a TCP listener on our tailnet address (userspace mode: in the
// netstack; kernel mode: on the TUN's address).
func (e *engine) listen(addr netip.AddrPort) (net.Listener, error) {
	if e.tnet != nil {
		return e.tnet.ListenTCPAddrPort(addr)
	}
	// Bound to the TUN as well as to the tailnet address: Linux's weak
	// host model would otherwise accept a connection to that address from
	// any interface, so a LAN neighbour routing the tailnet address to
	// this host would bypass WireGuard and the packet filter.
	return listenOnLink(linkName(e.link), addr)
}

// Forward sends inbound tailnet TCP connections on Port to Target, a local
// host:port. It is how a sidecar exposes its pod's service to the tailnet
// in userspace mode.
type Forward struct {
	Port   uint16
	Target string
}

func (f Forward) String() string { return fmt.Sprintf("%d=%s", f.Port, f.Target) }

func (e *engine) startForwards() error {
	ctx, cancel := context.WithCancel(context.Background())
	e.fwdCancel = cancel
	for _, f := range e.cfg.forwards {
		for _, a := range e.cfg.addrs {
			ln, err := e.listen(netip.AddrPortFrom(a.Addr(), f.Port))
			if err != nil {
				cancel()
				e.fwdWG.Wait()
				return fmt.Errorf("forward %v: listen on %v: %w", f, a.Addr(), err)
			}
			e.fwdWG.Add(1)
			go func() {
				defer e.fwdWG.Done()
				e.serveForward(ctx, ln, f)
			}()
		}
	}
	return nil
}

func (e *engine) serveForward(ctx context.Context, ln net.Listener, f Forward) {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() == nil {
				e.cfg.log.Warn("forward stopped", "forward", f.String(), "err", err)
			}
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			stopConn := context.AfterFunc(ctx, func() { c.Close() })
			defer stopConn()
			var d net.Dialer
			out, err := d.DialContext(ctx, "tcp", f.Target)
			if err != nil {
				e.cfg.log.Warn("forward: local target unreachable", "forward", f.String(), "from", c.RemoteAddr(), "err", err)
				return
			}
			defer out.Close()
			proxy.Relay(c, c, out)
		}()
	}
}

func (e *engine) close() { e.closeOnce.Do(e.doClose) }

// setMTU moves a kernel-mode data plane to a new overlay MTU: the TUN
// (wireguard-go follows its netlink event) and the path MTU probes.
func (e *engine) setMTU(mtu int) error {
	if e.link == nil {
		return errors.New("the userspace network stack cannot change its MTU while running")
	}
	if err := e.link.setMTU(mtu); err != nil {
		return err
	}
	e.mtu = mtu
	e.bind.SetOverlayMTU(mtu)
	return nil
}

func (e *engine) doClose() {
	e.stopMetrics()
	e.stopDNS()
	if e.fwdCancel != nil {
		e.fwdCancel()
		e.fwdWG.Wait()
	}
	// Before the device: its Close waits for the TUN reader, which may be
	// waiting for a peer's configuration.
	e.lazy.Close()
	e.dev.Close() // closes the TUN and the bind; a kernel TUN vanishes with it
	if e.link != nil {
		// The TUN's routes left with it; the rule and the NAT chain did not.
		if err := e.link.cleanupRouting(); err != nil {
			e.cfg.log.Warn("remove meshd's routing rule and NAT rules", "err", err)
		}
	}
	if e.lazyCancel != nil {
		e.lazyCancel()
		e.lazyWG.Wait()
	}
}

// configuredPeers is how many peers are in the WireGuard device now.
func (e *engine) configuredPeers() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.peers)
}
