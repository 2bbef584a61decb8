package packet

import (
	"encoding/binary"
	"net/netip"
)

// Addr is an IPv4 or IPv6 address in the form the data path compares and
// hashes: the 16 bytes of its IPv6 form as two big-endian words, IPv4
// addresses v4-mapped (::ffff:a.b.c.d) so that the families never collide.
// Building a netip.Addr costs little, but integer compares against
// precomputed masks cost less, and a packet filter does little else.
type Addr struct{ Hi, Lo uint64 }

// v4Mapped is the ::ffff:0:0/96 prefix in Addr.Lo.
const v4Mapped = 0xffff << 32

// AddrFrom4 is the Addr of an IPv4 address given as a 32-bit integer.
func AddrFrom4(v4 uint32) Addr { return Addr{Lo: v4Mapped | uint64(v4)} }

// addr4 reads an IPv4 address from the first 4 bytes of b.
func addr4(b []byte) Addr { return AddrFrom4(binary.BigEndian.Uint32(b)) }

// addr6 reads an IPv6 address from the first 16 bytes of b.
func addr6(b []byte) Addr {
	return Addr{Hi: binary.BigEndian.Uint64(b[:8]), Lo: binary.BigEndian.Uint64(b[8:16])}
}

// AddrFromNetip converts a; an IPv4-mapped IPv6 address becomes the IPv4
// address it maps (the two are one Addr).
func AddrFromNetip(a netip.Addr) Addr {
	b := a.As16()
	return addr6(b[:])
}

// Is4 reports whether a is an IPv4 address.
func (a Addr) Is4() bool { return a.Hi == 0 && a.Lo>>32 == 0xffff }

// V4 is the IPv4 address as an integer; meaningful only when a.Is4().
func (a Addr) V4() uint32 { return uint32(a.Lo) }

// Netip converts a to a netip.Addr, IPv4 addresses unmapped.
func (a Addr) Netip() netip.Addr {
	if a.Is4() {
		var b [4]byte
		binary.BigEndian.PutUint32(b[:], a.V4())
		return netip.AddrFrom4(b)
	}
	var b [16]byte
	binary.BigEndian.PutUint64(b[:8], a.Hi)
	binary.BigEndian.PutUint64(b[8:], a.Lo)
	return netip.AddrFrom16(b)
}

// put16 writes a's 16-byte IPv6 form (v4-mapped for IPv4) to b.
func (a Addr) put16(b []byte) {
	binary.BigEndian.PutUint64(b[:8], a.Hi)
	binary.BigEndian.PutUint64(b[8:16], a.Lo)
}
