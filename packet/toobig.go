package packet

import "encoding/binary"

// TooBigLen is the buffer length TooBig needs: the largest error either
// family builds.
const TooBigLen = minMTU6

const (
	minMTU4 = 68   // RFC 791
	minMTU6 = 1280 // RFC 8200
	// How much of the offending packet an error quotes: RFC 1812 (IPv4:
	// the whole error within 576 bytes) and RFC 4443 (IPv6: within the
	// minimum MTU).
	maxError4 = 576
	maxError6 = minMTU6
	icmpHdr   = 8 // type, code, checksum, 4 bytes of unused/MTU
	hopLimit  = 64
)

// ICMP error types and codes TooBig sends.
const (
	icmp4Unreachable    = 3
	icmp4FragNeeded     = 4
	icmp6PacketTooBig   = 2
	icmp6FirstInfoType  = 128 // ICMPv6 types below are errors (RFC 4443 2.1)
	icmp4EchoReply      = 0
	icmp4Echo           = 8
	icmp4Timestamp      = 13
	icmp4TimestampReply = 14
	icmp4InfoRequest    = 15
	icmp4InfoReply      = 16
)

// TooBig builds into dst the ICMP error a router sends when the packet
// decoded into p from b, leaving this host, is larger than the next hop's
// mtu: ICMPv4 "fragmentation needed" or ICMPv6 "packet too big", from p's
// destination to its source, quoting the start of the packet. Written to
// the TUN, it makes the sender's kernel lower its path MTU for that
// destination, so TCP re-segments and UDP is fragmented by the sender.
//
// It returns the error's length, or 0 when no error may be sent (RFC 1812,
// RFC 4443): b is not larger than mtu, p is itself an ICMP error or a
// non-first IPv4 fragment, or comes from an address no one can answer, or
// mtu is below the family's minimum. dst must hold TooBigLen bytes. It does
// not allocate.
func (p *Parsed) TooBig(dst, b []byte, mtu int) int {
	if !p.Valid() || len(b) <= mtu || p.end > len(b) || len(dst) < TooBigLen {
		return 0
	}
	if p.Version == 4 {
		return p.tooBig4(dst, b, mtu)
	}
	return p.tooBig6(dst, b, mtu)
}

func (p *Parsed) tooBig4(dst, b []byte, mtu int) int {
	if mtu < minMTU4 || mtu > 0xffff || p.Frag == FragLater {
		return 0
	}
	if s := p.Src.V4(); s>>24 == 0 || s>>24 == 127 || s>>24 >= 224 {
		return 0 // unspecified, loopback, multicast, class E, broadcast
	}
	if p.IsICMP() {
		switch p.ICMPType {
		case icmp4EchoReply, icmp4Echo, icmp4Timestamp, icmp4TimestampReply, icmp4InfoRequest, icmp4InfoReply:
		default:
			return 0 // never an error about an error
		}
	}
	const hdr = 20
	quote := b[:min(p.end, maxError4-hdr-icmpHdr)]
	total := hdr + icmpHdr + len(quote)
	out := dst[:total]
	clear(out[:hdr+icmpHdr])
	out[0] = 0x45
	binary.BigEndian.PutUint16(out[2:], uint16(total))
	out[8], out[9] = hopLimit, ProtoICMPv4
	binary.BigEndian.PutUint32(out[12:], p.Dst.V4())
	binary.BigEndian.PutUint32(out[16:], p.Src.V4())
	binary.BigEndian.PutUint16(out[10:], ^fold(sum(0, out[:hdr])))
	icmp := out[hdr:]
	icmp[0], icmp[1] = icmp4Unreachable, icmp4FragNeeded
	binary.BigEndian.PutUint16(icmp[6:], uint16(mtu))
	copy(icmp[icmpHdr:], quote)
	binary.BigEndian.PutUint16(icmp[2:], ^fold(sum(0, icmp)))
	return total
}

func (p *Parsed) tooBig6(dst, b []byte, mtu int) int {
	if mtu < minMTU6 {
		return 0
	}
	if p.Src == (Addr{}) || p.Src == (Addr{Lo: 1}) || p.Src.Hi>>56 == 0xff {
		return 0 // unspecified, loopback, multicast
	}
	if p.IsICMP() && p.ICMPType < icmp6FirstInfoType {
		return 0 // never an error about an error
	}
	const hdr = 40
	quote := b[:min(p.end, maxError6-hdr-icmpHdr)]
	icmpLen := icmpHdr + len(quote)
	total := hdr + icmpLen
	out := dst[:total]
	clear(out[:hdr+icmpHdr])
	out[0] = 0x60
	binary.BigEndian.PutUint16(out[4:], uint16(icmpLen))
	out[6], out[7] = ProtoICMPv6, hopLimit
	p.Dst.put16(out[8:24])
	p.Src.put16(out[24:40])
	icmp := out[hdr:]
	icmp[0] = icmp6PacketTooBig
	binary.BigEndian.PutUint32(icmp[4:], uint32(mtu))
	copy(icmp[icmpHdr:], quote)
	// The pseudo-header (RFC 8200 8.1): addresses, upper-layer length and
	// next header, the last two summed as words.
	acc := sum(0, out[8:40]) + uint64(icmpLen) + ProtoICMPv6
	binary.BigEndian.PutUint16(icmp[2:], ^fold(sum(acc, icmp)))
	return total
}
