package filter

import (
	"encoding/binary"
	"net/netip"
)

// pkt describes a test packet; build renders it as IPv4 or IPv6 depending
// on the family of src.
type pkt struct {
	src, dst     string
	proto        uint8
	sport, dport uint16
	flags        uint8 // TCP flags
	icmpType     uint8
	icmpCode     uint8
	icmpID       uint16
	fragOff      int  // bytes, multiple of 8
	more         bool // more fragments
	frag         bool // IPv6: add a fragment header even if atomic
	id           uint32
	payload      int
	quote        []byte // ICMP error: the quoted packet
}

func (k pkt) build() []byte {
	src, dst := netip.MustParseAddr(k.src), netip.MustParseAddr(k.dst)
	var l4 []byte
	if k.fragOff == 0 {
		switch k.proto {
		case protoTCP:
			l4 = make([]byte, 20)
			binary.BigEndian.PutUint16(l4[0:], k.sport)
			binary.BigEndian.PutUint16(l4[2:], k.dport)
			l4[12] = 5 << 4
			l4[13] = k.flags
		case protoUDP:
			l4 = make([]byte, 8)
			binary.BigEndian.PutUint16(l4[0:], k.sport)
			binary.BigEndian.PutUint16(l4[2:], k.dport)
		case protoSCTP:
			l4 = make([]byte, 12)
			binary.BigEndian.PutUint16(l4[0:], k.sport)
			binary.BigEndian.PutUint16(l4[2:], k.dport)
		case protoICMPv4, protoICMPv6:
			l4 = make([]byte, 8)
			l4[0], l4[1] = k.icmpType, k.icmpCode
			binary.BigEndian.PutUint16(l4[4:], k.icmpID)
			l4 = append(l4, k.quote...)
		}
	}
	l4 = append(l4, make([]byte, k.payload)...)
	if src.Is4() {
		h := make([]byte, 20)
		h[0] = 0x45
		binary.BigEndian.PutUint16(h[2:], uint16(20+len(l4)))
		binary.BigEndian.PutUint16(h[4:], uint16(k.id))
		ff := uint16(k.fragOff / 8)
		if k.more {
			ff |= 0x2000
		}
		binary.BigEndian.PutUint16(h[6:], ff)
		h[8] = 64
		h[9] = k.proto
		copy(h[12:], src.AsSlice())
		copy(h[16:], dst.AsSlice())
		return append(h, l4...)
	}
	h := make([]byte, 40)
	h[0] = 0x60
	h[6] = k.proto
	h[7] = 64
	copy(h[8:], src.AsSlice())
	copy(h[24:], dst.AsSlice())
	if k.frag || k.fragOff > 0 || k.more {
		fh := make([]byte, 8)
		fh[0] = k.proto
		fo := uint16(k.fragOff/8) << 3
		if k.more {
			fo |= 1
		}
		binary.BigEndian.PutUint16(fh[2:], fo)
		binary.BigEndian.PutUint32(fh[4:], k.id)
		h[6] = 44
		h = append(h, fh...)
	}
	binary.BigEndian.PutUint16(h[4:], uint16(len(h)-40+len(l4)))
	return append(h, l4...)
}

// reply swaps the endpoints of k.
func (k pkt) reply() pkt {
	k.src, k.dst = k.dst, k.src
	k.sport, k.dport = k.dport, k.sport
	return k
}
