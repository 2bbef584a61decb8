package filter

import (
	"net/netip"

	"meshd.dev/meshd/packet"
)

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
		a := packet.AddrFromNetip(p.Addr())
		if p.Addr().Is4() {
			m := uint32(mask64(p.Bits() + 32))
			l.v4 = append(l.v4, net4{net: a.V4() & m, mask: m, val: vals[i]})
		} else {
			mh, ml := mask64(p.Bits()), mask64(p.Bits()-64)
			l.v6 = append(l.v6, net6{hi: a.Hi & mh, lo: a.Lo & ml, mhi: mh, mlo: ml, val: vals[i]})
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
func (l *netList) lookup(a packet.Addr) int32 {
	if a.Is4() {
		x := a.V4()
		for i := range l.v4 {
			if x&l.v4[i].mask == l.v4[i].net {
				return l.v4[i].val
			}
		}
		return -1
	}
	for i := range l.v6 {
		n := &l.v6[i]
		if a.Hi&n.mhi == n.hi && a.Lo&n.mlo == n.lo {
			return n.val
		}
	}
	return -1
}

func (l *netList) len() int { return len(l.v4) + len(l.v6) }
