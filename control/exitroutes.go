package control

import (
	"encoding/json"
	"net/netip"
	"slices"

	"meshd.dev/meshd/netmap"
)

// ExitUser is implemented by policies that decide who may use an exit node
// (policy.Engine: autogroup:internet, "via"). A peer entry of an exit node
// carries its exit routes (0.0.0.0/0, ::/0) in PrimaryRoutes and
// AllowedIPs only for viewers UsesExit answers true for, so a client
// without exit node use cannot route the internet to it; the exit node's
// packet filter enforces the same on the data path whatever a client
// routes. Policies without it give every viewer the exit routes.
type ExitUser interface {
	UsesExit(viewer, exit *netmap.Node) bool
}

// isExitPeer reports whether n carries exit routes now.
func isExitPeer(n *netmap.Node) bool {
	return slices.ContainsFunc(n.PrimaryRoutes, netmap.IsExitRoute)
}

// usesExit reports whether viewer's entry of peer keeps peer's exit
// routes under policy p.
func usesExit(p Policy, viewer, peer *netmap.Node) bool {
	eu, ok := p.(ExitUser)
	return !ok || !isExitPeer(peer) || eu.UsesExit(viewer, peer)
}

// withoutExitRoutes returns n's peer entry with its exit routes cut from
// PrimaryRoutes and AllowedIPs (ApprovedRoutes and AdvertisedRoutes stay:
// they say what the node offers). n itself is not modified.
func withoutExitRoutes(n netmap.Node) netmap.Node {
	keep := func(ps []netip.Prefix) []netip.Prefix {
		out := make([]netip.Prefix, 0, len(ps))
		for _, p := range ps {
			if !netmap.IsExitRoute(p) {
				out = append(out, p)
			}
		}
		if len(out) == 0 {
			return nil
		}
		return out
	}
	n.PrimaryRoutes = keep(n.PrimaryRoutes)
	n.AllowedIPs = keep(n.AllowedIPs)
	return n
}

// peerEntry is peer as viewer is sent it under policy p: with the
// capabilities it holds on viewer, and with its exit routes only if viewer
// may use them.
func peerEntry(p Policy, viewer, peer *netmap.Node, caps map[string][]json.RawMessage) netmap.Node {
	e := withCaps(peer, caps)
	if !usesExit(p, viewer, peer) {
		e = withoutExitRoutes(e)
	}
	return e
}
