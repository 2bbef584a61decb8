//go:build linux

package agent

import (
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// addAddr adds a host address (/32 or /128) to the interface, as MagicDNS
// needs its resolver addresses local. No DAD for IPv6: a socket cannot bind
// a tentative address, and this one is ours by definition.
func (kl *kernelLink) addAddr(a netip.Addr) error {
	na := &netlink.Addr{IPNet: prefixToIPNet(netip.PrefixFrom(a, a.BitLen()))}
	if a.Is6() {
		na.Flags = unix.IFA_F_NODAD
	}
	if err := netlink.AddrReplace(kl.link, na); err != nil {
		return fmt.Errorf("add address %v to %s: %w", a, kl.name, err)
	}
	return nil
}
