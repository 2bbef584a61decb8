package tunwrap

import (
	"bytes"
	"fmt"
	"io"
	"net/netip"
	"os"
	"slices"
	"testing"

	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/tun"

	"meshd.dev/meshd/filter"
	"meshd.dev/meshd/filter/filtertest"
	"meshd.dev/meshd/flowlog"
	"meshd.dev/meshd/netmap"
)

// pipeTUN is a tun.Device over one end of a SOCK_SEQPACKET socketpair: a
// real kernel packet channel with a TUN's datagram semantics, so tests can
// play the kernel side without root, and without allocations of its own
// (raw read/write syscalls) that would hide the wrapper's.
type pipeTUN struct {
	fd     int
	pfd    [1]unix.PollFd
	events chan tun.Event
}

// newPipeTUN returns the device and the other end's file descriptor (the
// "kernel" side: what it writes, Read returns; what Write writes, it reads).
func newPipeTUN(t testing.TB) (*pipeTUN, int) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.SetNonblock(fds[0], true); err != nil {
		t.Fatal(err)
	}
	p := &pipeTUN{fd: fds[0], events: make(chan tun.Event)}
	p.pfd[0] = unix.PollFd{Fd: int32(fds[0]), Events: unix.POLLIN}
	t.Cleanup(func() { unix.Close(fds[1]) })
	return p, fds[1]
}

func (p *pipeTUN) File() *os.File { return nil }

// Read blocks for one packet, then takes whatever else is queued, up to
// len(bufs).
func (p *pipeTUN) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	n := 0
	for n < len(bufs) {
		m, err := unix.Read(p.fd, bufs[n][offset:])
		switch {
		case err == unix.EAGAIN && n > 0:
			return n, nil
		case err == unix.EAGAIN:
			if _, err := unix.Poll(p.pfd[:], 5000); err != nil && err != unix.EINTR {
				return 0, err
			}
			continue
		case err != nil:
			return n, err
		case m == 0:
			return n, io.EOF
		}
		sizes[n] = m
		n++
	}
	return n, nil
}

func (p *pipeTUN) Write(bufs [][]byte, offset int) (int, error) {
	for i, b := range bufs {
		if _, err := unix.Write(p.fd, b[offset:]); err != nil {
			return i, err
		}
	}
	return len(bufs), nil
}

func (p *pipeTUN) MTU() (int, error)        { return 1280, nil }
func (p *pipeTUN) Name() (string, error)    { return "pipe", nil }
func (p *pipeTUN) Events() <-chan tun.Event { return p.events }
func (p *pipeTUN) BatchSize() int           { return 128 }
func (p *pipeTUN) Close() error             { return unix.Close(p.fd) }

// kernelRecv reads every packet queued on the kernel side of a pipeTUN.
func kernelRecv(t testing.TB, fd int) [][]byte {
	t.Helper()
	var out [][]byte
	buf := make([]byte, 65536)
	for {
		n, _, err := unix.Recvfrom(fd, buf, unix.MSG_DONTWAIT)
		if err == unix.EAGAIN {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, slices.Clone(buf[:n]))
	}
}

const wgOffset = 16 // wireguard-go writes packets at MessageTransportOffsetContent

// batch lays packets out as wireguard-go hands them to Write: each in its
// own buffer after offset bytes of headroom.
func batch(pkts ...[]byte) [][]byte {
	bufs := make([][]byte, len(pkts))
	for i, p := range pkts {
		bufs[i] = append(make([]byte, wgOffset, wgOffset+len(p)), p...)
	}
	return bufs
}

var (
	peerIP = netip.MustParseAddr("100.64.0.1")
	selfIP = netip.MustParseAddr("100.64.0.2")
	// An outsider allowed by no rule; cryptokey routing would bind it to
	// some other peer.
	otherIP = netip.MustParseAddr("100.64.0.9")
)

// allowTCP lets peerIP reach selfIP on TCP port.
func allowTCP(port uint16) []netmap.FilterRule {
	dst := netmap.NetPortRange{Net: netip.PrefixFrom(selfIP, 32), Ports: netmap.PortRange{First: port, Last: port}}
	return []netmap.FilterRule{{SrcIPs: []netip.Prefix{netip.PrefixFrom(peerIP, 32)}, DstPorts: []netmap.NetPortRange{dst}, IPProto: []uint8{netmap.ProtoTCP}}}
}

