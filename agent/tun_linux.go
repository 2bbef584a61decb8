//go:build linux

package agent

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/tun"
)

// kernelLink configures a kernel TUN interface's addresses and routes with
// netlink, in the network namespace the daemon runs in.
type kernelLink struct {
	name   string
	link   netlink.Link
	routes []netip.Prefix // routes we installed
	// tableRoutes are the subnet routes in meshd's table; ruleOn says
	// the rule consulting it is installed, natOn the SNAT chain.
	tableRoutes []netip.Prefix
	throws      []netip.Prefix
	ruleOn      bool
	natOn       bool
}

// createKernelTUN creates TUN interface name with mtu, assigns addrs and
// brings it up.
func createKernelTUN(name string, mtu int, addrs []netip.Prefix) (tun.Device, *kernelLink, error) {
	dev, err := tun.CreateTUN(name, mtu)
	if err != nil {
		hint := "run as root or with CAP_NET_ADMIN, check /dev/net/tun exists, or use --tun userspace"
		if errors.Is(err, os.ErrExist) || errors.Is(err, unix.EBUSY) {
			hint = "another process holds the interface; pick another --tun name"
		}
		return nil, nil, fmt.Errorf("create TUN %q: %w (%s)", name, err, hint)
	}
	realName, err := dev.Name()
	if err != nil {
		dev.Close()
		return nil, nil, fmt.Errorf("TUN name: %w", err)
	}
	link, err := netlink.LinkByName(realName)
	if err != nil {
		dev.Close()
		return nil, nil, fmt.Errorf("TUN %s: %w", realName, err)
	}
	kl := &kernelLink{name: realName, link: link}
	for _, p := range addrs {
		a := &netlink.Addr{IPNet: prefixToIPNet(p)}
		if p.Addr().Is6() {
			// No DAD: the address is ours by the coordinator's say, and
			// waiting for DAD would delay the first packets by seconds.
			a.Flags = unix.IFA_F_NODAD
		}
		if err := netlink.AddrReplace(link, a); err != nil {
			dev.Close()
			return nil, nil, fmt.Errorf("TUN %s: add address %v: %w", realName, p, err)
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		dev.Close()
		return nil, nil, fmt.Errorf("TUN %s: set up: %w", realName, err)
	}
	return dev, kl, nil
}

// setRoutes makes the routes through the interface exactly want.
func (kl *kernelLink) setRoutes(want []netip.Prefix, src []netip.Prefix) error {
	var errs []error
	for _, r := range kl.routes {
		if !slices.Contains(want, r) {
			if err := netlink.RouteDel(kl.route(r, src)); err != nil && !errors.Is(err, unix.ESRCH) {
				errs = append(errs, fmt.Errorf("delete route %v: %w", r, err))
			}
		}
	}
	for _, r := range want {
		if err := netlink.RouteReplace(kl.route(r, src)); err != nil {
			errs = append(errs, fmt.Errorf("route %v via %s: %w", r, kl.name, err))
		}
	}
	kl.routes = slices.Clone(want)
	return errors.Join(errs...)
}

// index is the interface's index (systemd-resolved's link).
func (kl *kernelLink) index() int { return kl.link.Attrs().Index }

func (kl *kernelLink) route(dst netip.Prefix, src []netip.Prefix) *netlink.Route {
	r := &netlink.Route{LinkIndex: kl.link.Attrs().Index, Dst: prefixToIPNet(dst), Scope: netlink.SCOPE_LINK}
	// Prefer our tailnet address as the source so that replies come back
	// through the tunnel and the peer's cryptokey routing accepts them.
	for _, s := range src {
		if s.Addr().Is4() == dst.Addr().Is4() {
			r.Src = s.Addr().AsSlice()
			break
		}
	}
	return r
}

func prefixToIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// setMTU changes the TUN's MTU; wireguard-go's TUN reader sees the netlink
// event and follows.
func (kl *kernelLink) setMTU(mtu int) error {
	if err := netlink.LinkSetMTU(kl.link, mtu); err != nil {
		return fmt.Errorf("TUN %s: set MTU %d: %w", kl.name, mtu, err)
	}
	return nil
}

// routeLookup asks the kernel which interface it sends packets for dst
// through (policy rules included), as chooseMTU needs. It asks as meshd's
// own sockets send, with bypassMark: with an exit node in use, everything
// else is routed into the tunnel.
func routeLookup(dst netip.Addr) (string, bool) {
	routes, err := netlink.RouteGetWithOptions(net.IP(dst.AsSlice()), &netlink.RouteGetOptions{Mark: bypassMark})
	if err != nil || len(routes) == 0 || routes[0].LinkIndex == 0 {
		return "", false
	}
	ifc, err := net.InterfaceByIndex(routes[0].LinkIndex)
	if err != nil {
		return "", false
	}
	return ifc.Name, true
}
