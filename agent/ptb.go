package agent

import (
	"encoding/binary"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// ptbQuote bounds how much of the offending packet an ICMP error quotes:
// RFC 1812 (IPv4: the whole error within 576 bytes) and RFC 4443 (IPv6:
// within the 1280-byte minimum MTU).
const (
	ptbQuote4 = 576 - header.IPv4MinimumSize - header.ICMPv4MinimumSize
	ptbQuote6 = header.IPv6MinimumMTU - header.IPv6MinimumSize - header.ICMPv6PacketTooBigMinimumSize
	// ptbBufLen fits the largest error either family builds.
	ptbBufLen = header.IPv6MinimumMTU
)

// PacketTooBig builds into dst the ICMP error a router sends when pkt, an
// IPv4 or IPv6 packet leaving this host, is larger than the next hop's
// mtu: ICMPv4 "fragmentation needed" or ICMPv6 "packet too big", from
// pkt's destination to its source, quoting the start of pkt. Written to
// the TUN, it makes the sender's kernel lower its path MTU for that
// destination, so TCP re-segments and UDP is fragmented by the sender.
// It returns the error's length, or 0 when no error may be sent (RFC 1812,
// RFC 4443): pkt is malformed or not larger than mtu, is itself an ICMP
// error, is a non-first fragment, or comes from an address no one can
// answer. dst must hold ptbBufLen bytes. It does not allocate.
func PacketTooBig(dst, pkt []byte, mtu int) int {
	if len(pkt) <= mtu || len(dst) < ptbBufLen || len(pkt) < 1 {
		return 0
	}
	switch pkt[0] >> 4 {
	case 4:
		return packetTooBig4(dst, pkt, mtu)
	case 6:
		return packetTooBig6(dst, pkt, mtu)
	}
	return 0
}

func packetTooBig4(dst, pkt []byte, mtu int) int {
	if len(pkt) < header.IPv4MinimumSize || mtu < 68 || mtu > 0xffff {
		return 0
	}
	ip := header.IPv4(pkt)
	ihl := int(ip.HeaderLength())
	if ihl < header.IPv4MinimumSize || ihl > len(pkt) || ip.FragmentOffset() != 0 {
		return 0
	}
	src := ip.SourceAddress()
	if s := src.As4(); s[0] == 0 || s[0] >= 224 || s[0] == 127 || src == header.IPv4Broadcast {
		return 0 // unspecified, loopback, multicast, class E, broadcast
	}
	if ip.Protocol() == uint8(header.ICMPv4ProtocolNumber) {
		if len(pkt) < ihl+1 {
			return 0
		}
		switch header.ICMPv4Type(pkt[ihl]) {
		case header.ICMPv4EchoReply, header.ICMPv4Echo, header.ICMPv4Timestamp, header.ICMPv4TimestampReply, header.ICMPv4InfoRequest, header.ICMPv4InfoReply:
		default:
			return 0 // never an error about an error
		}
	}
	quote := pkt[:min(len(pkt), ptbQuote4)]
	total := header.IPv4MinimumSize + header.ICMPv4MinimumSize + len(quote)
	out := header.IPv4(dst[:total])
	out.Encode(&header.IPv4Fields{
		TotalLength: uint16(total),
		TTL:         64,
		Protocol:    uint8(header.ICMPv4ProtocolNumber),
		SrcAddr:     ip.DestinationAddress(),
		DstAddr:     src,
	})
	out.SetChecksum(^out.CalculateChecksum())
	icmp := header.ICMPv4(dst[header.IPv4MinimumSize:total])
	icmp.SetType(header.ICMPv4DstUnreachable)
	icmp.SetCode(header.ICMPv4FragmentationNeeded)
	binary.BigEndian.PutUint16(icmp[4:], 0) // unused
	icmp.SetMTU(uint16(mtu))
	copy(icmp[header.ICMPv4MinimumSize:], quote)
	icmp.SetChecksum(0)
	icmp.SetChecksum(^checksum.Checksum(icmp, 0))
	return total
}

func packetTooBig6(dst, pkt []byte, mtu int) int {
	if len(pkt) < header.IPv6MinimumSize || mtu < header.IPv6MinimumMTU {
		return 0
	}
	ip := header.IPv6(pkt)
	src := ip.SourceAddress()
	if src.Unspecified() || src == header.IPv6Loopback || header.IsV6MulticastAddress(src) {
		return 0
	}
	// An ICMPv6 error (types below 128) right after the fixed header gets
	// no error back; one behind extension headers is rare enough to answer.
	if ip.TransportProtocol() == header.ICMPv6ProtocolNumber && (len(pkt) < header.IPv6MinimumSize+1 || pkt[header.IPv6MinimumSize] < 128) {
		return 0
	}
	quote := pkt[:min(len(pkt), ptbQuote6)]
	icmpLen := header.ICMPv6PacketTooBigMinimumSize + len(quote)
	total := header.IPv6MinimumSize + icmpLen
	out := header.IPv6(dst[:total])
	from := ip.DestinationAddress()
	out.Encode(&header.IPv6Fields{
		PayloadLength:     uint16(icmpLen),
		TransportProtocol: header.ICMPv6ProtocolNumber,
		HopLimit:          64,
		SrcAddr:           from,
		DstAddr:           src,
	})
	icmp := header.ICMPv6(dst[header.IPv6MinimumSize:total])
	icmp.SetType(header.ICMPv6PacketTooBig)
	icmp.SetCode(0)
	icmp.SetMTU(uint32(mtu))
	copy(icmp[header.ICMPv6PacketTooBigMinimumSize:], quote)
	icmp.SetChecksum(0)
	icmp.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{
		Header:      icmp[:header.ICMPv6PacketTooBigMinimumSize],
		Src:         from,
		Dst:         src,
		PayloadCsum: checksum.Checksum(quote, 0),
		PayloadLen:  len(quote),
	}))
	return total
}
