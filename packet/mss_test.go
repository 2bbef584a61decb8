package packet

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"
)

// tcpChecksum computes a TCP checksum from scratch (pseudo-header and
// segment with its checksum field taken as zero): the reference the
// incremental update must agree with.
func tcpChecksum(src, dst netip.Addr, seg []byte) uint16 {
	var sum uint32
	add := func(b []byte) {
		for i := 0; i+1 < len(b); i += 2 {
			sum += uint32(binary.BigEndian.Uint16(b[i:]))
		}
		if len(b)%2 == 1 {
			sum += uint32(b[len(b)-1]) << 8
		}
	}
	add(src.AsSlice())
	add(dst.AsSlice())
	var ph [4]byte
	binary.BigEndian.PutUint16(ph[:2], 6)
	binary.BigEndian.PutUint16(ph[2:], uint16(len(seg)))
	add(ph[:])
	add(seg[:16])
	add(seg[18:])
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// synPacket builds an IPv4 or IPv6 TCP packet with the given flags and
// options (padded to a multiple of 4) and a correct checksum; v6ext adds an
// IPv6 destination options header.
func synPacket(v6, v6ext bool, flags byte, opts []byte) []byte {
	for len(opts)%4 != 0 {
		opts = append(opts, 0)
	}
	tcp := make([]byte, 20+len(opts)+5) // 5 bytes of payload
	binary.BigEndian.PutUint16(tcp[0:], 40000)
	binary.BigEndian.PutUint16(tcp[2:], 22)
	tcp[12] = byte((20+len(opts))/4) << 4
	tcp[13] = flags
	copy(tcp[20:], opts)
	copy(tcp[20+len(opts):], "hello")
	var pkt []byte
	var src, dst netip.Addr
	if v6 {
		src, dst = netip.MustParseAddr("fd7a:115c:a1e0::1"), netip.MustParseAddr("fd7a:115c:a1e0::2")
		h := make([]byte, 40)
		h[0] = 6 << 4
		h[6], h[7] = 6, 64
		var ext []byte
		if v6ext {
			h[6] = 60
			ext = []byte{6, 0, 1, 4, 0, 0, 0, 0} // next TCP, 8 bytes, PadN
		}
		binary.BigEndian.PutUint16(h[4:], uint16(len(ext)+len(tcp)))
		a, b := src.As16(), dst.As16()
		copy(h[8:], a[:])
		copy(h[24:], b[:])
		pkt = append(append(h, ext...), tcp...)
	} else {
		src, dst = netip.MustParseAddr("100.64.0.1"), netip.MustParseAddr("100.64.0.2")
		h := make([]byte, 20)
		h[0] = 0x45
		binary.BigEndian.PutUint16(h[2:], uint16(20+len(tcp)))
		h[6] = 0x40 // DF
		h[8], h[9] = 64, 6
		a, b := src.As4(), dst.As4()
		copy(h[12:], a[:])
		copy(h[16:], b[:])
		pkt = append(h, tcp...)
	}
	seg := pkt[len(pkt)-len(tcp):]
	binary.BigEndian.PutUint16(seg[16:], tcpChecksum(src, dst, seg))
	return pkt
}

// decoded decodes pkt, failing the test if it is malformed.
func decoded(t testing.TB, pkt []byte) *Parsed {
	t.Helper()
	p := new(Parsed)
	if !p.Decode(pkt) {
		t.Fatalf("Decode refused % x", pkt)
	}
	return p
}

// checksumOK verifies the TCP checksum of pkt, a whole TCP packet, from
// scratch.
func checksumOK(pkt []byte) bool {
	var p Parsed
	if !p.Decode(pkt) || p.Proto != ProtoTCP || p.Frag != FragNone {
		return false
	}
	seg := pkt[p.l4:p.end]
	var src, dst netip.Addr
	if pkt[0]>>4 == 4 {
		src, dst = netip.AddrFrom4([4]byte(pkt[12:16])), netip.AddrFrom4([4]byte(pkt[16:20]))
	} else {
		src, dst = netip.AddrFrom16([16]byte(pkt[8:24])), netip.AddrFrom16([16]byte(pkt[24:40]))
	}
	return tcpChecksum(src, dst, seg) == binary.BigEndian.Uint16(seg[16:])
}

func mssOption(v uint16) []byte { return []byte{2, 4, byte(v >> 8), byte(v)} }

// mssOf returns the MSS option value of pkt, 0 if none.
func mssOf(t testing.TB, pkt []byte) uint16 {
	t.Helper()
	m, _ := decoded(t, pkt).MSS(pkt)
	return m
}

// clamp decodes pkt and clamps its MSS to mss, as the data path does; a
// packet Decode refuses is left alone.
func clamp(pkt []byte, mss uint16) bool {
	var p Parsed
	return p.Decode(pkt) && p.ClampMSS(pkt, mss)
}

func TestClampMSS(t *testing.T) {
	const syn, synAck, ack = 0x02, 0x12, 0x10
	// A typical Linux SYN: MSS, SACK permitted, timestamps, NOP, window
	// scale; and one with the MSS at an odd offset behind a NOP.
	linux := func(m uint16) []byte {
		return append(mssOption(m), 4, 2, 8, 10, 1, 2, 3, 4, 0, 0, 0, 0, 1, 3, 3, 7)
	}
	odd := func(m uint16) []byte { return append([]byte{1}, mssOption(m)...) }
	tests := []struct {
		name    string
		pkt     []byte
		want    bool
		wantMSS uint16
	}{
		{"v4 syn clamped", synPacket(false, false, syn, linux(8880)), true, 1380},
		{"v6 syn clamped", synPacket(true, false, syn, linux(8860)), true, 1380},
		{"v6 syn behind dest options", synPacket(true, true, syn, linux(8860)), true, 1380},
		{"v4 syn-ack clamped", synPacket(false, false, synAck, linux(8880)), true, 1380},
		{"odd offset", synPacket(false, false, syn, odd(0x22b0)), true, 1380},
		{"odd offset v6", synPacket(true, false, syn, odd(0xffff)), true, 1380},
		{"already small", synPacket(false, false, syn, linux(1200)), false, 1200},
		{"equal", synPacket(false, false, syn, linux(1380)), false, 1380},
		{"not a syn", synPacket(false, false, ack, linux(8880)), false, 0}, // left unchanged: checked below
		{"no mss option", synPacket(false, false, syn, []byte{1, 1, 4, 2}), false, 0},
		{"end of options first", synPacket(false, false, syn, append([]byte{0}, mssOption(8880)...)), false, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := bytes.Clone(tt.pkt)
			if got := clamp(tt.pkt, 1380); got != tt.want {
				t.Fatalf("ClampMSS = %v, want %v", got, tt.want)
			}
			if tt.wantMSS != 0 {
				if m := mssOf(t, tt.pkt); m != tt.wantMSS {
					t.Errorf("MSS %d after, want %d", m, tt.wantMSS)
				}
			}
			if !checksumOK(tt.pkt) {
				t.Error("TCP checksum no longer verifies")
			}
			if !tt.want && !bytes.Equal(before, tt.pkt) {
				t.Error("packet changed although ClampMSS reported false")
			}
		})
	}
}

