//go:build linux

package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/netmap"
)

// Subnet routes this node accepted go into a routing table of meshd's own,
// looked up by one policy rule ahead of the main table, so the host's
// routes are never replaced or deleted and `ip route` stays the admin's.
// A rule ahead of it sends meshd's own marked underlay packets to the main
// table (bypassMark).
const (
	routeTable    = 5270
	routeRulePrio = 5270
	bypassPrio    = 5210
)

// natChain is meshd's chain in the nat table: routers masquerade traffic
// from the tailnet that leaves through any interface but the TUN.
const natChain = "MESHD-POSTROUTING"

// routerState is what setRouter last installed.
type routerState struct {
	forwarding bool
	snat       bool
}

// setTableRoutes makes meshd's table hold exactly want (through the TUN)
// and throws (back to the main table), and adds the rules that consult it.
func (kl *kernelLink) setTableRoutes(want, throws, src []netip.Prefix) error {
	var errs []error
	del := func(rt *netlink.Route) {
		if err := netlink.RouteDel(rt); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("delete route %v from table %d: %w", rt.Dst, routeTable, err))
		}
	}
	for _, r := range kl.tableRoutes {
		if !slices.Contains(want, r) {
			rt := kl.route(r, src)
			rt.Table = routeTable
			del(rt)
		}
	}
	for _, r := range kl.throws {
		if !slices.Contains(throws, r) {
			del(throwRoute(r))
		}
	}
	kl.tableRoutes, kl.throws = nil, nil
	for _, r := range want {
		rt := kl.route(r, src)
		rt.Table = routeTable
		if err := netlink.RouteReplace(rt); err != nil {
			errs = append(errs, fmt.Errorf("route %v via %s in table %d: %w", r, kl.name, routeTable, err))
			continue
		}
		kl.tableRoutes = append(kl.tableRoutes, r)
	}
	for _, r := range throws {
		if err := netlink.RouteReplace(throwRoute(r)); err != nil {
			errs = append(errs, fmt.Errorf("throw route %v in table %d: %w", r, routeTable, err))
			continue
		}
		kl.throws = append(kl.throws, r)
	}
	if len(want) > 0 && !kl.ruleOn {
		for _, r := range tableRules() {
			if err := netlink.RuleAdd(r); err != nil && !errors.Is(err, unix.EEXIST) {
				errs = append(errs, fmt.Errorf("ip rule priority %d: %w", r.Priority, err))
			}
		}
		kl.ruleOn = true
	}
	return errors.Join(errs...)
}

func throwRoute(p netip.Prefix) *netlink.Route {
	return &netlink.Route{Dst: prefixToIPNet(p), Table: routeTable, Type: unix.RTN_THROW}
}

// tableRules are, per family, the rule that keeps meshd's marked underlay
// packets in the main table and the one that consults meshd's table.
func tableRules() []*netlink.Rule {
	var out []*netlink.Rule
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		b := netlink.NewRule()
		b.Family, b.Table, b.Priority, b.Mark = fam, unix.RT_TABLE_MAIN, bypassPrio, bypassMark
		mask := uint32(bypassMask)
		b.Mask = &mask
		r := netlink.NewRule()
		r.Family, r.Table, r.Priority = fam, routeTable, routeRulePrio
		out = append(out, b, r)
	}
	return out
}

// cleanupRouting removes the rule and the NAT chain (the TUN's routes went
// with the device).
func (kl *kernelLink) cleanupRouting() error {
	var errs []error
	if kl.ruleOn {
		for _, r := range tableRules() {
			if err := netlink.RuleDel(r); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ESRCH) {
				errs = append(errs, fmt.Errorf("delete ip rule priority %d: %w", r.Priority, err))
			}
		}
		kl.ruleOn = false
	}
	if kl.natOn {
		errs = append(errs, setSNAT(kl.name, false))
		kl.natOn = false
	}
	return errors.Join(errs...)
}

