// Package osdns points the host's name resolution at meshd's resolver while
// the node is up in kernel TUN mode, and puts the host's own configuration
// back afterwards.
//
// Two methods, chosen by New:
//
//   - systemd-resolved, over D-Bus, when /etc/resolv.conf is resolved's and
//     resolved is running: the TUN link gets meshd's resolver addresses and
//     the tailnet's domains as per-link settings (SetLinkDNS,
//     SetLinkDomains, SetLinkDefaultRoute). No file is edited, and the
//     settings vanish with the link if the daemon dies.
//   - the resolver file (/etc/resolv.conf, or the path the daemon is given):
//     replaced by a file naming meshd's resolver, after a backup of the
//     original in the daemon's state dir. Close restores the original; a
//     daemon that starts and finds a backup (it was killed) restores it first
//     (Recover), but only while the file is still the one meshd wrote.
//
// Paths and the bus come from the daemon's own flags, never from the local
// API or the network map; what the map supplies (domains) is validated
// before anything is written. See docs/osdns.md.
package osdns

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"time"

	"meshd.dev/meshd/netmap"
)

// DefaultResolvConf is the resolver file glibc and musl read.
const DefaultResolvConf = "/etc/resolv.conf"

// Config is the name service meshd wants the host to use.
type Config struct {
	// Nameservers are meshd's resolver addresses (netmap.ResolverIPv4,
	// and ResolverIPv6 when the node has an IPv6 tailnet address). At most
	// three: resolv.conf readers ignore the rest.
	Nameservers []netip.Addr
	// SearchDomains complete single-label names, in order (the MagicDNS
	// suffix first, as the coordinator sends them).
	SearchDomains []string
	// MatchDomains are the domains whose names go to meshd's resolver:
	// the MagicDNS suffix and the split-DNS route domains. With
	// systemd-resolved only these (and the search domains, which resolved
	// also routes) reach meshd; other names keep the host's own servers.
	// A resolv.conf has no routing, so there every name goes to meshd,
	// which forwards what it does not serve to Upstreams.
	MatchDomains []string
}

// Configurator applies a Config to the host. Its methods are safe for
// concurrent use.
type Configurator interface {
	// Set makes the host resolve through cfg. A cfg that does not
	// validate is an error that changes nothing. Calling it again with
	// the same cfg is cheap (the agent does on every network map) and
	// repairs a resolver file something else replaced meanwhile.
	Set(cfg Config) error
	// Close puts back the host's configuration as it was before the
	// first Set and releases what the Configurator holds.
	Close() error
	// Upstreams are the host's resolvers as they are without meshd, where
	// meshd's resolver forwards names it does not serve. They never
	// include meshd's own resolver addresses, so forwarding cannot loop
	// back into meshd.
	Upstreams() []netip.AddrPort
	// String names the method and what it manages, for logs.
	String() string
}

// Mode chooses how New configures the host.
type Mode int

const (
	// ModeAuto uses systemd-resolved when ResolvConf is resolved's and
	// resolved is running on the bus, and the resolver file otherwise.
	ModeAuto Mode = iota
	// ModeFile always manages the resolver file (the daemon's
	// --resolv-conf hook: namespaces and tests must never reach the
	// host's resolved).
	ModeFile
	// ModeResolved always uses systemd-resolved; New fails if it is not
	// running.
	ModeResolved
)

// Options configure New and Recover.
type Options struct {
	Mode Mode
	// ResolvConf is the resolver file; "" means DefaultResolvConf.
	ResolvConf string
	// BackupFile is where the original resolver file is saved (a file in
	// the daemon's state dir). Required.
	BackupFile string
	// IfIndex is the TUN link's index, for systemd-resolved.
	IfIndex int
	// BusAddress is the D-Bus address of the system bus; "" means the
	// system bus (DBUS_SYSTEM_BUS_ADDRESS or its well-known socket).
	BusAddress string
	// Timeout bounds each D-Bus call; 0 means 5s.
	Timeout time.Duration
	Logger  *slog.Logger
}

