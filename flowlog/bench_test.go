package flowlog

import (
	"net/netip"
	"testing"
	"time"

	"meshd.dev/meshd/filter"
	"meshd.dev/meshd/filter/filtertest"
	"meshd.dev/meshd/netmap"
	"meshd.dev/meshd/packet"
)

// BenchmarkBatch counts a batch of 64 packets: one flow (a GRO batch of a
// bulk transfer) or 64 flows (one packet to each of 64 peers). It reports
// the cost per packet.
func BenchmarkBatch(b *testing.B) {
	for _, flows := range []int{1, 64} {
		b.Run(map[int]string{1: "oneflow", 64: "64flows"}[flows], func(b *testing.B) {
			tb := NewTable(0)
			pp := make([]packet.Parsed, 64)
			for i := range pp {
				pp[i].Decode(filtertest.Packet{Src: netip.AddrFrom4([4]byte{100, 64, 0, 1}), Dst: netip.AddrFrom4([4]byte{100, 64, 1, byte(i % flows)}),
					Proto: netmap.ProtoTCP, SrcPort: 40000, DstPort: 5201, TCPFlags: filtertest.ACK, Payload: 1380}.Build())
			}
			now := time.Unix(1, 0)
			b.ReportAllocs()
			for b.Loop() {
				fb := tb.Begin(now)
				for i := range pp {
					fb.Add(&pp[i], 1420, filter.Out, filter.Accept)
				}
				fb.End()
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(pp)), "ns/packet")
		})
	}
}
