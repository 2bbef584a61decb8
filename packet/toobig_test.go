package packet

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"
)

// onesSum is the Internet checksum's folded one's-complement sum of the
// concatenated parts, computed the slow way as the reference.
func onesSum(parts ...[]byte) uint16 {
	var b []byte
	for _, p := range parts {
		b = append(b, p...)
	}
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return uint16(sum)
}

// ipPacket builds an IPv4 or IPv6 packet of total bytes from src to dst
// with protocol proto whose payload starts with head.
func ipPacket(src, dst string, proto byte, total int, head []byte) []byte {
	s, d := netip.MustParseAddr(src), netip.MustParseAddr(dst)
	var p []byte
	if s.Is4() {
		p = make([]byte, total)
		p[0] = 0x45
		binary.BigEndian.PutUint16(p[2:], uint16(total))
		binary.BigEndian.PutUint16(p[6:], 0x4000) // DF
		p[8], p[9] = 64, proto
		copy(p[12:], s.AsSlice())
		copy(p[16:], d.AsSlice())
		copy(p[20:], head)
	} else {
		p = make([]byte, total)
		p[0] = 0x60
		binary.BigEndian.PutUint16(p[4:], uint16(total-40))
		p[6], p[7] = proto, 64
		copy(p[8:], s.AsSlice())
		copy(p[24:], d.AsSlice())
		copy(p[40:], head)
	}
	for i := len(head) + 40; i < total; i++ {
		p[i] = byte(i)
	}
	return p
}

// tooBig decodes pkt and builds its error into buf, as the data path
// does; a packet Decode refuses gets none.
func tooBig(buf, pkt []byte, mtu int) int {
	var p Parsed
	if !p.Decode(pkt) {
		return 0
	}
	return p.TooBig(buf, pkt, mtu)
}

func TestTooBig(t *testing.T) {
	udp := []byte{0x9c, 0x40, 0x13, 0x89, 0, 0, 0, 0}
	fragment := ipPacket("100.64.0.1", "100.64.0.2", 17, 3000, udp)
	binary.BigEndian.PutUint16(fragment[6:], 0x0010) // offset 128 bytes
	tests := []struct {
		name string
		pkt  []byte
		mtu  int
		want bool
	}{
		{"IPv4 UDP", ipPacket("100.64.0.1", "100.64.0.2", 17, 3000, udp), 1420, true},
		{"IPv4 echo request", ipPacket("100.64.0.1", "100.64.0.2", 1, 8000, []byte{8, 0}), 1420, true},
		{"IPv6 UDP", ipPacket("fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2", 17, 3000, udp), 1400, true},
		{"IPv6 echo request", ipPacket("fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2", 58, 9000, []byte{128, 0}), 1280, true},
		{"fits", ipPacket("100.64.0.1", "100.64.0.2", 17, 1420, udp), 1420, false},
		{"IPv4 ICMP error", ipPacket("100.64.0.1", "100.64.0.2", 1, 3000, []byte{3, 4}), 1420, false},
		{"IPv6 ICMP error", ipPacket("fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2", 58, 3000, []byte{1, 0}), 1280, false},
		{"IPv6 ICMP error behind destination options", ipPacket("fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2", 60, 3000, []byte{58, 0, 1, 4, 0, 0, 0, 0, 1, 0}), 1280, false},
		{"IPv6 UDP behind destination options", ipPacket("fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2", 60, 3000, []byte{17, 0, 1, 4, 0, 0, 0, 0, 0x9c, 0x40, 0x13, 0x89, 0, 0, 0, 0}), 1280, true},
		{"IPv4 non-first fragment", fragment, 1420, false},
		{"IPv4 from unspecified", ipPacket("0.0.0.0", "100.64.0.2", 17, 3000, udp), 1420, false},
		{"IPv4 from multicast", ipPacket("224.0.0.5", "100.64.0.2", 17, 3000, udp), 1420, false},
		{"IPv6 from multicast", ipPacket("ff02::1", "fd7a:115c:a1e0::2", 17, 3000, udp), 1280, false},
		{"IPv6 below its minimum MTU", ipPacket("fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2", 17, 3000, udp), 1000, false},
		{"truncated", []byte{0x45, 0, 0}, 1, false},
		{"not IP", bytes.Repeat([]byte{0x20}, 2000), 1420, false},
	}
	buf := make([]byte, TooBigLen)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clear(buf)
			n := tooBig(buf, tt.pkt, tt.mtu)
			if (n > 0) != tt.want {
				t.Fatalf("TooBig = %d bytes, want an error: %v", n, tt.want)
			}
			if n == 0 {
				return
			}
			out := buf[:n]
			if out[0]>>4 == 4 {
				checkPTB4(t, out, tt.pkt, tt.mtu)
			} else {
				checkPTB6(t, out, tt.pkt, tt.mtu)
			}
		})
	}
}