func (o *Options) setDefaults() error {
	if o.ResolvConf == "" {
		o.ResolvConf = DefaultResolvConf
	}
	if o.BackupFile == "" {
		return errors.New("osdns: no backup file")
	}
	if o.Timeout <= 0 {
		o.Timeout = 5 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

// New returns the Configurator opts choose. It changes nothing on the host
// (a backup left by a daemon that was killed is restored first, as by
// Recover); the first Set does.
func New(opts Options) (Configurator, error) {
	if err := opts.setDefaults(); err != nil {
		return nil, err
	}
	switch opts.Mode {
	case ModeFile:
		return newFileConfigurator(opts)
	case ModeResolved:
		return newResolvedConfigurator(opts)
	case ModeAuto:
	default:
		return nil, fmt.Errorf("osdns: unknown mode %d", opts.Mode)
	}
	managed, why := managedByResolved(opts.ResolvConf)
	if !managed {
		opts.Logger.Debug("DNS: resolver file is not systemd-resolved's; managing the file", "path", opts.ResolvConf, "why", why)
		return newFileConfigurator(opts)
	}
	c, err := newResolvedConfigurator(opts)
	if err == nil {
		return c, nil
	}
	// The file points at resolved's stub but resolved does not answer:
	// name resolution is broken until it comes back, and meshd's file
	// at least resolves the tailnet and forwards the rest upstream.
	opts.Logger.Warn("DNS: resolver file belongs to systemd-resolved, but resolved is not usable; managing the file instead",
		"path", opts.ResolvConf, "err", err)
	return newFileConfigurator(opts)
}

// Validate checks cfg before anything is changed: resolver addresses
// that can be written, and domains that are DNS names (a domain from the
// coordinator ends up in a file the host parses, so nothing but LDH
// labels may get there).
func (cfg Config) Validate() error {
	if len(cfg.Nameservers) == 0 {
		return errors.New("no nameservers")
	}
	if len(cfg.Nameservers) > maxNameservers {
		return fmt.Errorf("%d nameservers: resolv.conf readers use at most %d", len(cfg.Nameservers), maxNameservers)
	}
	for _, a := range cfg.Nameservers {
		if !a.IsValid() || a.Zone() != "" || a.IsUnspecified() {
			return fmt.Errorf("nameserver %v: want a unicast address without a zone", a)
		}
	}
	for _, ds := range [][]string{cfg.SearchDomains, cfg.MatchDomains} {
		for _, d := range ds {
			if err := netmap.CheckDomain(strings.TrimSuffix(d, ".")); err != nil {
				return err
			}
		}
	}
	return nil
}

// Equal reports whether c and o configure the host the same way.
func (c Config) Equal(o Config) bool {
	return slices.Equal(c.Nameservers, o.Nameservers) && slices.Equal(c.SearchDomains, o.SearchDomains) &&
		slices.Equal(c.MatchDomains, o.MatchDomains)
}

// withoutOwn returns the addresses in ns (port 53) except meshd's own.
func withoutOwn(ns []netip.Addr, own []netip.Addr) []netip.AddrPort {
	var out []netip.AddrPort
	for _, a := range ns {
		if isOwn(a, own) {
			continue
		}
		ap := netip.AddrPortFrom(a, 53)
		if !slices.Contains(out, ap) {
			out = append(out, ap)
		}
	}
	return out
}

func isOwn(a netip.Addr, own []netip.Addr) bool {
	a = a.Unmap()
	if a == netmap.ResolverIPv4 || a.WithZone("") == netmap.ResolverIPv6 {
		return true
	}
	for _, o := range own {
		if a.WithZone("") == o {
			return true
		}
	}
	return false
}

// callContext is the context for one D-Bus call.
func callContext(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d)
}
