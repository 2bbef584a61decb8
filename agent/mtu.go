package agent

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
)

const (
	// wireGuardOverhead is what WireGuard adds to an inner packet on the
	// worst-case underlay, IPv6: 40 (IPv6) + 8 (UDP) + 32 (WireGuard header
	// and Poly1305 tag). 1500 gives 1420 and 9000 gives 8920, as stock
	// WireGuard does.
	wireGuardOverhead = 80
	// fallbackMTU is used when no underlay interface is known: the IPv6
	// minimum, which every path carries.
	fallbackMTU = 1280
	// maxRouteLookups bounds the route lookups of one MTU choice. Peers'
	// endpoints are grouped by subnet first (routes rarely split a /24 or
	// a /64), so this is only reached by maps with endpoints in thousands
	// of subnets, which are then sampled in map order.
	maxRouteLookups = 1024
)

// underlayLink is what chooseMTU needs to know about an interface.
type underlayLink struct {
	name      string
	mtu       int
	up        bool
	loopback  bool
	hasGlobal bool // has a global unicast address: can carry tunnel traffic
	// tunnel: a layer-3 device without a hardware address (TUN, WireGuard,
	// IPIP/GRE). Its MTU is already reduced by its own encapsulation, so
	// it never decides the overlay MTU unless a route says it carries
	// our traffic.
	tunnel bool
}

// routeFunc reports the interface the kernel sends packets for dst
// through; ok is false when it has no route (or cannot be asked).
type routeFunc func(dst netip.Addr) (ifname string, ok bool)

// mtuChoice is the overlay MTU and why it was chosen, for status and logs.
type mtuChoice struct {
	mtu         int
	iface       string // the underlay interface that decided; "" for none
	underlayMTU int
	reason      string
}

// chooseMTU picks the overlay MTU: the largest MTU among the interfaces
// the kernel routes the coordinator's and the peers' addresses (dsts)
// through, less WireGuard's overhead.
//
// The largest, because on a GPU server the interface that carries peer
// traffic is the jumbo data fabric while the 1500-byte management NIC,
// docker0 or another tunnel carry none of it: taking the smallest of all
// interfaces (what meshd did before) cost the fabric its jumbo frames. A
// peer reached through a smaller interface still works: the kernel
// fragments the oversized WireGuard datagrams locally (its sockets do not
// force DF beyond the route's MTU), and a smaller link further along the
// path is found by the per-peer path MTU probe (magicbind/pmtu.go), which
// turns on too-big replies and MSS clamping for that peer alone.
//
// Interfaces that route none of dsts do not count. When no route is known
// (no dsts yet, or lookups fail), it falls back to the smallest up,
// non-loopback, non-tunnel interface with a global address: without a
// route there is no telling which one peers will use, and the smallest
// never needs fragmenting. With no such interface it returns fallbackMTU.
func chooseMTU(links []underlayLink, tunName string, route routeFunc, dsts []netip.Addr) mtuChoice {
	byName := make(map[string]underlayLink, len(links))
	largest := 0
	for _, l := range links {
		if !l.up || l.loopback || l.name == tunName || l.mtu <= 0 {
			continue
		}
		byName[l.name] = l
		largest = max(largest, l.mtu)
	}
	var best underlayLink
	var carriers []string
	if route != nil {
		looked := 0
		for _, dst := range routeGroups(dsts) {
			if looked == maxRouteLookups {
				break
			}
			looked++
			name, ok := route(dst)
			if !ok {
				continue
			}
			l, ok := byName[name]
			if !ok {
				continue
			}
			if !slices.Contains(carriers, name) {
				carriers = append(carriers, name)
			}
			if l.mtu > best.mtu {
				best = l
			}
			if best.mtu == largest {
				break // nothing can beat it
			}
		}
	}
	if best.name != "" {
		slices.Sort(carriers)
		return mtuChoice{
			mtu: max(best.mtu-wireGuardOverhead, fallbackMTU), iface: best.name, underlayMTU: best.mtu,
			reason: fmt.Sprintf("largest MTU among the interfaces that route to the coordinator and peers (%s)", strings.Join(carriers, ", ")),
		}
	}
	for _, l := range links {
		if c, ok := byName[l.name]; !ok || !c.hasGlobal || c.tunnel {
			continue
		}
		if best.name == "" || l.mtu < best.mtu {
			best = l
		}
	}
	if best.name == "" {
		return mtuChoice{mtu: fallbackMTU, reason: "no underlay interface with a global address: the IPv6 minimum"}
	}
	return mtuChoice{
		mtu: max(best.mtu-wireGuardOverhead, fallbackMTU), iface: best.name, underlayMTU: best.mtu,
		reason: "no route to the coordinator or a peer known yet: smallest MTU among the interfaces with a global address",
	}
}

// routeGroups returns one address per /24 (IPv4) or /64 (IPv6) of dsts,
// in first-seen order, skipping addresses no underlay route leads to.
func routeGroups(dsts []netip.Addr) []netip.Addr {
	seen := make(map[netip.Prefix]bool, len(dsts))
	var out []netip.Addr
	for _, d := range dsts {
		d = d.Unmap()
		if !d.IsValid() || d.IsUnspecified() || d.IsLoopback() || d.IsMulticast() {
			continue
		}
		bits := 24
		if d.Is6() {
			bits = 64
		}
		p := netip.PrefixFrom(d, bits).Masked()
		if seen[p] {
			continue
		}
		seen[p] = true
		out = append(out, d)
	}
	return out
}

// systemLinks lists this network namespace's interfaces for chooseMTU.
// Reading them needs no privileges, so it works for netstack mode too.
func systemLinks() []underlayLink {
	ifaces, err := net.Interfaces()
	if err != nil {
		return nil
	}
	links := make([]underlayLink, 0, len(ifaces))
	for _, ifc := range ifaces {
		l := underlayLink{
			name: ifc.Name, mtu: ifc.MTU, up: ifc.Flags&net.FlagUp != 0, loopback: ifc.Flags&net.FlagLoopback != 0,
			tunnel: len(ifc.HardwareAddr) == 0 && ifc.Flags&net.FlagLoopback == 0,
		}
		addrs, _ := ifc.Addrs()
		for _, a := range addrs {
			ipn, ok := a.(*net.IPNet)
			if !ok {
				continue
			}
			ip, ok := netip.AddrFromSlice(ipn.IP)
			if ok && ip.Unmap().IsGlobalUnicast() && !cgnatRange.Contains(ip.Unmap()) {
				l.hasGlobal = true
				break
			}
		}
		links = append(links, l)
	}
	return links
}
