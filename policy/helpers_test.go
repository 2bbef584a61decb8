package policy

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"meshd.dev/meshd/netmap"
)

// testNode makes a node with a stable IPv4 and IPv6 address derived from id.
func testNode(id int, user string, tags ...string) *netmap.Node {
	v4 := netip.AddrFrom4([4]byte{100, 64, byte(id >> 8), byte(id)})
	v6 := netip.MustParseAddr(fmt.Sprintf("fd7a:115c:a1e0::%x", id))
	addrs := []netip.Prefix{netip.PrefixFrom(v4, 32), netip.PrefixFrom(v6, 128)}
	slices.Sort(tags)
	return &netmap.Node{
		ID: netmap.NodeID(id), Hostname: fmt.Sprintf("n%d", id), User: user, Tags: tags,
		Addresses: addrs, AllowedIPs: slices.Clone(addrs),
	}
}

func mustParse(t testing.TB, src string) *Policy {
	t.Helper()
	p, err := Parse("test.hujson", []byte(src))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	return p
}

// ruleAllows evaluates compiled filter rules the way the data-plane filter
// does: a packet from src to dst:port over proto opens a flow if some rule
// lists src in SrcIPs and dst:port in DstPorts.
func ruleAllows(rules []netmap.FilterRule, src, dst netip.Addr, proto uint8, port uint16) (string, bool) {
	for _, r := range rules {
		if !slices.ContainsFunc(r.SrcIPs, func(p netip.Prefix) bool { return p.Contains(src) }) {
			continue
		}
		protos := r.IPProto
		if len(protos) == 0 {
			protos = defaultProtos
		}
		if !slices.Contains(protos, proto) {
			continue
		}
		for _, dp := range r.DstPorts {
			portOK := dp.Ports.First <= port && port <= dp.Ports.Last
			if proto == netmap.ProtoICMPv4 || proto == netmap.ProtoICMPv6 {
				portOK = true
			}
			if dp.Net.Contains(dst) && portOK {
				return r.Origin, true
			}
		}
	}
	return "", false
}

// reach reports whether src may open a flow to dst per the engine's
// compiled filter for dst, over both address families (which must agree).
func reach(t testing.TB, e *Engine, src, dst *netmap.Node, proto uint8, port uint16) bool {
	t.Helper()
	return reachFamilies(t, e, src, dst, proto, port, true)
}

// reach4 is reach for policies naming IPv4 addresses, where the families
// legitimately differ.
func reach4(t testing.TB, e *Engine, src, dst *netmap.Node, proto uint8, port uint16) bool {
	t.Helper()
	return reachFamilies(t, e, src, dst, proto, port, false)
}

func reachFamilies(t testing.TB, e *Engine, src, dst *netmap.Node, proto uint8, port uint16, both bool) bool {
	t.Helper()
	rules := e.FilterFor(dst, nil)
	_, ok4 := ruleAllows(rules, src.Addresses[0].Addr(), dst.Addresses[0].Addr(), proto, port)
	p6 := proto
	if proto == netmap.ProtoICMPv4 {
		p6 = netmap.ProtoICMPv6
	}
	_, ok6 := ruleAllows(rules, src.Addresses[1].Addr(), dst.Addresses[1].Addr(), p6, port)
	if both && ok4 != ok6 && !v4Only(dst) {
		t.Errorf("%s -> %s:%d: IPv4 says %v, IPv6 says %v", src.Hostname, dst.Hostname, port, ok4, ok6)
	}
	return ok4
}

// posOf returns the FILE:LINE:COL of the first occurrence of needle in src.
func posOf(src, needle string) string {
	i := strings.Index(src, needle)
	if i < 0 {
		return "needle not found: " + needle
	}
	line := 1 + strings.Count(src[:i], "\n")
	col := i - strings.LastIndex(src[:i], "\n")
	return fmt.Sprintf("test.hujson:%d:%d", line, col)
}

// v4Only marks nodes whose policy name is an IPv4 host alias, so IPv4 and
// IPv6 legitimately differ.
func v4Only(n *netmap.Node) bool { return strings.HasSuffix(n.Hostname, "-v4only") }
