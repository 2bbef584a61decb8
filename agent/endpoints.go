package agent

import (
	"fmt"
	"net"
	"net/netip"
	"slices"

	"meshd.dev/meshd/netmap"
)

// localPrefixes lists the addresses (with their subnet) of this machine's
// interfaces that are up.
func localPrefixes() ([]netip.Prefix, error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return nil, fmt.Errorf("list interfaces: %w", err)
	}
	var out []netip.Prefix
	for _, ifc := range ifs {
		if ifc.Flags&net.FlagUp == 0 {
			continue
		}
		addrs, err := ifc.Addrs()
		if err != nil {
			continue // an interface vanishing mid-listing is not an error
		}
		for _, a := range addrs {
			ipn, ok := a.(*net.IPNet)
			if !ok {
				continue
			}
			ip, ok := netip.AddrFromSlice(ipn.IP)
			if !ok {
				continue
			}
			ones, _ := ipn.Mask.Size()
			out = append(out, netip.PrefixFrom(ip.Unmap(), ones))
		}
	}
	return out, nil
}

// endpointCandidates turns local interface addresses into the UDP endpoints
// this node reports to the coordinator. Loopback is left out, unless
// loopbackOnly (every node runs on this machine: the demo and tests), when
// only loopback is reported. Link-local addresses (they need a zone) and the tailnet's own
// addresses, the MagicDNS resolver's and the tailnet's IPv6 range (a peer
// reaching us over the tunnel to build the tunnel would be a loop).
func endpointCandidates(locals []netip.Prefix, port uint16, tailnet []netip.Prefix, loopbackOnly bool) []netip.AddrPort {
	var out []netip.AddrPort
	for _, p := range locals {
		a := p.Addr()
		switch {
		case a.IsLoopback() != loopbackOnly,
			a.IsLinkLocalUnicast(), a.IsMulticast(), a.IsUnspecified(),
			slices.ContainsFunc(tailnet, func(t netip.Prefix) bool { return t.Contains(a) }),
			// MagicDNS's addresses sit on the TUN too: a peer sending
			// there would reach its own resolver address, or the tunnel.
			isResolverAddr(a), netmap.TailnetIPv6Range.Contains(a):
			continue
		}
		out = append(out, netip.AddrPortFrom(a, port))
	}
	slices.SortFunc(out, func(x, y netip.AddrPort) int { return x.Compare(y) })
	return slices.Compact(out)
}

// pickEndpoint chooses the candidate most likely to work without NAT
// traversal (that is issue 6's job; its magic bind replaces this): one on a
// subnet we are directly attached to, then IPv4 before IPv6, then loopback
// only if the peer is on this machine, then the coordinator's order.
func pickEndpoint(locals []netip.Prefix, cands []netip.AddrPort) netip.AddrPort {
	best, bestScore := netip.AddrPort{}, -1
	for _, c := range cands {
		a := c.Addr().Unmap()
		if !c.IsValid() || c.Port() == 0 {
			continue
		}
		score := 1
		onLink := slices.ContainsFunc(locals, func(p netip.Prefix) bool { return p.Contains(a) })
		if a.IsLoopback() {
			// Loopback is only ever right for a peer in this very process
			// or machine (the demo); it is on-link by definition, so rank it
			// below real interfaces.
			score = 2
		} else if onLink {
			score = 4
		}
		if a.Is4() {
			score++
		}
		if score > bestScore {
			best, bestScore = c, score
		}
	}
	return best
}
