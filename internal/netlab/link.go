package netlab

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// Link connects a and b with a point-to-point veth pair (no bridge in
// between, so a throughput lab measures the hosts, not a software switch)
// with the given MTU. a gets prefix's first host address and b the second;
// both are returned. The interfaces are named like Attach's (ethN).
func (l *Lab) Link(a, b *Host, prefix netip.Prefix, mtu int) (netip.Addr, netip.Addr) {
	l.t.Helper()
	prefix = prefix.Masked()
	aAddr := prefix.Addr().Next()
	bAddr := aAddr.Next()
	if !prefix.Contains(bAddr) {
		l.t.Fatalf("netlab: link prefix %v has no room for two hosts", prefix)
	}
	aIf, bIf := a.nextIfname(), b.nextIfname()
	l.run("ip", "link", "add", aIf, "netns", a.ns, "mtu", strconv.Itoa(mtu), "type", "veth",
		"peer", "name", bIf, "netns", b.ns, "mtu", strconv.Itoa(mtu))
	for _, end := range []struct {
		h    *Host
		ifn  string
		addr netip.Addr
	}{{a, aIf, aAddr}, {b, bIf, bAddr}} {
		p := netip.PrefixFrom(end.addr, prefix.Bits())
		end.h.MustRun("ip", addrAddArgs(p, end.ifn)...)
		end.h.MustRun("ip", "link", "set", end.ifn, "up")
		end.h.mu.Lock()
		end.h.addrs = append(end.h.addrs, p)
		end.h.mu.Unlock()
	}
	return aAddr, bAddr
}

func (h *Host) nextIfname() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := fmt.Sprintf("eth%d", h.nIfs)
	h.nIfs++
	return n
}

// MTU returns the MTU of interface ifname inside h.
func (h *Host) MTU(ifname string) (int, error) {
	out, err := h.Run("cat", "/sys/class/net/"+ifname+"/mtu")
	if err != nil {
		return 0, err
	}
	mtu, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil {
		return 0, fmt.Errorf("MTU of %s in %s: %q: %w", ifname, h.Name, out, err)
	}
	return mtu, nil
}

// addrAddArgs are the ip arguments adding p to ifname. IPv6 addresses skip
// duplicate address detection: a lab address is unique by construction,
// and while DAD runs (a second or two) the address is tentative, unusable
// as a source, so a test's first packets would leave with another one.
func addrAddArgs(p netip.Prefix, ifname string) []string {
	args := []string{"addr", "add", p.String(), "dev", ifname}
	if p.Addr().Is6() {
		args = append(args, "nodad")
	}
	return args
}
