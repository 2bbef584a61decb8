package tunwrap

import (
	"net/netip"
	"testing"

	"golang.zx2c4.com/wireguard/tun"

	"meshd.dev/meshd/filter"
	"meshd.dev/meshd/filter/filtertest"
	"meshd.dev/meshd/flowlog"
	"meshd.dev/meshd/netmap"
)

// memTUN is an in-memory TUN: Read hands back the batch already in the
// caller's buffers (only the sizes), Write drops what it gets, so that a
// benchmark times the wrapper and nothing of a device.
type memTUN struct {
	tun.Device
	sizes []int
}

func (m *memTUN) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	return copy(sizes, m.sizes), nil
}

func (m *memTUN) Write(bufs [][]byte, offset int) (int, error) { return len(bufs), nil }

func (m *memTUN) BatchSize() int { return 128 }

// BenchmarkDataPath moves a batch of 64 packets of 1,420 bytes through the
// whole read path (decode, filter, peer lookup and activation check) and
// the whole write path (decode, filter), with 1,000 compiled rules and
// 1,000 peers in the table, over an in-memory TUN. "oneflow" is a bulk
// TCP transfer (one flow, as GRO delivers it), "64peers" one flow to each
// of 64 peers; "+flowlog" the same with the flow log counting every
// packet. It reports the cost per packet.
func BenchmarkDataPath(b *testing.B) {
	const batch, size, offset = 64, 1420, 16
	pol := filtertest.NewPolicy(1000)
	rules, err := filter.Compile(pol.Rules, pol.Local)
	if err != nil {
		b.Fatal(err)
	}
	peerAddr := func(i int) netip.Addr { return netip.AddrFrom4([4]byte{100, 64, byte((i + 2) >> 8), byte(i + 2)}) }
	for _, spread := range []struct {
		name    string
		peers   int
		flowlog bool
	}{{"oneflow", 1, false}, {"64peers", batch, false}, {"oneflow+flowlog", 1, true}, {"64peers+flowlog", batch, true}} {
		var flows *flowlog.Table
		if spread.flowlog {
			flows = flowlog.NewTable(0)
		}
		f := filter.New(filter.Options{})
		f.SetRules(rules)
		l := NewPeers()
		want := make(map[netmap.NodePublic][]netip.Prefix)
		for i := range 1000 {
			want[netmap.NewNodePrivate().Public()] = []netip.Prefix{netip.PrefixFrom(peerAddr(i), 32)}
		}
		l.Publish(want, func(netmap.NodePublic) bool { return true })
		out, in := make([][]byte, batch), make([][]byte, batch)
		sizes := make([]int, batch)
		for i := range batch {
			p := filtertest.Packet{Src: pol.Self4, Dst: peerAddr(i % spread.peers), Proto: netmap.ProtoTCP,
				SrcPort: uint16(40000 + i%spread.peers), DstPort: 5201, TCPFlags: filtertest.ACK, Payload: size - 40}
			out[i] = append(make([]byte, offset, offset+size), p.Build()...)
			in[i] = append(make([]byte, offset, offset+size), p.Reply().Build()...)
			sizes[i] = size
		}
		w := New(&memTUN{sizes: sizes}, Config{Filter: f, Peers: l, Flows: flows})
		readSizes := make([]int, batch)
		w.Read(out, readSizes, offset) // opens the flows the write path's replies belong to
		b.Run("read/"+spread.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if n, _ := w.Read(out, readSizes, offset); n != batch || readSizes[batch-1] != size {
					b.Fatalf("read %d packets, last of %d bytes", n, readSizes[batch-1])
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*batch), "ns/packet")
		})
		bufs := make([][]byte, batch)
		b.Run("write/"+spread.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				copy(bufs, in)
				if n, _ := w.Write(bufs, offset); n != batch {
					b.Fatalf("wrote %d packets of %d", n, batch)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*batch), "ns/packet")
		})
	}
}
