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

	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun"
	"golang.zx2c4.com/wireguard/tun/netstack"

	"meshd.dev/meshd/agent/magicbind"
	"meshd.dev/meshd/agent/proxy"
	"meshd.dev/meshd/agent/tunwrap"
	"meshd.dev/meshd/filter"
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
	port uint16

	mu    sync.Mutex
	peers map[netmap.NodePublic]wgPeer // configured in the device
	// want is every peer of the map; with lazy configuration only those
	// with recent traffic are in peers.
	want   map[netmap.NodePublic]wgPeer
	routes []netip.Prefix

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
	e := &engine{cfg: cfg, peers: map[netmap.NodePublic]wgPeer{}, started: time.Now()}
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
	tdev = tunwrap.New(tdev, tunwrap.Config{Filter: cfg.filter, Peers: e.lazy, Logger: cfg.log})
	e.dev = device.NewDevice(tdev, devBind, wgLogger(cfg.log))
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
	err := e.dev.IpcSet(fmt.Sprintf("private_key=%x\nlisten_port=%d\n", k[:], port))
	if err == nil {
		err = e.dev.Up()
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
	covered := slices.Clone(out)
	for _, n := range nm.Peers {
		for _, p := range n.AllowedIPs {
			if p.Bits() == 0 {
				continue // a default route is an exit node's job, not this issue's
			}
			if slices.ContainsFunc(covered, func(c netip.Prefix) bool { return c.Bits() <= p.Bits() && c.Contains(p.Addr()) }) {
				continue
			}
			if slices.ContainsFunc(self, func(s netip.Prefix) bool { return s == p }) {
				continue
			}
			out = append(out, p)
		}
	}
	slices.SortFunc(out, comparePrefix)
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
