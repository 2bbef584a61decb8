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
