package agent

import (
	"net/netip"
	"net/url"
	"strconv"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/netmap"
)

// mtuDests are the underlay addresses tunnel traffic goes to: the
// coordinator (when its URL names an IP), the relays given as IPs, and
// every peer's endpoint candidates.
func mtuDests(nm *netmap.NetworkMap, coordinatorURL string) []netip.Addr {
	var dsts []netip.Addr
	if u, err := url.Parse(coordinatorURL); err == nil {
		if ip, err := netip.ParseAddr(u.Hostname()); err == nil {
			dsts = append(dsts, ip)
		}
	}
	if nm == nil {
		return dsts
	}
	for _, r := range nm.DERPMap.Regions {
		for _, n := range r.Nodes {
			if ip, err := netip.ParseAddr(n.Host); err == nil {
				dsts = append(dsts, ip)
			}
		}
	}
	for _, p := range nm.Peers {
		for _, ep := range p.Endpoints {
			dsts = append(dsts, ep.Addr())
		}
	}
	return dsts
}

// chooseMTULocked re-chooses the overlay MTU for nm when it is automatic
// (no --mtu). The data plane is not touched; see followMTULocked.
func (a *Agent) chooseMTULocked(nm *netmap.NetworkMap) {
	if !a.mtuAuto {
		return
	}
	coord := ""
	if a.login != nil {
		coord = a.login.CoordinatorURL
	}
	c := chooseMTU(systemLinks(), a.opts.TUN, routeLookup, mtuDests(nm, coord))
	if c != a.mtu {
		a.log.Info("overlay MTU chosen", "mtu", c.mtu, "interface", c.iface, "underlay_mtu", c.underlayMTU, "why", c.reason)
	}
	a.mtu = c
}

// followMTULocked moves a running kernel-mode data plane to the chosen
// MTU. A netstack's MTU is fixed when it is created: it follows at the
// next data plane start.
func (a *Agent) followMTULocked() {
	// With --mtu the TUN keeps it: nothing was chosen to follow.
	if !a.mtuAuto || a.eng == nil || a.eng.link == nil || a.eng.mtu == a.mtu.mtu {
		return
	}
	if err := a.eng.setMTU(a.mtu.mtu); err != nil {
		a.log.Warn("overlay MTU not changed", "err", err)
	}
}

// mtuStatusLocked reports the overlay MTU in force and why. a.mu must be held.
func (a *Agent) mtuStatusLocked() *localapi.MTUStatus {
	st := &localapi.MTUStatus{MTU: a.opts.MTU, Auto: a.mtuAuto}
	if a.eng != nil {
		st.MTU = a.eng.mtu
	}
	if !a.mtuAuto {
		st.Reason = "set with --mtu"
		return st
	}
	st.Interface, st.UnderlayMTU, st.Reason = a.mtu.iface, a.mtu.underlayMTU, a.mtu.reason
	if a.eng != nil && a.eng.link == nil && a.eng.mtu != a.mtu.mtu {
		st.Reason += "; the userspace network stack keeps " + strconv.Itoa(a.eng.mtu) + " until the data plane restarts"
	}
	return st
}
