package netmap

import "net/netip"

// parsePrefixFast parses the forms netip.Prefix.MarshalText writes (a
// dotted quad, or hex groups with at most one "::", then "/bits") without
// converting b to a string, which the filter decoder does for hundreds of
// sources per update. ok is false for anything else, including inputs netip
// accepts that this does not judge (zones, embedded IPv4, an empty b): the
// caller then asks netip, so the result is always netip's
// (FuzzParsePrefixFast).
func parsePrefixFast(b []byte) (p netip.Prefix, ok bool) {
	slash := -1
	for i := len(b) - 1; i >= 0; i-- {
		if b[i] == '/' {
			slash = i
			break
		}
	}
	if slash <= 0 {
		return netip.Prefix{}, false
	}
	var a netip.Addr
	maxBits := 32
	if a, ok = parseIPv4Fast(b[:slash]); !ok {
		if a, ok = parseIPv6Fast(b[:slash]); !ok {
			return netip.Prefix{}, false
		}
		maxBits = 128
	}
	bits, ok := parseSmallDecimal(b[slash+1:])
	if !ok || bits > maxBits {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(a, bits), true
}

// parseSmallDecimal reads "0" or up to three digits without a leading zero.
func parseSmallDecimal(b []byte) (int, bool) {
	if len(b) == 0 || len(b) > 3 || len(b) > 1 && b[0] == '0' {
		return 0, false
	}
	n := 0
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int(c-'0')
	}
	return n, true
}

func parseIPv4Fast(b []byte) (netip.Addr, bool) {
	var ip [4]byte
	field := 0
	for len(b) > 0 {
		i := 0
		for i < len(b) && b[i] != '.' {
			i++
		}
		v, ok := parseSmallDecimal(b[:i])
		if !ok || v > 255 || field == 4 {
			return netip.Addr{}, false
		}
		ip[field] = byte(v)
		field++
		b = b[i:]
		if len(b) > 0 {
			b = b[1:] // the dot
			if len(b) == 0 {
				return netip.Addr{}, false
			}
		}
	}
	if field != 4 {
		return netip.Addr{}, false
	}
	return netip.AddrFrom4(ip), true
}

func parseIPv6Fast(b []byte) (netip.Addr, bool) {
	var ip [16]byte
	ellipsis := -1
	if len(b) >= 2 && b[0] == ':' && b[1] == ':' {
		ellipsis = 0
		b = b[2:]
	}
	i := 0
	for len(b) > 0 {
		if i == 16 {
			return netip.Addr{}, false
		}
		acc, off := uint32(0), 0
		for ; off < len(b) && off < 5; off++ {
			c := b[off]
			switch {
			case c >= '0' && c <= '9':
				acc = acc<<4 | uint32(c-'0')
			case c >= 'a' && c <= 'f':
				acc = acc<<4 | uint32(c-'a'+10)
			case c >= 'A' && c <= 'F':
				acc = acc<<4 | uint32(c-'A'+10)
			default:
				goto end
			}
		}
	end:
		if off == 0 || off > 4 {
			return netip.Addr{}, false
		}
		ip[i], ip[i+1] = byte(acc>>8), byte(acc)
		i += 2
		b = b[off:]
		if len(b) == 0 {
			break
		}
		if b[0] != ':' || len(b) == 1 {
			return netip.Addr{}, false
		}
		b = b[1:]
		if b[0] == ':' {
			if ellipsis >= 0 {
				return netip.Addr{}, false
			}
			ellipsis = i
			b = b[1:]
		}
	}
	switch {
	case ellipsis < 0 && i != 16:
		return netip.Addr{}, false
	case ellipsis >= 0:
		if i == 16 {
			return netip.Addr{}, false
		}
		n := 16 - i
		copy(ip[ellipsis+n:], ip[ellipsis:i])
		clear(ip[ellipsis : ellipsis+n])
	}
	return netip.AddrFrom16(ip), true
}