func newTestFilter(t testing.TB, rules []netmap.FilterRule) *filter.Filter {
	t.Helper()
	f := filter.New(filter.Options{MaxFlows: 1024})
	r, err := filter.Compile(rules, []netip.Prefix{netip.PrefixFrom(selfIP, 32)})
	if err != nil {
		t.Fatal(err)
	}
	f.SetRules(r)
	return f
}

func tcp(src, dst netip.Addr, sport, dport uint16, flags uint8) []byte {
	return filtertest.Packet{Src: src, Dst: dst, Proto: netmap.ProtoTCP, SrcPort: sport, DstPort: dport, TCPFlags: flags, Payload: 32}.Build()
}

// TestWrapperWrite checks the inbound direction through the filter: a batch written by
// WireGuard reaches the device with exactly the accepted packets, in order,
// and every drop is counted by reason.
func TestWrapperWrite(t *testing.T) {
	allowed := tcp(peerIP, selfIP, 40000, 22, filtertest.SYN)
	denied := tcp(peerIP, selfIP, 40001, 80, filtertest.SYN)
	outsider := tcp(otherIP, selfIP, 40002, 22, filtertest.SYN)
	midflow := tcp(peerIP, selfIP, 40003, 8080, filtertest.ACK) // no flow, no rule: Tailscale would pass it
	shortPkt := []byte{0x45, 0, 0, 20}
	allowed2 := tcp(peerIP, selfIP, 40004, 22, filtertest.SYN)
	for _, tc := range []struct {
		name      string
		in        [][]byte
		want      [][]byte
		noRule    uint64
		malformed uint64
	}{
		{"all allowed", [][]byte{allowed, allowed2}, [][]byte{allowed, allowed2}, 0, 0},
		{"mixed keeps order", [][]byte{denied, allowed, shortPkt, outsider, midflow, allowed2}, [][]byte{allowed, allowed2}, 3, 1},
		{"all dropped", [][]byte{denied, outsider}, nil, 2, 0},
		{"empty batch", nil, nil, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev, kfd := newPipeTUN(t)
			f := newTestFilter(t, allowTCP(22))
			w := New(dev, Config{Filter: f})
			n, err := w.Write(batch(tc.in...), wgOffset)
			if err != nil || n != len(tc.want) {
				t.Fatalf("Write = %d, %v; want %d", n, err, len(tc.want))
			}
			got := kernelRecv(t, kfd)
			if len(got) != len(tc.want) {
				t.Fatalf("device got %d packets, want %d", len(got), len(tc.want))
			}
			for i := range got {
				if !bytes.Equal(got[i], tc.want[i]) {
					t.Errorf("packet %d differs from the accepted one", i)
				}
			}
			if d := f.Dropped(filter.In, filter.DropNoRule); d != tc.noRule {
				t.Errorf("no_rule drops = %d, want %d", d, tc.noRule)
			}
			if d := f.Dropped(filter.In, filter.DropMalformed); d != tc.malformed {
				t.Errorf("malformed drops = %d, want %d", d, tc.malformed)
			}
		})
	}
}

