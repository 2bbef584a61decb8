package packet

import "testing"

func TestSetTCPPort(t *testing.T) {
	for _, tc := range []struct {
		name      string
		v6, v6ext bool
	}{{"ipv4", false, false}, {"ipv6", true, false}, {"ipv6 with an extension header", true, true}} {
		t.Run(tc.name, func(t *testing.T) {
			pkt := synPacket(tc.v6, tc.v6ext, 0x18, nil)
			p := decoded(t, pkt)
			if !p.SetTCPPort(pkt, false, 40022) || p.DstPort != 40022 || !checksumOK(pkt) {
				t.Fatalf("dst: %+v, checksum ok %v", p, checksumOK(pkt))
			}
			if !p.SetTCPPort(pkt, true, 22) || p.SrcPort != 22 || !checksumOK(pkt) {
				t.Fatalf("src: %+v", p)
			}
			q := decoded(t, pkt)
			if q.SrcPort != 22 || q.DstPort != 40022 {
				t.Fatalf("decoded again: %d -> %d", q.SrcPort, q.DstPort)
			}
			if allocs := testing.AllocsPerRun(100, func() { p.SetTCPPort(pkt, false, 22) }); allocs != 0 {
				t.Fatalf("%v allocations", allocs)
			}
		})
	}
	udp := synPacket(false, false, 0x02, nil)
	udp[9] = ProtoUDP
	var p Parsed
	if p.Decode(udp) && p.SetTCPPort(udp, false, 1) {
		t.Fatal("rewrote a UDP port as TCP")
	}
	pkt := synPacket(false, false, 0x02, nil)
	q := decoded(t, pkt)
	if q.SetTCPPort(pkt[:30], false, 1) {
		t.Fatal("rewrote a truncated header")
	}
}
