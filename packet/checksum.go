package packet

import "encoding/binary"

// checksumUpdate returns the Internet checksum hc after one 16-bit word of
// the summed data changed from old to new (RFC 1624: HC' = ~(~HC + ~m + m')).
func checksumUpdate(hc, old, new uint16) uint16 {
	return ^fold(uint64(^hc) + uint64(^old) + uint64(new))
}

// sum adds b, as big-endian 16-bit words (an odd last byte padded with
// zero), to the one's-complement accumulator acc. Carries are folded once,
// by fold, at the end: 32-bit chunks into 64 bits cannot overflow for any
// packet size.
func sum(acc uint64, b []byte) uint64 {
	for ; len(b) >= 4; b = b[4:] {
		acc += uint64(binary.BigEndian.Uint32(b))
	}
	if len(b) >= 2 {
		acc += uint64(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		acc += uint64(b[0]) << 8
	}
	return acc
}

// fold reduces a one's-complement accumulator to 16 bits.
func fold(acc uint64) uint16 {
	for acc > 0xffff {
		acc = acc&0xffff + acc>>16
	}
	return uint16(acc)
}