// setRouter makes a kernel TUN node that advertises routes forward for
// them: IP forwarding on (in its network namespace), and unless
// --snat-subnet-routes=false, traffic from the tailnet masqueraded as the
// router's own address on the subnet, so the subnet's hosts need no route
// back to the tailnet. What is forwarded at all is the packet filter's
// decision: the map's rules name this node's routed prefixes as
// destinations, and anything else drops as not local.
func (e *engine) setRouter(nm *netmap.NetworkMap, p localapi.RoutePrefs) error {
	if e.link == nil {
		return nil
	}
	routing := len(p.AdvertiseRoutes) > 0 || p.AdvertiseExitNode
	want := routerState{forwarding: routing || e.router.forwarding, snat: routing && !p.NoSNAT}
	var errs []error
	if want.forwarding && !e.router.forwarding {
		// Left on when routes are withdrawn, as other routers do: turning
		// it off could break what the admin set up on purpose.
		if err := enableForwarding(); err != nil {
			errs = append(errs, err)
			want.forwarding = false
		} else {
			e.cfg.log.Info("IP forwarding enabled for advertised routes")
		}
	}
	if want.snat != e.router.snat {
		if err := setSNAT(e.link.name, want.snat); err != nil {
			errs = append(errs, err)
			want.snat = e.router.snat
		}
		e.link.natOn = want.snat
	}
	e.router = want
	return errors.Join(errs...)
}

// enableForwarding turns IPv4 and IPv6 forwarding on in the daemon's
// network namespace (/proc/sys/net is per namespace).
func enableForwarding() error {
	for _, f := range []string{"/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"} {
		if err := os.WriteFile(f, []byte("1\n"), 0o644); err != nil {
			return fmt.Errorf("enable IP forwarding (%s) to route advertised subnets: %w", f, err)
		}
	}
	return nil
}

// setSNAT installs (on) or removes (off) meshd's masquerading of tailnet
// sources leaving through interfaces other than the TUN, for IPv4 and
// IPv6, in a chain of its own jumped to from POSTROUTING.
func setSNAT(tunName string, on bool) error {
	var errs []error
	for _, fam := range []struct {
		cmd string
		src netip.Prefix
	}{{"iptables", netmap.TailnetIPv4Range}, {"ip6tables", netmap.TailnetIPv6Range}} {
		if _, err := exec.LookPath(fam.cmd); err != nil {
			if on {
				errs = append(errs, fmt.Errorf("SNAT for subnet routes needs %s (apt-get install iptables), or run with --snat-subnet-routes=false: %w", fam.cmd, err))
			}
			continue
		}
		ipt := func(args ...string) error {
			out, err := exec.Command(fam.cmd, append([]string{"-w", "-t", "nat"}, args...)...).CombinedOutput()
			if err != nil {
				return fmt.Errorf("%s -t nat %s: %w: %s", fam.cmd, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
			}
			return nil
		}
		if !on {
			if ipt("-C", "POSTROUTING", "-j", natChain) == nil {
				errs = append(errs, ipt("-D", "POSTROUTING", "-j", natChain))
			}
			if ipt("-L", natChain, "-n") == nil {
				errs = append(errs, ipt("-F", natChain), ipt("-X", natChain))
			}
			continue
		}
		if ipt("-L", natChain, "-n") != nil {
			if err := ipt("-N", natChain); err != nil {
				errs = append(errs, err)
				continue
			}
		}
		if err := ipt("-F", natChain); err != nil {
			errs = append(errs, err)
			continue
		}
		if err := ipt("-A", natChain, "-s", fam.src.String(), "!", "-o", tunName, "-j", "MASQUERADE"); err != nil {
			errs = append(errs, err)
			continue
		}
		if ipt("-C", "POSTROUTING", "-j", natChain) != nil {
			errs = append(errs, ipt("-A", "POSTROUTING", "-j", natChain))
		}
	}
	return errors.Join(errs...)
}

// underlayDial is the dialer of meshd's own connections to relays and the
// coordinator: in kernel TUN mode marked with bypassMark, so that an exit
// node's default route (in meshd's table) never carries them; nil (the
// default dialer) in netstack mode, where the host's routes are not ours.
func (a *Agent) underlayDial() func(ctx context.Context, network, addr string) (net.Conn, error) {
	if a.opts.TUN == TUNUserspace {
		return nil
	}
	d := &net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, bypassMark) }); err != nil {
			return err
		}
		if serr != nil {
			return fmt.Errorf("mark meshd's own connection (SO_MARK): %w", serr)
		}
		return nil
	}}
	return d.DialContext
}
