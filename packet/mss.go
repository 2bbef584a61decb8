package packet

import "encoding/binary"

// tcpOptMSS is the TCP maximum segment size option (RFC 9293 3.2).
const (
	tcpOptEnd = 0
	tcpOptNop = 1
	tcpOptMSS = 2
)

// mssAt returns the offset in b of the value of the MSS option of p, a
// TCP SYN (or SYN-ACK) decoded from b, or 0 when there is none (or the
// options are malformed, or p is anything else).
func (p *Parsed) mssAt(b []byte) int {
	if !p.IsTCPSyn() || p.end > len(b) {
		return 0
	}
	l4 := int(p.l4)
	tcp := b[l4:p.end]
	off := int(tcp[12]>>4) * 4 // Decode checked 20 <= off <= len(tcp)
	if off < 20 || off > len(tcp) {
		return 0 // b is not what p was decoded from
	}
	opts := tcp[20:off]
	for i := 0; i < len(opts); {
		switch opts[i] {
		case tcpOptEnd:
			return 0
		case tcpOptNop:
			i++
			continue
		}
		if i+1 >= len(opts) {
			return 0
		}
		n := int(opts[i+1])
		if n < 2 || i+n > len(opts) {
			return 0
		}
		if opts[i] == tcpOptMSS && n == 4 {
			return l4 + 20 + i + 2
		}
		i += n
	}
	return 0
}

// MSS returns the maximum segment size a TCP SYN (or SYN-ACK) decoded
// into p from b announces, and whether it announces one.
func (p *Parsed) MSS(b []byte) (uint16, bool) {
	at := p.mssAt(b)
	if at == 0 {
		return 0, false
	}
	return binary.BigEndian.Uint16(b[at:]), true
}

// ClampMSS lowers the MSS option of a TCP SYN (or SYN-ACK) decoded into p
// from b to mss if it is larger, fixing the TCP checksum incrementally
// (RFC 1624), and reports whether it changed the packet. It is for peers
// whose direct path carries less than the overlay MTU: TCP then never
// builds segments the path drops. Anything else (not TCP, not a SYN,
// fragments, malformed options, an MSS already small enough) is left alone
// and reported false. It does not allocate.
func (p *Parsed) ClampMSS(b []byte, mss uint16) bool {
	at := p.mssAt(b)
	if at == 0 {
		return false
	}
	old := binary.BigEndian.Uint16(b[at:])
	if old <= mss {
		return false
	}
	binary.BigEndian.PutUint16(b[at:], mss)
	// The checksum sums 16-bit words from the start of the header; a value
	// at an odd offset from it straddles two words and counts byte-swapped.
	l4 := int(p.l4)
	o, m := old, mss
	if (at-l4)%2 == 1 {
		o, m = o>>8|o<<8, m>>8|m<<8
	}
	csum := b[l4+16:]
	binary.BigEndian.PutUint16(csum, checksumUpdate(binary.BigEndian.Uint16(csum), o, m))
	return true
}
