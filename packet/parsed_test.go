package packet

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"reflect"
	"slices"
	"testing"

	"meshd.dev/meshd/filter/filtertest"
)

var (
	host4, peer4 = netip.MustParseAddr("100.64.0.1"), netip.MustParseAddr("100.64.0.2")
	host6, peer6 = netip.MustParseAddr("fd7a:115c:a1e0::1"), netip.MustParseAddr("fd7a:115c:a1e0::2")
)

// withExt inserts an 8-byte IPv6 extension header of type nh (routing
// type 1, PadN) right after the fixed header of b.
func withExt(b []byte, nh byte) []byte {
	out := slices.Insert(bytes.Clone(b), 40, b[6], 0, 1, 4, 0, 0, 0, 0)
	out[6] = nh
	binary.BigEndian.PutUint16(out[4:], uint16(len(out)-40))
	return out
}

// TestDecode checks the fields Decode fills for each kind of packet the
// data path sees; TestMalformed in package filter holds the refusals.
func TestDecode(t *testing.T) {
	udpFlow := filtertest.Packet{Src: host4, Dst: peer4, Proto: ProtoUDP, SrcPort: 5000, DstPort: 53, Payload: 4}
	tests := []struct {
		name string
		b    []byte
		want Parsed
	}{
		{"tcp4 syn", filtertest.Packet{Src: host4, Dst: peer4, Proto: ProtoTCP, SrcPort: 40000, DstPort: 22, TCPFlags: TCPSyn, Payload: 3}.Build(),
			Parsed{Version: 4, Proto: ProtoTCP, Src: AddrFromNetip(host4), Dst: AddrFromNetip(peer4), SrcPort: 40000, DstPort: 22, TCPFlags: TCPSyn, HasPorts: true, l4: 20, end: 43}},
		{"tcp6 behind extension headers", withExt(withExt(filtertest.Packet{Src: host6, Dst: peer6, Proto: ProtoTCP, SrcPort: 1, DstPort: 2, TCPFlags: TCPAck}.Build(), extRouting), extDestOpts),
			Parsed{Version: 6, Proto: ProtoTCP, Src: AddrFromNetip(host6), Dst: AddrFromNetip(peer6), SrcPort: 1, DstPort: 2, TCPFlags: TCPAck, HasPorts: true, l4: 56, end: 76}},
		{"udp4 first fragment", filtertest.Packet{Src: host4, Dst: peer4, Proto: ProtoUDP, SrcPort: 1, DstPort: 2, MoreFragments: true, ID: 0x1234, Payload: 64}.Build(),
			Parsed{Version: 4, Proto: ProtoUDP, Src: AddrFromNetip(host4), Dst: AddrFromNetip(peer4), SrcPort: 1, DstPort: 2, HasPorts: true, Frag: FragFirst, FragID: 0x1234, l4: 20, end: 92}},
		{"udp6 later fragment", filtertest.Packet{Src: host6, Dst: peer6, Proto: ProtoUDP, FragOffset: 72, ID: 0x10203, Payload: 16}.Build(),
			Parsed{Version: 6, Proto: ProtoUDP, Src: AddrFromNetip(host6), Dst: AddrFromNetip(peer6), Frag: FragLater, FragID: 0x10203, l4: 48, end: 64}},
		{"udp6 atomic fragment", filtertest.Packet{Src: host6, Dst: peer6, Proto: ProtoUDP, SrcPort: 7, DstPort: 8, FragmentHeader: true, ID: 9}.Build(),
			Parsed{Version: 6, Proto: ProtoUDP, Src: AddrFromNetip(host6), Dst: AddrFromNetip(peer6), SrcPort: 7, DstPort: 8, HasPorts: true, FragID: 9, l4: 48, end: 56}},
		{"echo request v6", filtertest.Packet{Src: host6, Dst: peer6, Proto: ProtoICMPv6, ICMPType: 128, ICMPID: 77}.Build(),
			Parsed{Version: 6, Proto: ProtoICMPv6, Src: AddrFromNetip(host6), Dst: AddrFromNetip(peer6), ICMPType: 128, ICMPID: 77, l4: 40, end: 48}},
		{"unreachable v4", filtertest.Packet{Src: peer4, Dst: host4, Proto: ProtoICMPv4, ICMPType: 3, ICMPCode: 4, Quote: udpFlow.Build()[:28]}.Build(),
			Parsed{Version: 4, Proto: ProtoICMPv4, Src: AddrFromNetip(peer4), Dst: AddrFromNetip(host4), ICMPType: 3, ICMPCode: 4, l4: 20, end: 56}},
		{"echo request v4", filtertest.Packet{Src: host4, Dst: peer4, Proto: ProtoICMPv4, ICMPType: 8, ICMPID: 5}.Build(),
			Parsed{Version: 4, Proto: ProtoICMPv4, Src: AddrFromNetip(host4), Dst: AddrFromNetip(peer4), ICMPType: 8, ICMPID: 5, l4: 20, end: 28}},
		{"icmpv6 in ipv4 is opaque", filtertest.Packet{Src: host4, Dst: peer4, Proto: ProtoICMPv6, ICMPType: 128, ICMPID: 5}.Build(),
			Parsed{Version: 4, Proto: ProtoICMPv6, Src: AddrFromNetip(host4), Dst: AddrFromNetip(peer4), l4: 20, end: 28}},
		{"gre", filtertest.Packet{Src: host4, Dst: peer4, Proto: 47, Payload: 4}.Build(),
			Parsed{Version: 4, Proto: 47, Src: AddrFromNetip(host4), Dst: AddrFromNetip(peer4), l4: 20, end: 24}},
		{"trailing bytes", append(udpFlow.Build(), 0xff, 0xff),
			Parsed{Version: 4, Proto: ProtoUDP, Src: AddrFromNetip(host4), Dst: AddrFromNetip(peer4), SrcPort: 5000, DstPort: 53, HasPorts: true, l4: 20, end: 32}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var p Parsed
			// Decoding over a used Parsed must leave nothing of the last packet.
			p.Decode(filtertest.Packet{Src: peer6, Dst: host6, Proto: ProtoTCP, SrcPort: 9, DstPort: 9, TCPFlags: 0xff}.Build())
			if !p.Decode(tt.b) {
				t.Fatal("Decode refused the packet")
			}
			if p != tt.want {
				t.Errorf("Decode =\n%+v, want\n%+v", p, tt.want)
			}
		})
	}
	var p Parsed
	p.Decode(udpFlow.Build())
	if p.Decode(udpFlow.Build()[:27]) || p.Valid() || p.HasPorts {
		t.Errorf("a refused packet left %+v", p)
	}
}

