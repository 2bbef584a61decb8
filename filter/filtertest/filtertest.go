// Package filtertest builds IP packets and realistic compiled policies for
// the tests and benchmarks of package filter and for the side-by-side
// comparison with Tailscale's filter in bench/filtercmp, so that both run
// on exactly the same input.
package filtertest

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net/netip"

	"meshd.dev/meshd/netmap"
)

// Packet describes a packet; Build renders it as IPv4 or IPv6 depending on
// the family of Src. Checksums are left zero: the filter does not read
// them (WireGuard already authenticated the packet).
type Packet struct {
	Src, Dst         netip.Addr
	Proto            uint8
	SrcPort, DstPort uint16
	TCPFlags         uint8
	ICMPType         uint8
	ICMPCode         uint8
	ICMPID           uint16
	// FragOffset is the fragment offset in bytes (a multiple of 8);
	// MoreFragments sets the MF flag. IPv6 packets get a fragment header
	// when either is set, or when FragmentHeader is.
	FragOffset     int
	MoreFragments  bool
	FragmentHeader bool
	ID             uint32
	Payload        int    // bytes of zero payload after the headers
	Quote          []byte // ICMP errors: the quoted packet
}

// TCP flags.
const (
	FIN = 0x01
	SYN = 0x02
	RST = 0x04
	ACK = 0x10
)

// Build renders p.
func (p Packet) Build() []byte {
	var l4 []byte
	if p.FragOffset == 0 {
		switch p.Proto {
		case netmap.ProtoTCP:
			l4 = make([]byte, 20)
			binary.BigEndian.PutUint16(l4[0:], p.SrcPort)
			binary.BigEndian.PutUint16(l4[2:], p.DstPort)
			l4[12] = 5 << 4
			l4[13] = p.TCPFlags
		case netmap.ProtoUDP:
			l4 = make([]byte, 8)
			binary.BigEndian.PutUint16(l4[0:], p.SrcPort)
			binary.BigEndian.PutUint16(l4[2:], p.DstPort)
			binary.BigEndian.PutUint16(l4[4:], uint16(8+p.Payload))
		case netmap.ProtoSCTP:
			l4 = make([]byte, 12)
			binary.BigEndian.PutUint16(l4[0:], p.SrcPort)
			binary.BigEndian.PutUint16(l4[2:], p.DstPort)
		case netmap.ProtoICMPv4, netmap.ProtoICMPv6:
			l4 = make([]byte, 8)
			l4[0], l4[1] = p.ICMPType, p.ICMPCode
			binary.BigEndian.PutUint16(l4[4:], p.ICMPID)
			l4 = append(l4, p.Quote...)
		}
	}
	l4 = append(l4, make([]byte, p.Payload)...)
	if p.Src.Is4() {
		h := make([]byte, 20)
		h[0] = 0x45
		binary.BigEndian.PutUint16(h[2:], uint16(20+len(l4)))
		binary.BigEndian.PutUint16(h[4:], uint16(p.ID))
		ff := uint16(p.FragOffset / 8)
		if p.MoreFragments {
			ff |= 0x2000
		}
		binary.BigEndian.PutUint16(h[6:], ff)
		h[8] = 64
		h[9] = p.Proto
		copy(h[12:], p.Src.AsSlice())
		copy(h[16:], p.Dst.AsSlice())
		return append(h, l4...)
	}
	h := make([]byte, 40)
	h[0] = 0x60
	h[6] = p.Proto
	h[7] = 64
	copy(h[8:], p.Src.AsSlice())
	copy(h[24:], p.Dst.AsSlice())
	if p.FragmentHeader || p.FragOffset > 0 || p.MoreFragments {
		fh := make([]byte, 8)
		fh[0] = p.Proto
		fo := uint16(p.FragOffset/8) << 3
		if p.MoreFragments {
			fo |= 1
		}
		binary.BigEndian.PutUint16(fh[2:], fo)
		binary.BigEndian.PutUint32(fh[4:], p.ID)
		h[6] = 44
		h = append(h, fh...)
	}
	binary.BigEndian.PutUint16(h[4:], uint16(len(h)-40+len(l4)))
	return append(h, l4...)
}

