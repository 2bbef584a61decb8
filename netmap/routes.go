package netmap

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
)

// MaxRoutableIPs bounds the routes one node may advertise, so that one
// node cannot make every map it appears in arbitrarily large.
const MaxRoutableIPs = 256

// The tailnet's own address ranges (the coordinator allocates from them).
// No node may advertise a route inside or around them: that would let it
// claim other nodes' addresses.
var (
	TailnetIPv4Range = netip.MustParsePrefix("100.64.0.0/10")
	TailnetIPv6Range = netip.MustParsePrefix("fd5e:5a1e:d::/48")
)

// Exit routes: a node advertising them offers to be an exit node.
var (
	ExitRouteV4 = netip.MustParsePrefix("0.0.0.0/0")
	ExitRouteV6 = netip.MustParsePrefix("::/0")
)

// IsExitRoute reports whether p is a default route (an exit node's).
func IsExitRoute(p netip.Prefix) bool { return p.IsValid() && p.Bits() == 0 }

// CheckRoutableIPs validates the routes a node advertises and returns them
// sorted without duplicates. A route must be a masked prefix (10.1.0.0/24,
// not 10.1.0.1/24) of a unicast range; it must not overlap the tailnet's
// own ranges (except the exit routes 0.0.0.0/0 and ::/0 themselves), nor
// loopback, link-local or multicast space.
func CheckRoutableIPs(ps []netip.Prefix) ([]netip.Prefix, error) {
	if len(ps) > MaxRoutableIPs {
		return nil, fmt.Errorf("%d routes advertised, at most %d", len(ps), MaxRoutableIPs)
	}
	out := make([]netip.Prefix, 0, len(ps))
	for _, p := range ps {
		if err := checkRoute(p); err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	SortPrefixes(out)
	return slices.Compact(out), nil
}

func checkRoute(p netip.Prefix) error {
	switch {
	case !p.IsValid():
		return fmt.Errorf("route %v is not a valid prefix", p)
	case p.Addr().Zone() != "":
		return fmt.Errorf("route %v: zones are not allowed", p)
	case p.Addr().Is4In6():
		return fmt.Errorf("route %v: write IPv4 routes as IPv4", p)
	case p.Masked() != p:
		return fmt.Errorf("route %v has host bits set: did you mean %v?", p, p.Masked())
	case IsExitRoute(p):
		return nil
	}
	for _, r := range []netip.Prefix{TailnetIPv4Range, TailnetIPv6Range} {
		if r.Overlaps(p) {
			return fmt.Errorf("route %v overlaps the tailnet's own range %v: nodes reach tailnet addresses directly", p, r)
		}
	}
	a := p.Addr()
	if a.IsLoopback() || a.IsLinkLocalUnicast() || a.IsMulticast() || a.IsInterfaceLocalMulticast() || a.IsLinkLocalMulticast() {
		return fmt.Errorf("route %v is not routable unicast space", p)
	}
	for _, r := range nonRoutable {
		if r.Overlaps(p) {
			return fmt.Errorf("route %v overlaps %v, which is not routable unicast space", p, r)
		}
	}
	return nil
}

// nonRoutable is what a route may not cover except as an exit route.
var nonRoutable = []netip.Prefix{
	netip.MustParsePrefix("127.0.0.0/8"),
	netip.MustParsePrefix("169.254.0.0/16"),
	netip.MustParsePrefix("224.0.0.0/4"),
	netip.MustParsePrefix("::1/128"),
	netip.MustParsePrefix("fe80::/10"),
	netip.MustParsePrefix("ff00::/8"),
}

// SortPrefixes sorts ps by address, then by length.
func SortPrefixes(ps []netip.Prefix) {
	slices.SortFunc(ps, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return cmp.Compare(a.Bits(), b.Bits())
	})
}