func TestDecodeQuote(t *testing.T) {
	flow4 := filtertest.Packet{Src: host4, Dst: peer4, Proto: ProtoUDP, SrcPort: 5000, DstPort: 6000, Payload: 100}
	flow6 := filtertest.Packet{Src: host6, Dst: peer6, Proto: ProtoTCP, SrcPort: 5000, DstPort: 443, TCPFlags: TCPAck, Payload: 100}
	echo6 := filtertest.Packet{Src: host6, Dst: peer6, Proto: ProtoICMPv6, ICMPType: 128, ICMPID: 99, Payload: 100}
	first6 := filtertest.Packet{Src: host6, Dst: peer6, Proto: ProtoUDP, SrcPort: 5000, DstPort: 6000, MoreFragments: true, ID: 3, Payload: 100}
	later6 := first6
	later6.FragOffset = 1232
	error4 := func(quote []byte) []byte {
		return filtertest.Packet{Src: peer4, Dst: host4, Proto: ProtoICMPv4, ICMPType: 3, ICMPCode: 4, Quote: quote}.Build()
	}
	error6 := func(quote []byte) []byte {
		return filtertest.Packet{Src: peer6, Dst: host6, Proto: ProtoICMPv6, ICMPType: 2, Quote: quote}.Build()
	}
	quoted := func(src, dst netip.Addr, proto uint8, sport, dport uint16) Parsed {
		v := uint8(4)
		if src.Is6() {
			v = 6
		}
		return Parsed{Version: v, Proto: proto, Src: AddrFromNetip(src), Dst: AddrFromNetip(dst), SrcPort: sport, DstPort: dport, HasPorts: true}
	}
	tests := []struct {
		name string
		b    []byte
		ok   bool
		want Parsed // l4 and end not compared
	}{
		{"v4 udp, 8 bytes of transport", error4(flow4.Build()[:28]), true, quoted(host4, peer4, ProtoUDP, 5000, 6000)},
		{"v6 tcp", error6(flow6.Build()[:48]), true, quoted(host6, peer6, ProtoTCP, 5000, 443)},
		{"v6 first fragment", error6(first6.Build()[:56]), true, func() Parsed {
			q := quoted(host6, peer6, ProtoUDP, 5000, 6000)
			q.Frag, q.FragID = FragFirst, 3
			return q
		}()},
		{"v6 behind destination options", error6(withExt(flow6.Build(), extDestOpts)[:56]), true, quoted(host6, peer6, ProtoTCP, 5000, 443)},
		{"v6 echo request", error6(echo6.Build()[:48]), true, Parsed{Version: 6, Proto: ProtoICMPv6, Src: AddrFromNetip(host6), Dst: AddrFromNetip(peer6), ICMPType: 128, ICMPID: 99}},
		{"v6 later fragment", error6(later6.Build()[:56]), false, Parsed{}},
		{"v4 transport cut short", error4(flow4.Build()[:27]), false, Parsed{}},
		{"v6 quoting v4", error6(flow4.Build()[:28]), false, Parsed{}},
		{"v6 extension header past the quote", error6(withExt(flow6.Build(), extDestOpts)[:47]), false, Parsed{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var p, q Parsed
			if !p.Decode(tt.b) {
				t.Fatal("Decode refused the ICMP error")
			}
			ok := p.DecodeQuote(tt.b, &q)
			q.l4, q.end = 0, 0
			if ok != tt.ok || (ok && q != tt.want) {
				t.Errorf("DecodeQuote = %v\n%+v, want %v\n%+v", ok, q, tt.ok, tt.want)
			}
		})
	}
	var p, q Parsed
	p.Decode(flow4.Build())
	if p.DecodeQuote(flow4.Build(), &q) {
		t.Error("DecodeQuote accepted a packet that is no ICMP error")
	}
}

