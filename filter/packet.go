package filter

import "encoding/binary"

// IANA protocol numbers the parser understands beyond netmap's.
const (
	protoICMPv4 = 1
	protoTCP    = 6
	protoUDP    = 17
	protoICMPv6 = 58
	protoSCTP   = 132
)

// TCP flag bits (RFC 9293).
const (
	tcpFIN = 0x01
	tcpSYN = 0x02
	tcpRST = 0x04
	tcpACK = 0x10
)

// fragment position of a packet.
const (
	fragNone  = iota // not fragmented (or an IPv6 atomic fragment)
	fragFirst        // offset 0, more fragments follow: carries the ports
	fragLater        // offset > 0: no transport header
)

// maxExtHeaders bounds the IPv6 extension header walk so a packet made of
// nothing but extension headers costs a fixed amount.
const maxExtHeaders = 8

// packet is the part of an IP packet the filter judges. It lives on the
// stack of Inbound/Outbound: parsing never allocates.
type packet struct {
	src, dst ipAddr
	proto    uint8
	v6       bool
	frag     uint8
	ports    bool // proto carries ports and they were parsed
	fragID   uint32
	srcPort  uint16
	dstPort  uint16
	tcpFlags uint8
	icmpType uint8
	icmpCode uint8
	icmpID   uint16
	icmpMsg  []byte // the ICMP message, for errors quoting a packet
	l4       int    // offset of the transport header
	end      int    // end of the IP packet (total length), <= len(buf)
}

// parse fills p from b and reports whether b is a well-formed IPv4 or IPv6
// packet. Anything the filter cannot judge safely (short, lying lengths, bad
// IHL or options, a first fragment without its whole transport header,
// deprecated routing headers) is malformed. It never reads outside b.
func parse(b []byte, p *packet) bool {
	if len(b) < 1 {
		return false
	}
	switch b[0] >> 4 {
	case 4:
		return parse4(b, p)
	case 6:
		return parse6(b, p)
	}
	return false
}

func parse4(b []byte, p *packet) bool {
	if len(b) < 20 {
		return false
	}
	ihl := int(b[0]&0x0f) * 4
	total := int(binary.BigEndian.Uint16(b[2:4]))
	if ihl < 20 || total < ihl || total > len(b) {
		return false
	}
	b = b[:total]
	if ihl > 20 && !validOptions4(b[20:ihl]) {
		return false
	}
	ff := binary.BigEndian.Uint16(b[6:8])
	if ff&0x8000 != 0 { // reserved bit must be zero (RFC 791)
		return false
	}
	off := int(ff&0x1fff) * 8
	more := ff&0x2000 != 0
	if off+total-ihl > 65535 { // reassembles past the maximum datagram size
		return false
	}
	p.v6 = false
	p.proto = b[9]
	p.src = ip4(b[12:16])
	p.dst = ip4(b[16:20])
	p.fragID = uint32(binary.BigEndian.Uint16(b[4:6]))
	p.l4 = ihl
	p.end = total
	switch {
	case off > 0:
		p.frag = fragLater
		return true
	case more:
		p.frag = fragFirst
	default:
		p.frag = fragNone
	}
	return parseL4(b, p)
}

// validOptions4 checks that IPv4 options are well-formed TLVs inside the
// header: the filter skips them by IHL, and a broken option area means the
// header cannot be trusted.
func validOptions4(opts []byte) bool {
	for i := 0; i < len(opts); {
		switch opts[i] {
		case 0: // end of option list
			return true
		case 1: // no-op
			i++
		default:
			if i+1 >= len(opts) {
				return false
			}
			l := int(opts[i+1])
			if l < 2 || i+l > len(opts) {
				return false
			}
			i += l
		}
	}
	return true
}

func parse6(b []byte, p *packet) bool {
	if len(b) < 40 {
		return false
	}
	end := 40 + int(binary.BigEndian.Uint16(b[4:6]))
	if end > len(b) {
		return false
	}
	b = b[:end]
	p.v6 = true
	p.src = ip6(b[8:24])
	p.dst = ip6(b[24:40])
	p.end = end
	p.frag = fragNone
	nh := b[6]
	off := 40
	for i := 0; ; i++ {
		if i > maxExtHeaders {
			return false
		}
		switch nh {
		case 0, 43, 60: // hop-by-hop, routing, destination options
			if nh == 0 && i != 0 { // hop-by-hop must come first (RFC 8200 4.1)
				return false
			}
			if off+8 > end {
				return false
			}
			if nh == 43 && b[off+2] == 0 { // type 0 routing header (RFC 5095)
				return false
			}
			hlen := (int(b[off+1]) + 1) * 8
			if off+hlen > end {
				return false
			}
			nh = b[off]
			off += hlen
		case 44: // fragment
			if off+8 > end || p.frag != fragNone {
				return false
			}
			fo := binary.BigEndian.Uint16(b[off+2 : off+4])
			fragOff := int(fo>>3) * 8
			more := fo&1 != 0
			p.fragID = binary.BigEndian.Uint32(b[off+4 : off+8])
			nh = b[off]
			off += 8
			if fragOff+end-off > 65535 {
				return false
			}
			switch {
			case fragOff > 0:
				p.frag = fragLater
				p.proto = nh
				p.l4 = off
				return true
			case more:
				p.frag = fragFirst
			default:
				// Atomic fragment (RFC 6946): a whole packet; judge it as one.
			}
		default:
			p.proto = nh
			p.l4 = off
			return parseL4(b, p)
		}
	}
}

