package policy

import (
	"net/netip"
	"slices"

	"meshd.dev/meshd/netmap"
)

// internetV4 and internetV6 are what autogroup:internet names, as
// Tailscale defines it: every IPv4 address and global unicast IPv6
// (2000::/3), less the private ranges (RFC 1918, fc00::/7), the tailnet's
// own ranges and link-local space. An exit node's LAN is usually private,
// so exit node use alone does not reach it: a grant naming the CIDR does.
// They are computed once and never modified.
var (
	internetV4 = subtractPrefixes(netip.MustParsePrefix("0.0.0.0/0"),
		netip.MustParsePrefix("10.0.0.0/8"),
		netip.MustParsePrefix("172.16.0.0/12"),
		netip.MustParsePrefix("192.168.0.0/16"),
		netmap.TailnetIPv4Range,
		netip.MustParsePrefix("169.254.0.0/16"))
	internetV6 = subtractPrefixes(netip.MustParsePrefix("2000::/3"),
		netip.MustParsePrefix("fc00::/7"),
		netmap.TailnetIPv6Range,
		netip.MustParsePrefix("fe80::/10"))
)

// inInternet reports whether a is an autogroup:internet address.
func inInternet(a netip.Addr) bool {
	set := internetV4
	if !a.Unmap().Is4() {
		set = internetV6
	}
	a = a.Unmap()
	return slices.ContainsFunc(set, func(p netip.Prefix) bool { return p.Contains(a) })
}

// subtractPrefixes returns from less every prefix of minus, as the fewest
// prefixes, sorted.
func subtractPrefixes(from netip.Prefix, minus ...netip.Prefix) []netip.Prefix {
	out := []netip.Prefix{from}
	for _, m := range minus {
		var next []netip.Prefix
		for _, p := range out {
			next = append(next, subtractOne(p, m)...)
		}
		out = next
	}
	slices.SortFunc(out, netmap.ComparePrefix)
	return out
}

// subtractOne returns p less m.
func subtractOne(p, m netip.Prefix) []netip.Prefix {
	switch {
	case !p.Overlaps(m):
		return []netip.Prefix{p}
	case m.Bits() <= p.Bits():
		return nil // m covers p
	}
	// m is inside p: split p in halves and keep the one without m whole.
	lo := netip.PrefixFrom(p.Addr(), p.Bits()+1)
	hi := netip.PrefixFrom(halfAddr(p), p.Bits()+1)
	return append(subtractOne(lo, m), subtractOne(hi, m)...)
}

// halfAddr is the first address of p's upper half.
func halfAddr(p netip.Prefix) netip.Addr {
	b := p.Addr().AsSlice()
	bit := p.Bits()
	b[bit/8] |= 0x80 >> (bit % 8)
	a, _ := netip.AddrFromSlice(b)
	return a
}

// exitFamilies reports which families n carries exit routes for.
func exitFamilies(n *nodeEntry) (v4, v6 bool) {
	for _, a := range n.allowed {
		if netmap.IsExitRoute(a) {
			if a.Addr().Is4() {
				v4 = true
			} else {
				v6 = true
			}
		}
	}
	return v4, v6
}

// isExitNode reports whether n carries an exit route now.
func isExitNode(n *nodeEntry) bool {
	v4, v6 := exitFamilies(n)
	return v4 || v6
}

// internetNets are the autogroup:internet prefixes exit node n forwards.
func internetNets(n *nodeEntry) []netip.Prefix {
	v4, v6 := exitFamilies(n)
	var out []netip.Prefix
	if v4 {
		out = append(out, internetV4...)
	}
	if v6 {
		out = append(out, internetV6...)
	}
	return out
}

// withoutExitRoutes is n's addresses and routes less its exit routes:
// what "*" names on n (as in Tailscale, "*" is not autogroup:internet).
func withoutExitRoutes(n *nodeEntry) []netip.Prefix {
	if !isExitNode(n) {
		return n.allowed
	}
	out := make([]netip.Prefix, 0, len(n.allowed))
	for _, a := range n.allowed {
		if !netmap.IsExitRoute(a) {
			out = append(out, a)
		}
	}
	return out
}

// viaOK reports whether a target of rule cr applies on n: always, unless
// the grant has "via", which names the routers (by tag) that may carry it.
func viaOK(cr *crule, n *nodeEntry) bool {
	if len(cr.r.via) == 0 {
		return true
	}
	for _, v := range cr.r.via {
		if slices.Contains(n.keys, idKey{selTag, v.name}) {
			return true
		}
	}
	return false
}

// UsesExit reports whether viewer may use exit node exit: some rule lets
// viewer send exit's filter traffic it forwards only as an exit node
// (autogroup:internet, or a CIDR outside the tailnet and outside exit's
// other routes), and any "via" of that rule names exit. The coordinator
// gives exit's default routes only to the peers it answers true for
// (control.ExitUser); exit's filter enforces the same either way. Like
// CanSee it needs no node index.
func (e *Engine) UsesExit(viewer, exit *netmap.Node) bool {
	x, y := transientEntry(viewer), transientEntry(exit)
	if x.id == y.id || !isExitNode(y) {
		return false
	}
	for _, tr := range e.dstInternet {
		if viaOK(tr.rule, y) && srcMatches(tr.rule, x) {
			return true
		}
	}
	own := withoutExitRoutes(y)
	for _, tr := range e.dstPrefix {
		p := tr.sel.prefix
		if p.Overlaps(netmap.TailnetIPv4Range) || p.Overlaps(netmap.TailnetIPv6Range) {
			continue
		}
		if slices.ContainsFunc(own, func(a netip.Prefix) bool { return a.Bits() <= p.Bits() && a.Contains(p.Addr()) }) {
			continue // a subnet exit routes anyway, without being an exit node
		}
		if prefixDst(p, y) && viaOK(tr.rule, y) && srcMatches(tr.rule, x) {
			return true
		}
	}
	return false
}