func checkPTB4(t *testing.T, out, pkt []byte, mtu int) {
	t.Helper()
	if out[0] != 0x45 || int(binary.BigEndian.Uint16(out[2:])) != len(out) || out[9] != 1 || out[8] == 0 {
		t.Fatalf("bad IPv4 header % x", out[:20])
	}
	if onesSum(out[:20]) != 0xffff {
		t.Error("IPv4 header checksum does not verify")
	}
	if !bytes.Equal(out[12:16], pkt[16:20]) || !bytes.Equal(out[16:20], pkt[12:16]) {
		t.Errorf("addresses %v -> %v, want the packet's reversed", out[12:16], out[16:20])
	}
	icmp := out[20:]
	if icmp[0] != 3 || icmp[1] != 4 || int(binary.BigEndian.Uint16(icmp[6:])) != mtu {
		t.Errorf("ICMP type %d code %d mtu %d, want 3/4/%d", icmp[0], icmp[1], binary.BigEndian.Uint16(icmp[6:]), mtu)
	}
	if onesSum(icmp) != 0xffff {
		t.Error("ICMP checksum does not verify")
	}
	if len(out) > 576 || !bytes.Equal(icmp[8:], pkt[:len(icmp)-8]) || len(icmp)-8 < 28 {
		t.Errorf("quotes %d bytes in a %d-byte error, want the packet's first bytes within 576", len(icmp)-8, len(out))
	}
}

func checkPTB6(t *testing.T, out, pkt []byte, mtu int) {
	t.Helper()
	if out[0]>>4 != 6 || int(binary.BigEndian.Uint16(out[4:]))+40 != len(out) || out[6] != 58 || out[7] == 0 {
		t.Fatalf("bad IPv6 header % x", out[:40])
	}
	if !bytes.Equal(out[8:24], pkt[24:40]) || !bytes.Equal(out[24:40], pkt[8:24]) {
		t.Error("addresses are not the packet's reversed")
	}
	icmp := out[40:]
	if icmp[0] != 2 || icmp[1] != 0 || int(binary.BigEndian.Uint32(icmp[4:])) != mtu {
		t.Errorf("ICMPv6 type %d code %d mtu %d, want 2/0/%d", icmp[0], icmp[1], binary.BigEndian.Uint32(icmp[4:]), mtu)
	}
	pseudo := make([]byte, 40)
	copy(pseudo, out[8:40])
	binary.BigEndian.PutUint32(pseudo[32:], uint32(len(icmp)))
	pseudo[39] = 58
	if onesSum(pseudo, icmp) != 0xffff {
		t.Error("ICMPv6 checksum does not verify")
	}
	if len(out) > 1280 || !bytes.Equal(icmp[8:], pkt[:len(icmp)-8]) || len(icmp)-8 < 48 {
		t.Errorf("quotes %d bytes in a %d-byte error, want the packet's first bytes within 1280", len(icmp)-8, len(out))
	}
}

func TestTooBigAllocs(t *testing.T) {
	buf := make([]byte, TooBigLen)
	pkt := ipPacket("fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2", 17, 3000, nil)
	if a := testing.AllocsPerRun(100, func() { tooBig(buf, pkt, 1280) }); a != 0 {
		t.Errorf("%v allocations per error, want 0", a)
	}
}

// FuzzTooBig: on any input Decode and TooBig do not panic, and what
// TooBig builds is a well-formed ICMP error with valid checksums quoting
// the packet.
func FuzzTooBig(f *testing.F) {
	f.Add(ipPacket("100.64.0.1", "100.64.0.2", 17, 1600, []byte{1, 2, 3, 4}), uint16(1420))
	f.Add(ipPacket("fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2", 6, 1500, nil), uint16(1280))
	f.Add(ipPacket("100.64.0.1", "100.64.0.2", 1, 100, []byte{3, 4}), uint16(68))
	buf := make([]byte, TooBigLen)
	f.Fuzz(func(t *testing.T, pkt []byte, mtu uint16) {
		n := tooBig(buf, pkt, int(mtu))
		if n == 0 {
			return
		}
		if n > len(buf) || len(pkt) <= int(mtu) {
			t.Fatalf("built %d bytes for a %d-byte packet and mtu %d", n, len(pkt), mtu)
		}
		if buf[0]>>4 == 4 {
			checkPTB4(t, buf[:n], pkt, int(mtu))
		} else {
			checkPTB6(t, buf[:n], pkt, int(mtu))
		}
	})
}
