package osdns

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/godbus/dbus/v5"
)

// systemd-resolved's D-Bus names (org.freedesktop.resolve1(5)).
const (
	resolvedName    = "org.freedesktop.resolve1"
	resolvedPath    = dbus.ObjectPath("/org/freedesktop/resolve1")
	resolvedManager = "org.freedesktop.resolve1.Manager"
	// resolvedNoSuchLink is RevertLink's error for a link resolved no
	// longer knows (the TUN is already gone, and its settings with it).
	resolvedNoSuchLink = "org.freedesktop.resolve1.NoSuchLink"
)

// resolvedAddr is one (iay) of SetLinkDNS: an address family (AF_INET,
// AF_INET6) and the address bytes.
type resolvedAddr struct {
	Family  int32
	Address []byte
}

// resolvedDomain is one (sb) of SetLinkDomains: a domain and whether it
// only routes queries (resolved's "~domain") or is also a search domain.
type resolvedDomain struct {
	Domain      string
	RoutingOnly bool
}

// resolvedServer is one (iiay) of the Manager's DNS property: the link
// (0: global), address family and address of a server resolved uses.
type resolvedServer struct {
	IfIndex int32
	Family  int32
	Address []byte
}

// resolvedConfigurator sets per-link DNS on the TUN in systemd-resolved.
//
// Only the tailnet's domains are routed to meshd (SetLinkDefaultRoute
// false): names outside them keep going to the host's own servers by
// resolved's routing, without a hop through meshd. So the host's name
// service does not depend on the daemon, the tunnel or the coordinator;
// a stopped or wedged meshd costs the tailnet's names only; and ordinary
// lookups are not slowed or logged by it. Tailscale takes every name
// ("~.") only when the admin overrides the host's servers; meshd's
// network map has no such setting, so it never needs to.
type resolvedConfigurator struct {
	conn    *dbus.Conn
	obj     dbus.BusObject
	ifindex int32
	timeout time.Duration
	log     *slog.Logger

	mu        sync.Mutex
	upstreams []netip.AddrPort
	applied   *Config // the last config set on the link
	closed    bool
}

func newResolvedConfigurator(opts Options) (*resolvedConfigurator, error) {
	if opts.IfIndex <= 0 || opts.IfIndex > 1<<31-1 {
		return nil, fmt.Errorf("systemd-resolved: no TUN link index (%d)", opts.IfIndex)
	}
	conn, err := connectBus(opts.BusAddress)
	if err != nil {
		return nil, err
	}
	running, err := resolvedRunning(conn, opts.Timeout)
	if err == nil && !running {
		err = errors.New("systemd-resolved is not running (no owner of " + resolvedName + " on the bus)")
	}
	if err != nil {
		conn.Close()
		return nil, err
	}
	c := &resolvedConfigurator{
		conn: conn, obj: conn.Object(resolvedName, resolvedPath), ifindex: int32(opts.IfIndex),
		timeout: opts.Timeout, log: opts.Logger,
	}
	ctx, cancel := callContext(opts.Timeout)
	defer cancel()
	c.upstreams = c.readUpstreams(ctx, nil)
	return c, nil
}

func connectBus(addr string) (*dbus.Conn, error) {
	var conn *dbus.Conn
	var err error
	if addr == "" {
		conn, err = dbus.ConnectSystemBus()
	} else {
		conn, err = dbus.Connect(addr)
	}
	if err != nil {
		return nil, fmt.Errorf("system D-Bus: %w", err)
	}
	return conn, nil
}

// resolvedRunning asks the bus whether resolved holds its name. It asks
// NameHasOwner rather than calling resolved, so that a stopped resolved is
// not started by bus activation just to be told about a tunnel.
func resolvedRunning(conn *dbus.Conn, timeout time.Duration) (bool, error) {
	ctx, cancel := callContext(timeout)
	defer cancel()
	var has bool
	if err := conn.BusObject().CallWithContext(ctx, "org.freedesktop.DBus.NameHasOwner", 0, resolvedName).Store(&has); err != nil {
		return false, fmt.Errorf("system D-Bus: NameHasOwner: %w", err)
	}
	return has, nil
}

func (c *resolvedConfigurator) String() string {
	return fmt.Sprintf("systemd-resolved (link %d)", c.ifindex)
}

func (c *resolvedConfigurator) Upstreams() []netip.AddrPort {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.upstreams)
}

func (c *resolvedConfigurator) call(ctx context.Context, method string, args ...any) error {
	if err := c.obj.CallWithContext(ctx, resolvedManager+"."+method, 0, args...).Err; err != nil {
		return fmt.Errorf("systemd-resolved %s: %w", method, err)
	}
	return nil
}

