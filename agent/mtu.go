package agent

import (
	"net"
	"net/netip"
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
)

// underlayLink is what autoMTU needs to know about an interface.
type underlayLink struct {
	name      string
	mtu       int
	up        bool
	loopback  bool
	hasGlobal bool // has a global unicast address: can carry tunnel traffic
}

// autoMTU picks the overlay MTU from the underlay: the smallest MTU among
// the interfaces that can carry tunnel traffic (up, not loopback, with a
// global unicast address, not the tunnel itself), less WireGuard's overhead.
// The smallest, not the largest, because a packet that fits the smallest
// link is never fragmented or blackholed whichever interface a peer is
// reached through; a fleet whose jumbo fabric is its only interface gets
// 8920. With no such interface it returns fallbackMTU and an empty name.
func autoMTU(links []underlayLink, tunName string) (mtu int, from underlayLink) {
	for _, l := range links {
		if !l.up || l.loopback || !l.hasGlobal || l.name == tunName || l.mtu <= 0 {
			continue
		}
		if from.name == "" || l.mtu < from.mtu {
			from = l
		}
	}
	if from.name == "" {
		return fallbackMTU, from
	}
	return max(from.mtu-wireGuardOverhead, fallbackMTU), from
}

// systemLinks lists this network namespace's interfaces for autoMTU.
// Reading them needs no privileges, so it works for netstack mode too.
func systemLinks() []underlayLink {
	ifaces, err := net.Interfaces()
	if err != nil {
		return nil
	}
	links := make([]underlayLink, 0, len(ifaces))
	for _, ifc := range ifaces {
		l := underlayLink{name: ifc.Name, mtu: ifc.MTU, up: ifc.Flags&net.FlagUp != 0, loopback: ifc.Flags&net.FlagLoopback != 0}
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
