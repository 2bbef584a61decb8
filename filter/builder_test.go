package filter

import (
	"net/netip"

	"meshd.dev/meshd/filter/filtertest"
	"meshd.dev/meshd/packet"
)

// pkt is a terse filtertest.Packet for table-driven tests: addresses are
// strings, the family of src picks IPv4 or IPv6.
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
	return filtertest.Packet{
		Src: netip.MustParseAddr(k.src), Dst: netip.MustParseAddr(k.dst),
		Proto: k.proto, SrcPort: k.sport, DstPort: k.dport, TCPFlags: k.flags,
		ICMPType: k.icmpType, ICMPCode: k.icmpCode, ICMPID: k.icmpID,
		FragOffset: k.fragOff, MoreFragments: k.more, FragmentHeader: k.frag,
		ID: k.id, Payload: k.payload, Quote: k.quote,
	}.Build()
}

// reply swaps the endpoints of k.
func (k pkt) reply() pkt {
	k.src, k.dst = k.dst, k.src
	k.sport, k.dport = k.dport, k.sport
	return k
}

// decoded decodes every packet of a batch into pp, as the TUN wrapper
// does: packet i is bufs[i][offset:], cut at sizes[i] unless sizes is nil;
// one that does not fit its buffer is left undecoded (not Valid).
func decoded(pp []packet.Parsed, bufs [][]byte, offset int, sizes []int) []packet.Parsed {
	pp = pp[:len(bufs)]
	for i, b := range bufs {
		end := len(b)
		if sizes != nil {
			end = offset + sizes[i]
		}
		if offset > end || end > len(b) {
			pp[i] = packet.Parsed{}
			continue
		}
		pp[i].Decode(b[offset:end])
	}
	return pp
}