// Set gives the TUN link meshd's resolvers and the tailnet's domains.
func (c *resolvedConfigurator) Set(cfg Config) error {
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("DNS configuration: %w", err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return errors.New("systemd-resolved: configurator closed")
	}
	if c.applied != nil && c.applied.Equal(cfg) {
		// resolved keeps a link's settings for the link's life: asking
		// again per network map would only cost D-Bus round trips.
		return nil
	}
	c.applied = nil
	// One deadline for the whole change: the agent waits for it, and a
	// wedged resolved must cost it Timeout, not Timeout per call.
	ctx, cancel := callContext(c.timeout)
	defer cancel()
	addrs := make([]resolvedAddr, 0, len(cfg.Nameservers))
	for _, a := range cfg.Nameservers {
		fam := int32(syscall.AF_INET)
		if a.Is6() && !a.Is4In6() {
			fam = syscall.AF_INET6
		}
		addrs = append(addrs, resolvedAddr{Family: fam, Address: a.Unmap().AsSlice()})
	}
	if err := c.call(ctx, "SetLinkDNS", c.ifindex, addrs); err != nil {
		return err
	}
	// Search domains are routing domains in resolved as well, so a match
	// domain that is also a search domain is listed once, as search.
	var domains []resolvedDomain
	seen := map[string]bool{}
	for _, ds := range []struct {
		list    []string
		routing bool
	}{{cfg.SearchDomains, false}, {cfg.MatchDomains, true}} {
		for _, d := range ds.list {
			d = strings.TrimSuffix(d, ".")
			if seen[d] {
				continue
			}
			seen[d] = true
			domains = append(domains, resolvedDomain{Domain: d, RoutingOnly: ds.routing})
		}
	}
	if err := c.call(ctx, "SetLinkDomains", c.ifindex, domains); err != nil {
		return err
	}
	if err := c.call(ctx, "SetLinkDefaultRoute", c.ifindex, false); err != nil {
		// systemd before 240 has no such method, and without it a link
		// with routing domains is not a default route anyway.
		var de dbus.Error
		if !errors.As(err, &de) || de.Name != dbus.ErrMsgUnknownMethod.Name {
			return err
		}
		c.log.Debug("DNS: systemd-resolved has no SetLinkDefaultRoute (systemd < 240)")
	}
	// Best effort, each: the link is a point-to-point tunnel with no
	// multicast peers, and meshd's resolver does not sign its answers, so
	// a host that validates DNSSEC would reject the tailnet's names.
	for _, s := range []struct{ method, value string }{
		{"SetLinkLLMNR", "no"}, {"SetLinkMulticastDNS", "no"}, {"SetLinkDNSSEC", "no"},
	} {
		if err := c.call(ctx, s.method, c.ifindex, s.value); err != nil {
			c.log.Debug("DNS: systemd-resolved setting not applied", "method", s.method, "err", err)
		}
	}
	// Negative answers cached before the link had its domains would
	// otherwise hide tailnet names for their TTL.
	if err := c.call(ctx, "FlushCaches"); err != nil {
		c.log.Debug("DNS: systemd-resolved FlushCaches", "err", err)
	}
	c.upstreams = c.readUpstreams(ctx, cfg.Nameservers)
	applied := Config{
		Nameservers: slices.Clone(cfg.Nameservers), SearchDomains: slices.Clone(cfg.SearchDomains), MatchDomains: slices.Clone(cfg.MatchDomains),
	}
	c.applied = &applied
	return nil
}

// readUpstreams is the servers resolved uses on the other links and
// globally, without meshd's.
func (c *resolvedConfigurator) readUpstreams(ctx context.Context, own []netip.Addr) []netip.AddrPort {
	var v dbus.Variant
	err := c.obj.CallWithContext(ctx, "org.freedesktop.DBus.Properties.Get", 0, resolvedManager, "DNS").Store(&v)
	if err != nil {
		c.log.Warn("DNS: cannot read systemd-resolved's servers; names meshd does not serve cannot be forwarded", "err", err)
		return nil
	}
	var servers []resolvedServer
	if err := v.Store(&servers); err != nil {
		c.log.Warn("DNS: systemd-resolved's DNS property", "err", err)
		return nil
	}
	var addrs []netip.Addr
	for _, s := range servers {
		if s.IfIndex == c.ifindex {
			continue
		}
		a, ok := netip.AddrFromSlice(s.Address)
		if !ok || a.IsUnspecified() {
			continue
		}
		addrs = append(addrs, a.Unmap())
	}
	return withoutOwn(addrs, own)
}

// Close drops the link's settings (RevertLink) and the bus connection.
func (c *resolvedConfigurator) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil
	}
	c.closed = true
	ctx, cancel := callContext(c.timeout)
	defer cancel()
	err := c.call(ctx, "RevertLink", c.ifindex)
	var de dbus.Error
	if errors.As(err, &de) && de.Name == resolvedNoSuchLink {
		err = nil // the link is gone, and its settings with it
	}
	c.conn.Close()
	return err
}

// managedByResolved reports whether path is systemd-resolved's resolver
// file: a symlink into /run/systemd/resolve/ (or resolved's static copy),
// or a file whose comments say resolved generated it. Only then does
// configuring resolved change what the host's resolver reads; otherwise
// glibc reads the file and the file is what meshd must manage.
func managedByResolved(path string) (bool, string) {
	if target, err := os.Readlink(path); err == nil {
		if !filepath.IsAbs(target) {
			target = filepath.Join(filepath.Dir(path), target)
		}
		target = filepath.Clean(target)
		if strings.HasPrefix(target, "/run/systemd/resolve/") || strings.HasSuffix(target, "/lib/systemd/resolv.conf") {
			return true, "symlink to " + target
		}
	}
	b, err := readBounded(path)
	if err != nil {
		return false, err.Error()
	}
	for line := range strings.Lines(string(b)) {
		if (strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";")) && strings.Contains(line, "systemd-resolved") {
			return true, "file written by systemd-resolved"
		}
	}
	return false, "not written by systemd-resolved"
}
