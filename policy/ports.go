package policy

import (
	"fmt"
	"slices"
	"strconv"
	"strings"

	"meshd.dev/meshd/netmap"
)

// defaultProtos is what a rule without a protocol matches, as in Tailscale:
// TCP, UDP and ICMP for both address families.
var defaultProtos = []uint8{netmap.ProtoICMPv4, netmap.ProtoTCP, netmap.ProtoUDP, netmap.ProtoICMPv6}

// protoNames are the protocol names a policy may use; anything else must be
// an IANA number.
var protoNames = map[string]uint8{
	"icmp":      netmap.ProtoICMPv4,
	"igmp":      2,
	"tcp":       netmap.ProtoTCP,
	"egp":       8,
	"igp":       9,
	"udp":       netmap.ProtoUDP,
	"gre":       47,
	"esp":       50,
	"ah":        51,
	"ipv6-icmp": netmap.ProtoICMPv6,
	"icmpv6":    netmap.ProtoICMPv6,
	"sctp":      netmap.ProtoSCTP,
}

// parseProto parses a protocol name or number. The empty string is the
// default set (nil).
func parseProto(s string) ([]uint8, error) {
	if s == "" {
		return nil, nil
	}
	if n, ok := protoNames[strings.ToLower(s)]; ok {
		if n == netmap.ProtoICMPv4 {
			// "icmp" in a policy means ICMP for both families, as users
			// expect ping to work over IPv6 too.
			return []uint8{netmap.ProtoICMPv4, netmap.ProtoICMPv6}, nil
		}
		return []uint8{n}, nil
	}
	n, err := strconv.ParseUint(s, 10, 8)
	if err == nil && len(s) > 1 && s[0] == '0' {
		// Tailscale refuses "06": a leading zero reads as octal to some.
		return nil, fmt.Errorf("protocol %q: write the number without a leading 0", s)
	}
	if err != nil {
		return nil, fmt.Errorf("unknown protocol %q: use a name (tcp, udp, icmp, sctp, ...) or an IANA number 0-255", s)
	}
	return []uint8{uint8(n)}, nil
}

// hasPorts reports whether every protocol in protos carries ports. Nil means
// the default set, which includes ICMP, but Tailscale lets such rules name
// ports (they apply to TCP and UDP; ICMP matches regardless), so it counts.
func hasPorts(protos []uint8) bool {
	for _, p := range protos {
		switch p {
		case netmap.ProtoTCP, netmap.ProtoUDP, netmap.ProtoSCTP:
		default:
			return false
		}
	}
	return true
}

// parsePorts parses "*", "22", "80,443", "1000-2000" or a mix of them.
func parsePorts(s string) ([]netmap.PortRange, error) {
	if s == "*" {
		return []netmap.PortRange{netmap.AllPorts}, nil
	}
	if s == "" {
		return nil, fmt.Errorf("missing ports: use *, 22, 80,443 or 1000-2000")
	}
	var out []netmap.PortRange
	for part := range strings.SplitSeq(s, ",") {
		part = strings.TrimSpace(part)
		if part == "*" {
			return nil, fmt.Errorf("ports %q: * cannot be combined with other ports", s)
		}
		lo, hi, isRange := strings.Cut(part, "-")
		if lo == "" {
			return nil, portsErr(s, fmt.Errorf("%q is not a port number 0-65535", part))
		}
		first, err := parsePort(lo)
		if err != nil {
			return nil, portsErr(s, err)
		}
		last := first
		if isRange {
			if last, err = parsePort(hi); err != nil {
				return nil, portsErr(s, err)
			}
			if last < first {
				return nil, fmt.Errorf("ports %q: range %s is backwards: write it low-high", s, part)
			}
		}
		out = append(out, netmap.PortRange{First: first, Last: last})
	}
	return normalizePorts(out), nil
}

// portsErr names the whole port list in err when it has several parts.
func portsErr(list string, err error) error {
	if strings.ContainsAny(list, ",-") {
		return fmt.Errorf("ports %q: %w", list, err)
	}
	return err
}

func parsePort(s string) (uint16, error) {
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil {
		return 0, fmt.Errorf("%q is not a port number 0-65535", s)
	}
	return uint16(n), nil
}

// normalizePorts sorts and merges overlapping or adjacent ranges.
func normalizePorts(rs []netmap.PortRange) []netmap.PortRange {
	return netmap.MergePortRanges(slices.Clone(rs))
}

// portsContain reports whether port p is in rs.
func portsContain(rs []netmap.PortRange, p uint16) bool {
	return slices.ContainsFunc(rs, func(r netmap.PortRange) bool { return r.First <= p && p <= r.Last })
}

// subtractPorts returns the ports of a that are not in b (both normalized).
func subtractPorts(a, b []netmap.PortRange) []netmap.PortRange {
	out := slices.Clone(a)
	for _, cut := range b {
		var next []netmap.PortRange
		for _, r := range out {
			if cut.Last < r.First || cut.First > r.Last {
				next = append(next, r)
				continue
			}
			if cut.First > r.First {
				next = append(next, netmap.PortRange{First: r.First, Last: cut.First - 1})
			}
			if cut.Last < r.Last {
				next = append(next, netmap.PortRange{First: cut.Last + 1, Last: r.Last})
			}
		}
		out = next
	}
	return out
}

func formatPorts(rs []netmap.PortRange) string {
	if len(rs) == 1 && rs[0] == netmap.AllPorts {
		return "*"
	}
	parts := make([]string, len(rs))
	for i, r := range rs {
		if r.First == r.Last {
			parts[i] = strconv.Itoa(int(r.First))
		} else {
			parts[i] = fmt.Sprintf("%d-%d", r.First, r.Last)
		}
	}
	return strings.Join(parts, ",")
}

func protoName(p uint8) string {
	switch p {
	case netmap.ProtoTCP:
		return "tcp"
	case netmap.ProtoUDP:
		return "udp"
	case netmap.ProtoICMPv4:
		return "icmp"
	case netmap.ProtoICMPv6:
		return "icmpv6"
	case netmap.ProtoSCTP:
		return "sctp"
	}
	return strconv.Itoa(int(p))
}

// effectiveProtos expands nil to the default set.
func effectiveProtos(ps []uint8) []uint8 {
	if ps == nil {
		return defaultProtos
	}
	return ps
}
