package control

import (
	"net/netip"

	"meshd.dev/meshd/netmap"
)

// The tailnet's address pools. IPv4 is the CGNAT range, as Tailscale uses;
// IPv6 is a ULA /48 of our own (fd5e:5a1e:d::/48, "meshd"-ish and not
// Tailscale's fd7a:115c:a1e0::/48, so both can coexist on one machine).
var (
	IPv4Pool = netip.MustParsePrefix("100.64.0.0/10")
	IPv6Pool = netip.MustParsePrefix("fd5e:5a1e:d::/48")
)

// quad100 is never handed out: it is the MagicDNS resolver's address
// (Tailscale users know 100.100.100.100 as MagicDNS).
var quad100 = netmap.ResolverIPv4

// addrPool hands out IPv4s from IPv4Pool skipping .0 and .255 in every /24
// (some stacks and firewalls treat them as network/broadcast), and derives
// each node's IPv6 from its IPv4 so the pair stays stable together.
type addrPool struct{}

func (addrPool) Size() int { return (1 << 14) * 254 }

func (addrPool) Next(prev netip.Addr) netip.Addr {
	first := IPv4Pool.Addr().Next() // 100.64.0.1
	if !prev.IsValid() || !IPv4Pool.Contains(prev) {
		return first
	}
	for a := prev.Next(); ; a = a.Next() {
		if !IPv4Pool.Contains(a) {
			a = first
		}
		b := a.As4()
		if b[3] == 0 || b[3] == 255 || a == quad100 {
			continue
		}
		return a
	}
}

func (addrPool) Addresses(v4 netip.Addr) []netip.Prefix {
	return []netip.Prefix{netip.PrefixFrom(v4, 32), netip.PrefixFrom(v6For(v4), 128)}
}

// v6For embeds the IPv4 in the low 32 bits of the ULA /48.
func v6For(v4 netip.Addr) netip.Addr {
	b := IPv6Pool.Addr().As16()
	a := v4.As4()
	copy(b[12:], a[:])
	return netip.AddrFrom16(b)
}