// parseL4 reads the transport header at p.l4. A packet (or first fragment)
// of a port-carrying protocol that does not hold the whole header is
// malformed: judging it by a partial header is the tiny-fragment attack.
func parseL4(b []byte, p *packet) bool {
	t := b[p.l4:]
	p.ports = false
	switch p.proto {
	case protoTCP:
		if len(t) < 20 {
			return false
		}
		doff := int(t[12]>>4) * 4
		if doff < 20 || doff > len(t) {
			return false
		}
		p.tcpFlags = t[13]
	case protoUDP:
		if len(t) < 8 {
			return false
		}
		// The UDP length covers the whole datagram, so it can only be
		// checked against an unfragmented packet. Zero is a UDP jumbogram.
		if ul := int(binary.BigEndian.Uint16(t[4:6])); p.frag == fragNone && ul != 0 && (ul < 8 || ul > len(t)) {
			return false
		}
	case protoSCTP:
		if len(t) < 12 {
			return false
		}
	case protoICMPv4, protoICMPv6:
		if (p.proto == protoICMPv4) == p.v6 {
			return true // ICMP of the other family: an opaque protocol number
		}
		if len(t) < 8 {
			return false
		}
		p.icmpType, p.icmpCode = t[0], t[1]
		p.icmpID = binary.BigEndian.Uint16(t[4:6])
		p.icmpMsg = t
		return true
	default:
		return true
	}
	p.srcPort = binary.BigEndian.Uint16(t[0:2])
	p.dstPort = binary.BigEndian.Uint16(t[2:4])
	p.ports = true
	return true
}

// icmpKind classifies an ICMP message for state matching.
const (
	icmpOther = iota
	icmpEchoRequest
	icmpEchoReply
	icmpError
)

func (p *packet) icmpKind() int {
	if !p.v6 {
		switch p.icmpType {
		case 8:
			return icmpEchoRequest
		case 0:
			return icmpEchoReply
		case 3, 11, 12: // unreachable, time exceeded, parameter problem
			return icmpError
		}
		return icmpOther
	}
	switch p.icmpType {
	case 128:
		return icmpEchoRequest
	case 129:
		return icmpEchoReply
	case 1, 2, 3, 4: // unreachable, packet too big, time exceeded, parameter problem
		return icmpError
	}
	return icmpOther
}

// isICMP reports whether p is ICMP of its own IP family.
func (p *packet) isICMP() bool {
	if p.v6 {
		return p.proto == protoICMPv6
	}
	return p.proto == protoICMPv4
}

// parseQuoted reads the packet quoted in an ICMP error (b is the ICMP
// message). The quote is truncated by design, so only the IP header and the
// first 8 bytes of the transport header are required. It fills src, dst,
// proto, ports and, for a quoted echo request, icmpType and icmpID.
func parseQuoted(b []byte, v6 bool, q *packet) bool {
	if len(b) < 8 {
		return false
	}
	b = b[8:]
	var t []byte
	if !v6 {
		if len(b) < 20 || b[0]>>4 != 4 {
			return false
		}
		ihl := int(b[0]&0x0f) * 4
		if ihl < 20 || len(b) < ihl+8 {
			return false
		}
		if binary.BigEndian.Uint16(b[6:8])&0x1fff != 0 {
			return false // a later fragment quotes no ports
		}
		q.proto = b[9]
		q.src = ip4(b[12:16])
		q.dst = ip4(b[16:20])
		t = b[ihl:]
	} else {
		// Only a quote without extension headers is matched; errors about
		// packets with extension headers find no flow and drop.
		if len(b) < 48 || b[0]>>4 != 6 {
			return false
		}
		q.proto = b[6]
		q.src = ip6(b[8:24])
		q.dst = ip6(b[24:40])
		t = b[40:]
	}
	q.v6 = v6
	switch q.proto {
	case protoTCP, protoUDP, protoSCTP:
		q.srcPort = binary.BigEndian.Uint16(t[0:2])
		q.dstPort = binary.BigEndian.Uint16(t[2:4])
		q.ports = true
	case protoICMPv4, protoICMPv6:
		q.icmpType = t[0]
		q.icmpID = binary.BigEndian.Uint16(t[4:6])
	}
	return true
}
