package filter

import (
	"testing"
	"time"

	"meshd.dev/meshd/packet"
)

// TestAcceptedCounted: every way into the filter counts the packets it
// lets through, per direction, and only those; an InBatch's caller
// reports its count when the batch ends (InBatch.Done).
func TestAcceptedCounted(t *testing.T) {
	f := seedFilter(t, inference, Options{})
	now := time.Now()
	accept := pkt{src: engineer, dst: inference, proto: protoTCP, sport: 1, dport: 22, flags: tcpSYN}.build()
	deny := pkt{src: outsider, dst: inference, proto: protoTCP, sport: 1, dport: 22, flags: tcpSYN}.build()
	outB := pkt{src: inference, dst: outsider, proto: protoUDP, sport: 1, dport: 53}.build()
	pp := make([]packet.Parsed, 4)
	for _, tt := range []struct {
		name    string
		do      func()
		in, out uint64 // added by do
	}{
		{"Inbound accepted", func() { f.Inbound(accept, now) }, 1, 0},
		{"Inbound dropped", func() { f.Inbound(deny, now) }, 0, 0},
		{"InboundBatch", func() {
			bufs := [][]byte{accept, deny, accept, {0x45}}
			f.InboundBatch(bufs, decoded(pp, bufs, 0, nil), 0, now)
		}, 2, 0},
		{"InBatch with Done", func() {
			in := f.BeginIn(now)
			n := 0
			for _, b := range [][]byte{accept, accept, deny} {
				var p packet.Parsed
				p.Decode(b)
				if in.Judge(&p, b) == Accept {
					n++
				}
			}
			in.Done(n)
		}, 2, 0},
		{"InBatch without Done", func() {
			in := f.BeginIn(now)
			var p packet.Parsed
			p.Decode(accept)
			in.Judge(&p, accept)
		}, 0, 0},
		{"Outbound", func() { f.Outbound(outB, now) }, 0, 1},
		{"OutboundBatch skips size 0 and malformed", func() {
			bufs := [][]byte{outB, outB, outB, {0x45, 1}}
			sizes := []int{len(outB), 0, len(outB), 2}
			f.OutboundBatch(bufs, decoded(pp, bufs, 0, sizes), 0, sizes, now)
		}, 0, 2},
	} {
		in0, out0 := f.Accepted(In), f.Accepted(Out)
		tt.do()
		if in, out := f.Accepted(In)-in0, f.Accepted(Out)-out0; in != tt.in || out != tt.out {
			t.Errorf("%s: accepted in %d out %d, want %d and %d", tt.name, in, out, tt.in, tt.out)
		}
	}
	if f.Accepted(Direction(7)) != 0 {
		t.Error("a direction that does not exist has accepts")
	}
}
