package agent

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/netmap"
)

// planRouting merges the routing flags f into the node's preferences cur
// and checks the result. It reports whether anything changed; flags typed
// on the command line that change nothing are an error (from the
// environment they are fine).
func planRouting(cur localapi.RoutePrefs, f *localapi.RouteFlags, userspace bool) (localapi.RoutePrefs, bool, error) {
	if f == nil {
		return cur, false, nil
	}
	next := cur
	next.AdvertiseRoutes = slices.Clone(cur.AdvertiseRoutes)
	if f.AdvertiseRoutes != nil {
		for _, p := range *f.AdvertiseRoutes {
			if netmap.IsExitRoute(p) {
				return cur, false, fmt.Errorf("--advertise-routes %v: offer the default route with --advertise-exit-node", p)
			}
		}
		rs, err := netmap.CheckRoutableIPs(*f.AdvertiseRoutes)
		if err != nil {
			return cur, false, fmt.Errorf("--advertise-routes: %w", err)
		}
		if len(rs) == 0 {
			rs = nil
		}
		next.AdvertiseRoutes = rs
	}
	if f.AdvertiseExitNode != nil {
		next.AdvertiseExitNode = *f.AdvertiseExitNode
	}
	if f.AcceptRoutes != nil {
		next.AcceptRoutes = *f.AcceptRoutes
	}
	if f.ExitNode != nil {
		next.ExitNode = strings.TrimSpace(*f.ExitNode)
	}
	if f.ExitNodeAllowLANAccess != nil {
		next.ExitNodeAllowLANAccess = *f.ExitNodeAllowLANAccess
	}
	if f.SNATSubnetRoutes != nil {
		next.NoSNAT = !*f.SNATSubnetRoutes
	}
	switch {
	case next.ExitNodeAllowLANAccess && next.ExitNode == "":
		return cur, false, errors.New("--exit-node-allow-lan-access applies only with --exit-node")
	case next.ExitNode != "" && next.AdvertiseExitNode:
		return cur, false, errors.New("a node cannot use an exit node and offer to be one: drop --exit-node or --advertise-exit-node")
	case userspace && (len(next.AdvertiseRoutes) > 0 || next.AdvertiseExitNode):
		return cur, false, errors.New("this daemon runs the netstack (--tun userspace), which cannot forward packets for other hosts: " +
			"run a kernel TUN daemon to advertise routes or an exit node")
	case userspace && next.ExitNode != "":
		return cur, false, errors.New("--exit-node needs a kernel TUN daemon (netstack mode has no default route to replace)")
	}
	if equalPrefs(cur, next) {
		if f.FromEnv {
			return cur, false, nil
		}
		return cur, false, errors.New("the routing flags given match this node's settings, so they change nothing (meshd status --json shows them under self.routing)")
	}
	return next, true, nil
}

func equalPrefs(a, b localapi.RoutePrefs) bool {
	return slices.Equal(a.AdvertiseRoutes, b.AdvertiseRoutes) && a.AdvertiseExitNode == b.AdvertiseExitNode && a.AcceptRoutes == b.AcceptRoutes &&
		a.ExitNode == b.ExitNode && a.ExitNodeAllowLANAccess == b.ExitNodeAllowLANAccess && a.NoSNAT == b.NoSNAT
}

// hostinfo is what the node reports about its offers. It is never nil:
// an empty list withdraws routes advertised before.
func hostinfo(p localapi.RoutePrefs) *netmap.Hostinfo {
	rs := slices.Clone(p.AdvertiseRoutes)
	if p.AdvertiseExitNode {
		rs = append(rs, netmap.ExitRouteV4, netmap.ExitRouteV6)
	}
	netmap.SortPrefixes(rs)
	if rs == nil {
		rs = []netip.Prefix{}
	}
	return &netmap.Hostinfo{RoutableIPs: rs}
}

