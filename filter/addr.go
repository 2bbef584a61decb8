package filter

import (
	"encoding/binary"
	"net/netip"
)

// ipAddr is an IP address as two integers, the form the per-packet path
// works in: IPv4 addresses are stored v4-mapped (::ffff:a.b.c.d), so the
// two families never collide. Building a netip.Addr costs little, but
// integer compares against precomputed masks cost less, and the hot path
// does nothing else.
type ipAddr struct{ hi, lo uint64 }

const v4Mapped = 0xffff << 32

func ip4(b []byte) ipAddr {
	return ipAddr{lo: v4Mapped | uint64(binary.BigEndian.Uint32(b))}
}

func ip6(b []byte) ipAddr {
	return ipAddr{hi: binary.BigEndian.Uint64(b[:8]), lo: binary.BigEndian.Uint64(b[8:16])}
}

func (a ipAddr) is4() bool { return a.hi == 0 && a.lo>>32 == 0xffff }

func (a ipAddr) v4() uint32 { return uint32(a.lo) }

// netip converts a to a netip.Addr (IPv4 unmapped).
func (a ipAddr) netip() netip.Addr {
	if a.is4() {
		var b [4]byte
		binary.BigEndian.PutUint32(b[:], a.v4())
		return netip.AddrFrom4(b)
	}
	var b [16]byte
	binary.BigEndian.PutUint64(b[:8], a.hi)
	binary.BigEndian.PutUint64(b[8:], a.lo)
	return netip.AddrFrom16(b)
}

func fromNetip(a netip.Addr) ipAddr {
	a = a.Unmap()
	if a.Is4() {
		b := a.As4()
		return ip4(b[:])
	}
	b := a.As16()
	return ip6(b[:])
}

// netList is a short list of prefixes matched by mask-and-compare, longest
// prefix first, so the first hit is the longest match.
type netList struct {
	v4 []net4
	v6 []net6
}

type net4 struct {
	net, mask uint32
	val       int32
}

type net6 struct {
	hi, lo, mhi, mlo uint64
	val              int32
}

func mask64(bits int) uint64 {
	switch {
	case bits <= 0:
		return 0
	case bits >= 64:
		return ^uint64(0)
	}
	return ^uint64(0) << (64 - bits)
}

// newNetList builds a list from prefixes with values; it sorts by length.
func newNetList(ps []netip.Prefix, vals []int32) netList {
	var l netList
	for i, p := range ps {
		p = p.Masked()
		a := fromNetip(p.Addr())
		if p.Addr().Is4() {
			m := uint32(mask64(p.Bits() + 32))
			l.v4 = append(l.v4, net4{net: a.v4() & m, mask: m, val: vals[i]})
		} else {
			mh, ml := mask64(p.Bits()), mask64(p.Bits()-64)
			l.v6 = append(l.v6, net6{hi: a.hi & mh, lo: a.lo & ml, mhi: mh, mlo: ml, val: vals[i]})
		}
	}
	// Longest first: more mask bits set.
	sortByMask4(l.v4)
	sortByMask6(l.v6)
	return l
}

func sortByMask4(s []net4) {
	for i := 1; i < len(s); i++ {
		for j := i; j > 0 && s[j].mask > s[j-1].mask; j-- {
			s[j], s[j-1] = s[j-1], s[j]
		}
	}
}

func sortByMask6(s []net6) {
	longer := func(a, b net6) bool { return a.mhi > b.mhi || (a.mhi == b.mhi && a.mlo > b.mlo) }
	for i := 1; i < len(s); i++ {
		for j := i; j > 0 && longer(s[j], s[j-1]); j-- {
			s[j], s[j-1] = s[j-1], s[j]
		}
	}
}

// lookup returns the value of the longest prefix containing a, or -1.
func (l *netList) lookup(a ipAddr) int32 {
	if a.is4() {
		x := a.v4()
		for i := range l.v4 {
			if x&l.v4[i].mask == l.v4[i].net {
				return l.v4[i].val
			}
		}
		return -1
	}
	for i := range l.v6 {
		n := &l.v6[i]
		if a.hi&n.mhi == n.hi && a.lo&n.mlo == n.lo {
			return n.val
		}
	}
	return -1
}

func (l *netList) len() int { return len(l.v4) + len(l.v6) }
