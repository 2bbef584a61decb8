package packet

import "encoding/binary"

// SetTCPPort rewrites the TCP source port (src) or destination port of p
// (bytes b, as decoded) to port, updating the TCP checksum incrementally
// and p's port. It reports whether it did: p must be TCP carrying its
// header (not a later fragment) with the checksum inside b.
func (p *Parsed) SetTCPPort(b []byte, src bool, port uint16) bool {
	if p.Proto != ProtoTCP || !p.HasPorts || p.Frag == FragLater {
		return false
	}
	l4 := int(p.l4)
	if l4+18 > len(b) {
		return false
	}
	at := l4 + 2
	if src {
		at = l4
	}
	old := binary.BigEndian.Uint16(b[at:])
	binary.BigEndian.PutUint16(b[at:], port)
	csum := b[l4+16:]
	binary.BigEndian.PutUint16(csum, checksumUpdate(binary.BigEndian.Uint16(csum), old, port))
	if src {
		p.SrcPort = port
	} else {
		p.DstPort = port
	}
	return true
}
