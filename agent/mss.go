package agent

import "encoding/binary"

// ClampMSS lowers the MSS option of a TCP SYN (or SYN-ACK) in pkt, an IPv4
// or IPv6 packet, to mss if it is larger, fixing the TCP checksum
// incrementally (RFC 1624), and reports whether it changed the packet. It
// is for peers whose direct path carries less than the overlay MTU: TCP
// then never builds segments the path drops. Anything else (not TCP, not a
// SYN, fragments, malformed or truncated headers, an MSS already small
// enough) is left alone and reported false. It does not allocate.
func ClampMSS(pkt []byte, mss uint16) bool {
	tcp, ok := tcpSegment(pkt)
	if !ok || len(tcp) < 20 {
		return false
	}
	off := int(tcp[12]>>4) * 4
	const flagSYN = 0x02
	if off < 20 || off > len(tcp) || tcp[13]&flagSYN == 0 {
		return false
	}
	opts := tcp[20:off]
	for i := 0; i < len(opts); {
		switch kind := opts[i]; kind {
		case 0: // end of options
			return false
		case 1: // no-op
			i++
			continue
		}
		if i+1 >= len(opts) {
			return false
		}
		n := int(opts[i+1])
		if n < 2 || i+n > len(opts) {
			return false
		}
		if opts[i] == 2 && n == 4 {
			at := 20 + i + 2 // the MSS value, relative to the TCP header
			old := binary.BigEndian.Uint16(tcp[at:])
			if old <= mss {
				return false
			}
			binary.BigEndian.PutUint16(tcp[at:], mss)
			// The checksum sums 16-bit words from the start of the
			// header; a value at an odd offset straddles two words and
			// counts byte-swapped.
			o, m := old, mss
			if at%2 == 1 {
				o, m = o>>8|o<<8, m>>8|m<<8
			}
			binary.BigEndian.PutUint16(tcp[16:], checksumUpdate(binary.BigEndian.Uint16(tcp[16:]), o, m))
			return true
		}
		i += n
	}
	return false
}

// checksumUpdate returns the Internet checksum hc after one 16-bit word of
// the summed data changed from old to new: HC' = ~(~HC + ~m + m').
func checksumUpdate(hc, old, new uint16) uint16 {
	sum := uint32(^hc) + uint32(^old) + uint32(new)
	sum = sum&0xffff + sum>>16
	sum = sum&0xffff + sum>>16
	return ^uint16(sum)
}

// tcpSegment returns the TCP segment of an unfragmented IPv4 or IPv6
// packet (through IPv6 hop-by-hop, routing and destination options
// headers), bounded by the IP length fields.
func tcpSegment(pkt []byte) ([]byte, bool) {
	if len(pkt) < 1 {
		return nil, false
	}
	const protoTCP = 6
	switch pkt[0] >> 4 {
	case 4:
		if len(pkt) < 20 {
			return nil, false
		}
		ihl := int(pkt[0]&0x0f) * 4
		total := int(binary.BigEndian.Uint16(pkt[2:]))
		// More-fragments flag or a fragment offset: not a whole segment.
		if ihl < 20 || total < ihl || total > len(pkt) || binary.BigEndian.Uint16(pkt[6:])&0x3fff != 0 || pkt[9] != protoTCP {
			return nil, false
		}
		return pkt[ihl:total], true
	case 6:
		if len(pkt) < 40 {
			return nil, false
		}
		end := 40 + int(binary.BigEndian.Uint16(pkt[4:]))
		if end > len(pkt) {
			return nil, false
		}
		next, at := pkt[6], 40
		for {
			switch next {
			case protoTCP:
				return pkt[at:end], true
			case 0, 43, 60: // hop-by-hop, routing, destination options
				if at+8 > end {
					return nil, false
				}
				next, at = pkt[at], at+(int(pkt[at+1])+1)*8
				if at > end {
					return nil, false
				}
			default: // fragment header, no next header, other protocols
				return nil, false
			}
		}
	}
	return nil, false
}
