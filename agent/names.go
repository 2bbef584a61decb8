package agent

import (
	"bytes"
	"encoding/json"
	"maps"
	"slices"

	"meshd.dev/meshd/netmap"
)

// setNamesLocked rebuilds the whois index and the MagicDNS table from nm
// when anything they answer from changed since the map they were last
// built from. Most maps of a big tailnet only patch endpoints or online
// state; rebuilding both tables for those cost ~35 ms of a.mu at 10,000
// peers. a.mu held (or a not yet shared).
func (a *Agent) setNamesLocked(nm *netmap.NetworkMap) {
	if a.namesFrom != nil && !namesChanged(a.namesFrom, nm) {
		a.namesFrom = nm
		return
	}
	a.whois.Set(nm)
	a.dns.res.SetMap(nm)
	a.namesFrom = nm
}

// namesChanged reports whether cur differs from prev in what whois or
// MagicDNS answer from: the DNS configuration, the set of nodes and each
// node's names, addresses, routes, owner, tags, OS and capabilities. Maps
// come from NetworkMap.Clone and Apply, which replace a changed peer's
// *Node and keep the pointer of an unchanged one, so most peers cost one
// pointer comparison.
func namesChanged(prev, cur *netmap.NetworkMap) bool {
	if len(prev.Peers) != len(cur.Peers) || !sameNames(&prev.Self, &cur.Self) || !sameDNS(&prev.DNS, &cur.DNS) {
		return true
	}
	for id, p := range cur.Peers {
		q, ok := prev.Peers[id]
		if !ok {
			return true
		}
		if p != q && !sameNames(p, q) {
			return true
		}
	}
	return false
}

func sameNames(a, b *netmap.Node) bool {
	return a.ID == b.ID && a.Hostname == b.Hostname && a.DNSName == b.DNSName && a.OS == b.OS && a.User == b.User &&
		slices.Equal(a.Tags, b.Tags) && slices.Equal(a.Addresses, b.Addresses) && slices.Equal(a.AllowedIPs, b.AllowedIPs) &&
		maps.EqualFunc(a.Capabilities, b.Capabilities, func(x, y []json.RawMessage) bool {
			return slices.EqualFunc(x, y, func(u, v json.RawMessage) bool { return bytes.Equal(u, v) })
		})
}

func sameDNS(a, b *netmap.DNSConfig) bool {
	return a.Suffix == b.Suffix && slices.Equal(a.SearchDomains, b.SearchDomains) && maps.EqualFunc(a.Routes, b.Routes, slices.Equal)
}