func TestClampMSSRejectsMalformed(t *testing.T) {
	good := synPacket(false, false, 0x02, mssOption(8880))
	mod := func(f func(p []byte) []byte) []byte { return f(bytes.Clone(good)) }
	for _, tt := range []struct {
		name string
		pkt  []byte
	}{
		{"empty", nil},
		{"not ip", []byte{0x20, 1, 2, 3}},
		{"truncated ip", good[:19]},
		{"truncated tcp", good[:30]},
		{"total length beyond packet", mod(func(p []byte) []byte { p[3] += 10; return p })},
		{"fragment", mod(func(p []byte) []byte { p[6] = 0x20; return p })},
		{"udp", mod(func(p []byte) []byte { p[9] = 17; return p })},
		{"data offset beyond segment", mod(func(p []byte) []byte { p[20+12] = 0xf0; return p })},
		{"data offset below 20", mod(func(p []byte) []byte { p[20+12] = 0x40; return p })},
		{"option length zero", mod(func(p []byte) []byte { p[20+21] = 0; return p })},
		{"option beyond header", mod(func(p []byte) []byte { p[20+21] = 9; return p })},
		{"v6 payload beyond packet", synPacket(true, false, 0x02, mssOption(8880))[:60]},
		{"v6 fragment header", func() []byte { p := synPacket(true, false, 0x02, mssOption(8880)); p[6] = 44; return p }()},
	} {
		t.Run(tt.name, func(t *testing.T) {
			before := bytes.Clone(tt.pkt)
			if clamp(tt.pkt, 1380) {
				t.Fatal("clamped a malformed packet")
			}
			if !bytes.Equal(before, tt.pkt) {
				t.Fatal("changed a malformed packet")
			}
		})
	}
}

func TestClampMSSAllocs(t *testing.T) {
	pkt := synPacket(true, true, 0x02, mssOption(8860))
	allocs := testing.AllocsPerRun(100, func() {
		binary.BigEndian.PutUint16(pkt[len(pkt)-5-4+2:], 8860) // reset, checksum drifts but is not checked
		clamp(pkt, 1380)
	})
	if allocs != 0 {
		t.Errorf("Decode and ClampMSS allocate %.0f times per packet", allocs)
	}
}

func BenchmarkClampMSS(b *testing.B) {
	pkt := synPacket(false, false, 0x02, mssOption(8880))
	orig := bytes.Clone(pkt)
	b.ReportAllocs()
	for b.Loop() {
		copy(pkt, orig)
		clamp(pkt, 1380)
	}
}

// FuzzClampMSS: on any input Decode and ClampMSS do not panic; when it changes a
// packet it changes only the MSS value and the checksum, the MSS ends at
// the limit, and a checksum that verified before still does.
func FuzzClampMSS(f *testing.F) {
	f.Add(synPacket(false, false, 0x02, mssOption(8880)), uint16(1380))
	f.Add(synPacket(true, true, 0x12, append([]byte{1}, mssOption(9000)...)), uint16(1240))
	f.Add(synPacket(false, false, 0x10, mssOption(8880)), uint16(1380))
	f.Fuzz(func(t *testing.T, pkt []byte, mss uint16) {
		before := bytes.Clone(pkt)
		validBefore := checksumOK(pkt)
		if !clamp(pkt, mss) {
			if !bytes.Equal(before, pkt) {
				t.Fatal("changed the packet but reported false")
			}
			return
		}
		diff := 0
		for i := range pkt {
			if pkt[i] != before[i] {
				diff++
			}
		}
		if diff > 4 {
			t.Fatalf("%d bytes changed, want at most 4 (MSS and checksum)", diff)
		}
		if m := mssOf(t, pkt); m != mss {
			t.Fatalf("MSS %d after clamping to %d", m, mss)
		}
		if validBefore && !checksumOK(pkt) {
			t.Fatal("a valid checksum no longer verifies")
		}
	})
}