// Reply swaps the endpoints of p.
func (p Packet) Reply() Packet {
	p.Src, p.Dst = p.Dst, p.Src
	p.SrcPort, p.DstPort = p.DstPort, p.SrcPort
	return p
}

// Policy is a generated rule set for one node, shaped like what a tailnet
// policy with tags and groups compiles to: every rule's sources are the
// members of one tag or group (/32 and /128 host addresses, sometimes a
// CIDR), its destinations are the node's own addresses with a port, a port
// range or every port.
type Policy struct {
	Rules        []netmap.FilterRule
	Self4, Self6 netip.Addr
	Local        []netip.Prefix
	// Member4/Member6 are sources of the rule in the middle of Rules,
	// allowed on Port with TCP; Stranger4/Stranger6 appear in no rule.
	Member4, Member6     netip.Addr
	Port                 uint16
	Stranger4, Stranger6 netip.Addr
	Sources              int // distinct source prefixes in the tag pool rules draw from
}

// ports are the destination port forms rules draw from: single well-known
// ports, service ranges, NCCL/torch.distributed style ranges, all ports.
var ports = []netmap.PortRange{
	{First: 22, Last: 22}, {First: 80, Last: 80}, {First: 443, Last: 443},
	{First: 5432, Last: 5432}, {First: 6379, Last: 6379}, {First: 8080, Last: 8080},
	{First: 8000, Last: 8999}, {First: 9090, Last: 9100}, {First: 29500, Last: 29600},
	{First: 50051, Last: 50051}, {First: 0, Last: 65535},
}

// NewPolicy generates n rules deterministically. Sources come from 64 tags
// and groups of 20 to 200 members each (several thousand addresses in
// all); a rule's sources are one or two of them.
func NewPolicy(n int) *Policy {
	rng := rand.New(rand.NewPCG(uint64(n), 42))
	p := &Policy{
		Self4:     netip.MustParseAddr("100.64.0.1"),
		Self6:     netip.MustParseAddr("fd7a:115c:a1e0::1"),
		Stranger4: netip.MustParseAddr("100.127.255.254"),
		Stranger6: netip.MustParseAddr("fd7a:115c:a1e0::ffff:fffe"),
	}
	p.Local = []netip.Prefix{netip.PrefixFrom(p.Self4, 32), netip.PrefixFrom(p.Self6, 128)}

	const ntags = 64
	tags := make([][]netip.Prefix, ntags)
	host := 2
	seen := map[netip.Prefix]bool{}
	for i := range tags {
		for range 20 + rng.IntN(181) {
			a4 := netip.AddrFrom4([4]byte{100, 64 + byte(host>>16), byte(host >> 8), byte(host)})
			var a16 [16]byte
			copy(a16[:], p.Self6.AsSlice()[:12])
			binary.BigEndian.PutUint32(a16[12:], uint32(host))
			tags[i] = append(tags[i], netip.PrefixFrom(a4, 32), netip.PrefixFrom(netip.AddrFrom16(a16), 128))
			host++
		}
		if i%8 == 0 { // some groups include a whole subnet
			tags[i] = append(tags[i], netip.MustParsePrefix(fmt.Sprintf("10.%d.0.0/16", i)))
		}
		for _, s := range tags[i] {
			seen[s] = true
		}
	}
	p.Sources = len(seen)
	mid := n / 2
	for i := range n {
		var r netmap.FilterRule
		t := rng.IntN(ntags)
		r.SrcIPs = append(r.SrcIPs, tags[t]...)
		if rng.IntN(4) == 0 {
			r.SrcIPs = append(r.SrcIPs, tags[rng.IntN(ntags)]...)
		}
		pr := ports[rng.IntN(len(ports))]
		if i == mid {
			pr = netmap.PortRange{First: 5432, Last: 5432}
			p.Member4, p.Member6, p.Port = tags[t][0].Addr(), tags[t][1].Addr(), 5432
		}
		r.DstPorts = []netmap.NetPortRange{
			{Net: p.Local[0], Ports: pr},
			{Net: p.Local[1], Ports: pr},
		}
		if rng.IntN(3) == 0 {
			r.IPProto = []uint8{netmap.ProtoTCP}
		}
		if i == mid {
			r.IPProto = nil
		}
		r.Origin = fmt.Sprintf("policy.hujson:%d", 10+i)
		p.Rules = append(p.Rules, r)
	}
	return p
}