func TestDecodeAllocs(t *testing.T) {
	pkts := [][]byte{
		filtertest.Packet{Src: host4, Dst: peer4, Proto: ProtoTCP, SrcPort: 1, DstPort: 2, TCPFlags: TCPSyn}.Build(),
		withExt(filtertest.Packet{Src: host6, Dst: peer6, Proto: ProtoUDP, SrcPort: 1, DstPort: 2}.Build(), extDestOpts),
		filtertest.Packet{Src: peer4, Dst: host4, Proto: ProtoICMPv4, ICMPType: 3, Quote: filtertest.Packet{Src: host4, Dst: peer4, Proto: ProtoUDP}.Build()}.Build(),
	}
	var p, q Parsed
	if a := testing.AllocsPerRun(100, func() {
		for _, b := range pkts {
			p.Decode(b)
			p.DecodeQuote(b, &q)
		}
	}); a != 0 {
		t.Errorf("%v allocations per decode, want 0", a)
	}
}

func BenchmarkDecode(b *testing.B) {
	for _, tc := range []struct {
		name string
		pkt  []byte
	}{
		{"tcp4", filtertest.Packet{Src: host4, Dst: peer4, Proto: ProtoTCP, SrcPort: 1, DstPort: 2, TCPFlags: TCPAck, Payload: 1380}.Build()},
		{"udp6", filtertest.Packet{Src: host6, Dst: peer6, Proto: ProtoUDP, SrcPort: 1, DstPort: 2, Payload: 1372}.Build()},
	} {
		b.Run(tc.name, func(b *testing.B) {
			var p Parsed
			b.ReportAllocs()
			for b.Loop() {
				p.Decode(tc.pkt)
			}
		})
	}
}

