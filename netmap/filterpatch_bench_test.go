package netmap

import (
	"net/netip"
	"testing"
)

// BenchmarkApplyFilterPatch: one join into a tenant of 100, as each member
// applies it: two sources added to a list of 200.
func BenchmarkApplyFilterPatch(b *testing.B) {
	var srcs []netip.Prefix
	for i := range 100 {
		srcs = append(srcs, netip.PrefixFrom(netip.AddrFrom4([4]byte{100, 64, byte(i / 200), byte(i % 200 * 1)}), 32))
	}
	for i := range 100 {
		srcs = append(srcs, netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfd, 0x7a, 0x11, 0x5c, 0xa1, 0xe0, 14: byte(i / 200), 15: byte(i % 200)}), 128))
	}
	f := []FilterRule{{SrcIPs: srcs, DstPorts: []NetPortRange{{Net: srcs[0], Ports: AllPorts}}}}
	p := []FilterRulePatch{{Rule: 0, Add: []netip.Prefix{
		netip.PrefixFrom(netip.AddrFrom4([4]byte{100, 64, 0, 250}), 32),
		netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfd, 0x7a, 0x11, 0x5c, 0xa1, 0xe0, 15: 250}), 128),
	}}}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ApplyFilterPatch(f, p); err != nil {
			b.Fatal(err)
		}
	}
}
