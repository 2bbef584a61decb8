//go:build linux

package agent

import (
	"fmt"
	"math"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// addAddr adds a host address (/32 or /128) to the interface, as MagicDNS
// needs its resolver addresses local. No DAD for IPv6: a socket cannot bind
// a tentative address, and this one is ours by definition. An IPv6 one is
// also deprecated (preferred lifetime 0, valid forever): the resolver binds
// it explicitly, but the kernel must not pick it as the source of other
// traffic (a subnet router's IPv6 MASQUERADE chose it, in the lab, while
// the subnet interface's own address was still tentative).
func (kl *kernelLink) addAddr(a netip.Addr) error {
	na := &netlink.Addr{IPNet: prefixToIPNet(netip.PrefixFrom(a, a.BitLen()))}
	if a.Is6() {
		na.Flags = unix.IFA_F_NODAD
		na.ValidLft, na.PreferedLft = math.MaxUint32, 0
	}
	if err := netlink.AddrReplace(kl.link, na); err != nil {
		return fmt.Errorf("add address %v to %s: %w", a, kl.name, err)
	}
	return nil
}