// TestWrapperRead checks the outbound direction through the filter: what the kernel sends is
// read with malformed packets' sizes zeroed (wireguard-go skips them), and
// a connection this node opens lets the peer's replies in through Write,
// though no rule allows the peer to open one.
func TestWrapperRead(t *testing.T) {
	dev, kfd := newPipeTUN(t)
	f := newTestFilter(t, allowTCP(22))
	w := New(dev, Config{Filter: f})
	syn := tcp(selfIP, peerIP, 50000, 443, filtertest.SYN)
	garbage := []byte{0x60, 1, 2}
	udp := filtertest.Packet{Src: selfIP, Dst: peerIP, Proto: netmap.ProtoUDP, SrcPort: 5353, DstPort: 53, Payload: 10}.Build()
	for _, p := range [][]byte{syn, garbage, udp} {
		if _, err := unix.Write(kfd, p); err != nil {
			t.Fatal(err)
		}
	}
	bufs := make([][]byte, 8)
	for i := range bufs {
		bufs[i] = make([]byte, wgOffset+2048)
	}
	sizes := make([]int, len(bufs))
	n, err := w.Read(bufs, sizes, wgOffset)
	if err != nil || n != 3 {
		t.Fatalf("Read = %d, %v; want 3 packets", n, err)
	}
	if want := []int{len(syn), 0, len(udp)}; !slices.Equal(sizes[:n], want) {
		t.Fatalf("sizes = %v, want %v (the malformed packet zeroed)", sizes[:n], want)
	}
	if !bytes.Equal(bufs[0][wgOffset:wgOffset+sizes[0]], syn) {
		t.Fatal("accepted packet altered")
	}
	if d := f.Dropped(filter.Out, filter.DropMalformed); d != 1 {
		t.Fatalf("outbound malformed drops = %d, want 1", d)
	}

	// Replies to both flows come in; an unrelated packet from the same
	// peer does not.
	synAck := filtertest.Packet{Src: peerIP, Dst: selfIP, Proto: netmap.ProtoTCP, SrcPort: 443, DstPort: 50000, TCPFlags: filtertest.SYN | filtertest.ACK}.Build()
	udpReply := filtertest.Packet{Src: peerIP, Dst: selfIP, Proto: netmap.ProtoUDP, SrcPort: 53, DstPort: 5353, Payload: 40}.Build()
	stray := tcp(peerIP, selfIP, 443, 50001, filtertest.ACK)
	if n, err := w.Write(batch(synAck, stray, udpReply), wgOffset); err != nil || n != 2 {
		t.Fatalf("Write replies = %d, %v; want 2", n, err)
	}
	got := kernelRecv(t, kfd)
	if len(got) != 2 || !bytes.Equal(got[0], synAck) || !bytes.Equal(got[1], udpReply) {
		t.Fatalf("kernel got %d packets, want the SYN-ACK and the UDP reply", len(got))
	}
}

// TestWrapperAllocs asserts that the wrapper allocates nothing per batch
// in either direction, drops included, with and without a flow log.
func TestWrapperAllocs(t *testing.T) {
	for _, flows := range []*flowlog.Table{nil, flowlog.NewTable(64)} {
		t.Run(fmt.Sprintf("flowlog=%v", flows != nil), func(t *testing.T) { testWrapperAllocs(t, flows) })
	}
}

func testWrapperAllocs(t *testing.T, flows *flowlog.Table) {
	dev, kfd := newPipeTUN(t)
	f := newTestFilter(t, allowTCP(22))
	w := New(dev, Config{Filter: f, Flows: flows})
	in := batch(
		tcp(peerIP, selfIP, 40000, 22, filtertest.SYN),
		tcp(peerIP, selfIP, 40001, 80, filtertest.SYN), // dropped
		tcp(peerIP, selfIP, 40000, 22, filtertest.ACK),
		[]byte{0x45, 0, 0, 0}, // malformed
	)
	inCopy := slices.Clone(in) // Write compacts in place
	out := [][]byte{
		tcp(selfIP, peerIP, 22, 40000, filtertest.SYN|filtertest.ACK),
		{0x45, 1}, // malformed
	}
	bufs := make([][]byte, 8)
	for i := range bufs {
		bufs[i] = make([]byte, wgOffset+2048)
	}
	sizes := make([]int, len(bufs))
	sink := make([]byte, 4096)
	run := func() {
		copy(in, inCopy)
		if _, err := w.Write(in, wgOffset); err != nil {
			t.Fatal(err)
		}
		for range 2 {
			if _, err := unix.Read(kfd, sink); err != nil {
				t.Fatal(err)
			}
		}
		for _, p := range out {
			if _, err := unix.Write(kfd, p); err != nil {
				t.Fatal(err)
			}
		}
		if n, err := w.Read(bufs, sizes, wgOffset); err != nil || n != 2 || sizes[1] != 0 {
			t.Fatalf("Read = %d, %v, sizes %v", n, err, sizes[:n])
		}
	}
	run()
	if a := testing.AllocsPerRun(200, run); a != 0 {
		t.Fatalf("%v allocations per inbound+outbound batch, want 0", a)
	}
	if f.Dropped(filter.In, filter.DropNoRule) == 0 || f.Dropped(filter.Out, filter.DropMalformed) == 0 {
		t.Fatal("the allocation test did not exercise the drop paths")
	}
	if flows != nil && len(flows.Drain(nil)) != 3 { // to port 22, to port 80, malformed
		t.Fatal("the allocation test did not count flows")
	}
}