// FuzzDecode: on any input Decode and DecodeQuote do not panic, stay
// inside the buffer, and agree with themselves: the packet cut at its
// length decodes the same. FuzzDecodeFast holds Decode's shortcut for the
// common packet to the general decoder.
func FuzzDecode(f *testing.F) {
	for _, p := range []filtertest.Packet{
		{Src: host4, Dst: peer4, Proto: ProtoTCP, SrcPort: 40000, DstPort: 22, TCPFlags: TCPSyn},
		{Src: host6, Dst: peer6, Proto: ProtoUDP, SrcPort: 5000, DstPort: 53, Payload: 4},
		{Src: host4, Dst: peer4, Proto: ProtoICMPv4, ICMPType: 8, ICMPID: 1},
		{Src: peer4, Dst: host4, Proto: ProtoICMPv4, ICMPType: 3, Quote: filtertest.Packet{Src: host4, Dst: peer4, Proto: ProtoUDP, SrcPort: 1, DstPort: 2}.Build()[:28]},
		{Src: peer6, Dst: host6, Proto: ProtoICMPv6, ICMPType: 2, Quote: filtertest.Packet{Src: host6, Dst: peer6, Proto: ProtoTCP, SrcPort: 1, DstPort: 2}.Build()[:48]},
		{Src: host4, Dst: peer4, Proto: ProtoUDP, SrcPort: 1, DstPort: 2, MoreFragments: true, ID: 7, Payload: 16},
		{Src: host6, Dst: peer6, Proto: ProtoUDP, FragOffset: 24, ID: 7, Payload: 16},
		{Src: host4, Dst: peer4, Proto: ProtoSCTP, SrcPort: 1, DstPort: 38412},
	} {
		f.Add(p.Build())
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var p, again, q Parsed
		ok := p.Decode(b)
		if ok != p.Valid() {
			t.Fatalf("Decode = %v, Valid = %v", ok, p.Valid())
		}
		if !ok {
			return
		}
		if p.end > len(b) || int(p.l4) > p.end || p.end < 20 || (p.Version != 4 && p.Version != 6) {
			t.Fatalf("Decode accepted with end=%d l4=%d version=%d for %d bytes", p.end, p.l4, p.Version, len(b))
		}
		if p.HasPorts && (p.Frag == FragLater || int(p.l4)+8 > p.end) {
			t.Fatalf("ports claimed without a transport header: %+v", p)
		}
		if !again.Decode(b[:p.end]) || again != p {
			t.Fatalf("the packet cut at its length decodes as %+v, not %+v", again, p)
		}
		if p.DecodeQuote(b, &q) && (q.Version != p.Version || int(q.l4) > q.end) {
			t.Fatalf("quote %+v of %+v", q, p)
		}
	})
}

// stale is a Parsed whose every field holds something no packet decodes
// to, standing for the previous packet in a reused batch slot.
var stale = Parsed{
	Src: Addr{Hi: 0xa1, Lo: 0xa2}, Dst: Addr{Hi: 0xa3, Lo: 0xa4}, end: -1, FragID: 0xa5a5a5a5,
	SrcPort: 0xa6a6, DstPort: 0xa7a7, ICMPID: 0xa8a8, l4: 0xa9a9, Version: 0xaa, Proto: 0xab,
	Frag: 0xac, TCPFlags: 0xad, ICMPType: 0xae, ICMPCode: 0xaf, HasPorts: true,
}

// TestStaleSetsEveryField keeps FuzzDecodeFast honest when Parsed grows a
// field: a field stale leaves zero could be one Decode forgets to write.
func TestStaleSetsEveryField(t *testing.T) {
	v := reflect.ValueOf(stale)
	for i := range v.NumField() {
		if v.Field(i).IsZero() {
			t.Errorf("stale.%s is zero", v.Type().Field(i).Name)
		}
	}
}

// applying is p without the fields that do not apply to its packet
// (see Parsed), which Decode may leave as they were.
func applying(p Parsed) Parsed {
	if p.Frag == FragNone {
		p.FragID = 0
	}
	if !p.IsICMP() {
		p.ICMPID, p.ICMPType, p.ICMPCode = 0, 0, 0
	}
	return p
}

// FuzzDecodeFast is the differential test of Decode's shortcut for the
// common packet (whole TCP or UDP, IPv4 without options or IPv6 without
// extension headers) against the general decoder: on every input both
// accept or both refuse, and an accepted packet decodes to the same value
// in every field that applies to it, all of which the shortcut claims to
// write. Decode starts from a Parsed that held another packet, as the TUN
// wrapper's batch slots do, so a field the shortcut forgot shows. The
// seeds in testdata/fuzz/FuzzDecodeFast sit on each of the shortcut's
// boundaries (header length, fragment bits, length fields one short or one
// past, TCP data offset, UDP length, other protocols and next headers).
func FuzzDecodeFast(f *testing.F) {
	for _, p := range []filtertest.Packet{
		{Src: host4, Dst: peer4, Proto: ProtoTCP, SrcPort: 40000, DstPort: 22, TCPFlags: TCPAck, Payload: 64},
		{Src: host6, Dst: peer6, Proto: ProtoUDP, SrcPort: 5000, DstPort: 53, Payload: 4},
	} {
		f.Add(p.Build())
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		fast, full := stale, stale
		okFast, okFull := fast.Decode(b), full.decodeAny(b)
		if okFast != okFull {
			t.Fatalf("Decode = %v, the general decoder %v", okFast, okFull)
		}
		if okFast != fast.Valid() || okFull != full.Valid() {
			t.Fatalf("Decode = %v with Valid %v, the general decoder %v with Valid %v", okFast, fast.Valid(), okFull, full.Valid())
		}
		if okFast && applying(fast) != applying(full) {
			t.Fatalf("Decode makes\n%+v\nthe general decoder\n%+v", fast, full)
		}
	})
}
