package agent

import (
	"net/netip"
	"path/filepath"
	"slices"
	"sync/atomic"

	"meshd.dev/meshd/agent/osdns"
	"meshd.dev/meshd/netmap"
)

// dnsBackupFile is the state dir file that holds the host's resolver file
// while meshd's is in place (package osdns).
const dnsBackupFile = "dns-backup.json"

// osDNS is the host's DNS configuration as the agent manages it: in
// kernel TUN mode, with the node up, accepting DNS (`meshd up
// --accept-dns`, the default) and a map that carries a DNS config, the
// host resolves through meshd's resolver; otherwise meshd leaves it
// alone. Fields are guarded by Agent.mu except active.
type osDNS struct {
	c osdns.Configurator // nil while meshd does not configure the host
	// applied is the config c holds, nil before a Set succeeded.
	applied *osdns.Config
	lastErr string // the last failure logged, to log each new one once
	// active is c for readers that must not take Agent.mu (the resolver
	// asks for upstreams per forwarded query, possibly while the agent
	// holds mu and waits for the data plane to stop).
	active atomic.Pointer[configuratorBox]
}

type configuratorBox struct{ c osdns.Configurator }

func (a *Agent) osdnsOptions(ifindex int) osdns.Options {
	o := osdns.Options{
		ResolvConf: a.opts.ResolvConf, BackupFile: filepath.Join(a.store.Dir(), dnsBackupFile),
		IfIndex: ifindex, Logger: a.log,
	}
	if a.opts.ResolvConf != "" {
		// An explicit file (a namespace's, a container's) is the one the
		// node's resolver reads: systemd-resolved, if the machine runs
		// one, serves another network namespace and must not be touched.
		o.Mode = osdns.ModeFile
	}
	return o
}

// recoverOSDNS puts back the host's resolver file if a daemon that did
// not stop cleanly left meshd's in place. It runs at every start, in
// every mode: a node restarted in netstack mode or with --accept-dns=false
// after a crash must not keep pointing the host at a resolver that is no
// longer there.
func (a *Agent) recoverOSDNS() {
	if err := osdns.Recover(a.osdnsOptions(0)); err != nil {
		a.log.Error("DNS: restoring the host's resolver file", "err", err)
	}
}

// wantOSDNSLocked is the configuration the host should have for nm, and
// whether meshd should configure the host at all.
func (a *Agent) wantOSDNSLocked(nm *netmap.NetworkMap) (osdns.Config, bool) {
	if a.opts.TUN == TUNUserspace || a.eng == nil || a.eng.link == nil || a.login == nil || a.login.NoAcceptDNS ||
		nm == nil || nm.DNS.Suffix == "" {
		return osdns.Config{}, false
	}
	cfg := osdns.Config{
		Nameservers:   []netip.Addr{netmap.ResolverIPv4},
		SearchDomains: slices.Clone(nm.DNS.SearchDomains),
		MatchDomains:  []string{nm.DNS.Suffix},
	}
	// The IPv6 resolver is reachable only through the /48 route a node
	// with an IPv6 tailnet address installs.
	if slices.ContainsFunc(a.eng.cfg.addrs, func(p netip.Prefix) bool { return p.Addr().Is6() }) {
		cfg.Nameservers = append(cfg.Nameservers, netmap.ResolverIPv6)
	}
	routes := make([]string, 0, len(nm.DNS.Routes))
	for d := range nm.DNS.Routes {
		if d != nm.DNS.Suffix {
			routes = append(routes, d)
		}
	}
	slices.Sort(routes)
	cfg.MatchDomains = append(cfg.MatchDomains, routes...)
	return cfg, true
}

// syncOSDNSLocked brings the host's DNS in line with nm and the node's
// preference. A failure is logged (once per distinct error) and retried
// with the next map; the tunnel works without it. a.mu held.
func (a *Agent) syncOSDNSLocked(nm *netmap.NetworkMap) {
	want, ok := a.wantOSDNSLocked(nm)
	if !ok {
		a.closeOSDNSLocked()
		return
	}
	d := &a.hostDNS
	if d.c == nil {
		c, err := osdns.New(a.osdnsOptions(a.eng.link.index()))
		if err != nil {
			a.osdnsFailed("cannot configure the host's DNS", err)
			return
		}
		d.c = c
		d.active.Store(&configuratorBox{c})
	}
	// Set on every map, not only when the config changes: for a resolver
	// file it is one read, and it puts meshd's file back if a DHCP client
	// or an admin replaced it since.
	changed := d.applied == nil || !d.applied.Equal(want)
	if err := d.c.Set(want); err != nil {
		d.applied = nil
		a.osdnsFailed("setting the host's DNS", err)
		return
	}
	d.applied, d.lastErr = &want, ""
	if !changed {
		return
	}
	a.log.Info("DNS: the host resolves through meshd", "via", d.c.String(), "nameservers", want.Nameservers,
		"search", want.SearchDomains, "match", want.MatchDomains)
}

func (a *Agent) osdnsFailed(what string, err error) {
	if err.Error() == a.hostDNS.lastErr {
		return
	}
	a.hostDNS.lastErr = err.Error()
	a.log.Warn("DNS: "+what+"; tailnet names will not resolve on this host", "err", err)
}

// closeOSDNSLocked gives the host its own DNS configuration back. Call it
// before the TUN goes away. a.mu held.
func (a *Agent) closeOSDNSLocked() {
	d := &a.hostDNS
	if d.c == nil {
		return
	}
	d.active.Store(nil)
	if err := d.c.Close(); err != nil {
		a.log.Error("DNS: restoring the host's configuration", "via", d.c.String(), "err", err)
	} else {
		a.log.Info("DNS: the host's own configuration is back", "via", d.c.String())
	}
	d.c, d.applied, d.lastErr = nil, nil, ""
}

// DNSUpstreams are the host's resolvers as they are without meshd, where
// the tailnet resolver forwards names it does not serve; never meshd's
// own resolver addresses. It takes no agent lock.
func (a *Agent) DNSUpstreams() []netip.AddrPort {
	if b := a.hostDNS.active.Load(); b != nil {
		return b.c.Upstreams()
	}
	ups, err := osdns.HostUpstreams(a.opts.ResolvConf)
	if err != nil {
		a.log.Debug("DNS: host resolvers", "err", err)
	}
	return ups
}