// TestWrapperFlows: with a flow log, every packet the filter judged in
// either direction is counted once, by flow and verdict, with its whole
// size; outbound malformed packets count as dropped.
func TestWrapperFlows(t *testing.T) {
	dev, kfd := newPipeTUN(t)
	f := newTestFilter(t, allowTCP(22))
	flows := flowlog.NewTable(64)
	w := New(dev, Config{Filter: f, Flows: flows})
	syn := tcp(selfIP, peerIP, 50000, 443, filtertest.SYN)
	ack := tcp(selfIP, peerIP, 50000, 443, filtertest.ACK)
	garbage := []byte{0x60, 1, 2}
	for _, p := range [][]byte{syn, ack, ack, garbage} {
		if _, err := unix.Write(kfd, p); err != nil {
			t.Fatal(err)
		}
	}
	bufs := make([][]byte, 8)
	for i := range bufs {
		bufs[i] = make([]byte, wgOffset+2048)
	}
	sizes := make([]int, len(bufs))
	if n, err := w.Read(bufs, sizes, wgOffset); err != nil || n != 4 {
		t.Fatalf("Read = %d, %v", n, err)
	}
	synAck := tcp(peerIP, selfIP, 443, 50000, filtertest.SYN|filtertest.ACK)
	denied := tcp(peerIP, selfIP, 40001, 80, filtertest.SYN)
	if n, err := w.Write(batch(synAck, denied, denied), wgOffset); err != nil || n != 1 {
		t.Fatalf("Write = %d, %v", n, err)
	}
	kernelRecv(t, kfd)
	type key struct {
		rport   uint16
		verdict filter.Verdict
	}
	got := map[key]flowlog.Flow{}
	for _, fl := range flows.Drain(nil) {
		got[key{fl.RPort, fl.Verdict}] = fl
	}
	if len(got) != 3 {
		t.Fatalf("flows: %+v", got)
	}
	if fl := got[key{443, filter.Accept}]; fl.OutPackets != 3 || fl.OutBytes != uint64(len(syn)+2*len(ack)) ||
		fl.InPackets != 1 || fl.InBytes != uint64(len(synAck)) || fl.RemoteOpened {
		t.Errorf("connection this node opened: %+v", fl)
	}
	if fl := got[key{40001, filter.DropNoRule}]; fl.InPackets != 2 || fl.InBytes != uint64(2*len(denied)) || !fl.RemoteOpened || fl.LPort != 80 {
		t.Errorf("denied connection: %+v", fl)
	}
	if fl := got[key{0, filter.DropMalformed}]; fl.OutPackets != 1 || fl.OutBytes != uint64(len(garbage)) {
		t.Errorf("malformed packet: %+v", fl)
	}
}

// BenchmarkWrapperWrite writes a 64-packet inbound batch to a
// pipe-backed TUN directly ("bare") and through the wrapper with
// 1,000 compiled rules ("filtered"): the difference is the filter's cost,
// small next to one write syscall per packet. "dropped" is a batch from an
// address no rule names: no packet reaches the device, so it measures the
// wrapper and the filter's drop path (counters, recent-drops ring) alone.
func BenchmarkWrapperWrite(b *testing.B) {
	pol := filtertest.NewPolicy(1000)
	rules, err := filter.Compile(pol.Rules, pol.Local)
	if err != nil {
		b.Fatal(err)
	}
	mk := func(src netip.Addr) [][]byte {
		pkts := make([][]byte, 64)
		for i := range pkts {
			pkts[i] = filtertest.Packet{Src: src, Dst: pol.Self4, Proto: netmap.ProtoTCP,
				SrcPort: uint16(40000 + i), DstPort: pol.Port, TCPFlags: filtertest.ACK, Payload: 1200}.Build()
		}
		return pkts
	}
	for _, bc := range []struct {
		name     string
		filtered bool
		pkts     [][]byte
		want     int
	}{
		{"bare", false, mk(pol.Member4), 64},
		{"filtered", true, mk(pol.Member4), 64},
		{"dropped", true, mk(pol.Stranger4), 0},
	} {
		b.Run(bc.name, func(b *testing.B) {
			pdev, kfd := newPipeTUN(b)
			// Room for a whole batch on the kernel side of the pipe.
			if err := unix.SetsockoptInt(kfd, unix.SOL_SOCKET, unix.SO_RCVBUF, 1<<20); err != nil {
				b.Fatal(err)
			}
			var dev tun.Device = pdev
			if bc.filtered {
				f := filter.New(filter.Options{})
				f.SetRules(rules)
				dev = New(pdev, Config{Filter: f})
			}
			bufs := batch(bc.pkts...)
			orig := slices.Clone(bufs)
			sink := make([]byte, 4096)
			b.ReportAllocs()
			for b.Loop() {
				copy(bufs, orig)
				n, err := dev.Write(bufs, wgOffset)
				if err != nil || n != bc.want {
					b.Fatalf("Write = %d, %v; want %d", n, err, bc.want)
				}
				for range n {
					unix.Read(kfd, sink)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(bc.pkts)), "ns/packet")
		})
	}
}