// bypassMark (with bypassMask) marks meshd's own underlay sockets (the
// WireGuard/disco UDP socket, relay and coordinator connections): a rule
// sends marked packets to the main table, so routes in meshd's table (an
// exit node's default route above all) never carry the tunnel itself.
const (
	bypassMark = 0x6d0000
	bypassMask = 0xff0000
)

// routerHeartbeat is how often a node that advertises routes reports to
// the coordinator, which hands the subnets of a primary router silent for
// four of these to a standby (control.RouterHeartbeat, RouterSilence).
const routerHeartbeat = 2 * time.Second

// exitNodeID is the peer prefs name as exit node ("" names none): a
// peer whose hostname, MagicDNS name or tailnet address it is, and which
// carries exit routes. 0 when none does.
func exitNodeID(nm *netmap.NetworkMap, name string) netmap.NodeID {
	if name == "" {
		return 0
	}
	ip, ipErr := netip.ParseAddr(name)
	lname := strings.TrimSuffix(strings.ToLower(name), ".")
	suffix := strings.TrimSuffix(strings.ToLower(nm.DNS.Suffix), ".")
	for _, n := range nm.SortedPeers() {
		match := ipErr == nil && slices.ContainsFunc(n.Addresses, func(a netip.Prefix) bool { return a.Addr() == ip.Unmap() }) ||
			ipErr != nil && nodeHasName(n, lname, suffix)
		if match && slices.ContainsFunc(n.PrimaryRoutes, netmap.IsExitRoute) {
			return n.ID
		}
	}
	return 0
}

// routedMap returns the map the data plane follows: nm with each peer's
// AllowedIPs cut down to what this node uses. A peer's own addresses
// always stay; its primary subnet routes only with --accept-routes; exit
// routes only of the --exit-node. nm itself is not modified (status shows
// the routes as published).
func routedMap(nm *netmap.NetworkMap, p localapi.RoutePrefs) *netmap.NetworkMap {
	needs := false
	for _, n := range nm.Peers {
		if len(n.AllowedIPs) > len(n.Addresses) {
			needs = true
			break
		}
	}
	if !needs {
		return nm
	}
	exit := exitNodeID(nm, p.ExitNode)
	out := *nm
	out.Peers = make(map[netmap.NodeID]*netmap.Node, len(nm.Peers))
	for id, n := range nm.Peers {
		out.Peers[id] = n
		if len(n.AllowedIPs) <= len(n.Addresses) {
			continue
		}
		nn := *n
		nn.AllowedIPs = usedAllowedIPs(n, p, id == exit)
		out.Peers[id] = &nn
	}
	return &out
}

// usedAllowedIPs is n's AllowedIPs as this node routes to it.
func usedAllowedIPs(n *netmap.Node, p localapi.RoutePrefs, exitNode bool) []netip.Prefix {
	var out []netip.Prefix
	for _, a := range n.AllowedIPs {
		switch {
		case slices.Contains(n.Addresses, a):
		case netmap.IsExitRoute(a):
			if !exitNode {
				continue
			}
		case !p.AcceptRoutes:
			continue
		case a.Overlaps(netmap.TailnetIPv4Range) || a.Overlaps(netmap.TailnetIPv6Range):
			// A hostile or old coordinator must not make a router take
			// tailnet addresses from their owners.
			continue
		}
		out = append(out, a)
	}
	return out
}

func nonNilPrefixes(ps []netip.Prefix) []netip.Prefix {
	if ps == nil {
		return []netip.Prefix{}
	}
	return ps
}

// routingChangedLocked applies new routing preferences: the data plane
// follows them at once, and the coordinator hears of new offers with the
// next report, which this triggers. a.mu held.
func (a *Agent) routingChangedLocked() {
	if a.nm != nil && a.eng != nil {
		if err := a.applyMapLocked(a.nm); err != nil {
			a.log.Error("apply routing preferences", "err", err)
		}
	}
	select {
	case a.pathsChanged <- struct{}{}:
	default:
	}
}

// setPrefs gives the engine the routing preferences its next applyMap
// follows.
func (e *engine) setPrefs(p localapi.RoutePrefs) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.prefs = p
}