// TestTooBigThroughFilter checks that the too-big replies go through the
// filter's inbound path like any packet from a peer: the reply to a packet
// the filter has just let out passes (its flow is known), one to a source
// this node does not own is dropped as not local, and an ICMP error from a
// peer quoting a flow nobody opened is still dropped.
func TestTooBigThroughFilter(t *testing.T) {
	f := newTestFilter(t, allowTCP(22))
	l := NewPeers()
	peer := netmap.NewNodePrivate().Public()
	publish(l, map[netmap.NodePublic][]string{peer: {peerIP.String() + "/32"}})
	l.SetPathMTU(peer, 1420, true)
	mine := udp(selfIP.String(), peerIP.String(), 3000)
	forwarded := udp("10.9.9.9", peerIP.String(), 3000) // a subnet this node does not route
	dev := &fixedTUN{pkts: [][]byte{mine}}
	w := New(dev, Config{Filter: f, Peers: l})
	bufs, sizes := [][]byte{make([]byte, wgOffset+9000)}, []int{0}
	read := func() {
		t.Helper()
		l.Lookup(peer).lastTooBig.Store(0)
		dev.written = nil
		if _, err := w.Read(bufs, sizes, wgOffset); err != nil || sizes[0] != 0 {
			t.Fatalf("Read: %v, size %d; want the packet dropped", err, sizes[0])
		}
	}
	read()
	if len(dev.written) != 1 || !isFragNeeded(dev.written[0], 1420) {
		t.Fatalf("%d packets written to the TUN, want the fragmentation-needed error", len(dev.written))
	}
	if d := f.Stats().DropsIn; d["no_rule"] != 0 || d["not_local"] != 0 {
		t.Fatalf("inbound drops %v, want none", d)
	}

	dev.pkts = [][]byte{forwarded}
	read()
	if len(dev.written) != 0 || f.Dropped(filter.In, filter.DropNotLocal) != 1 {
		t.Fatalf("error to a foreign source: %d written, %d not_local drops; want it judged and dropped",
			len(dev.written), f.Dropped(filter.In, filter.DropNotLocal))
	}

	// The same kind of error from a peer: about the flow above it passes,
	// about a flow nobody opened it does not.
	errorAbout := func(quoted []byte) []byte {
		return filtertest.Packet{Src: peerIP, Dst: selfIP, Proto: netmap.ProtoICMPv4, ICMPType: 3, ICMPCode: 4, Quote: quoted[:28]}.Build()
	}
	untracked := udp(selfIP.String(), peerIP.String(), 100)
	untracked[21]++ // another source port
	dev.written = nil
	if n, err := w.Write(batch(errorAbout(mine), errorAbout(untracked)), wgOffset); err != nil || n != 1 || len(dev.written) != 1 {
		t.Fatalf("Write = %d, %v with %d written; want only the error about the tracked flow", n, err, len(dev.written))
	}
	if !bytes.Equal(dev.written[0], errorAbout(mine)) || f.Dropped(filter.In, filter.DropNoRule) != 1 {
		t.Fatalf("wrong packet let in, or %d no_rule drops (want 1)", f.Dropped(filter.In, filter.DropNoRule))
	}
}
