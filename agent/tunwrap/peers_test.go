package tunwrap

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"slices"
	"testing"
	"testing/synctest"

	"golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"

	"meshd.dev/meshd/filter/filtertest"
	"meshd.dev/meshd/netmap"
	"meshd.dev/meshd/packet"
)

// fixedTUN returns the same batch on every Read and keeps what is written
// to it.
type fixedTUN struct {
	tun.Device
	pkts    [][]byte
	written [][]byte
	// count only counts writes, keeping nothing (for allocation tests).
	count   bool
	nWrites int
}

func (f *fixedTUN) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	for i, p := range f.pkts {
		sizes[i] = copy(bufs[i][offset:], p)
	}
	return len(f.pkts), nil
}

func (f *fixedTUN) Write(bufs [][]byte, offset int) (int, error) {
	f.nWrites += len(bufs)
	if !f.count {
		for _, b := range bufs {
			f.written = append(f.written, bytes.Clone(b[offset:]))
		}
	}
	return len(bufs), nil
}

func (f *fixedTUN) BatchSize() int { return 128 }

// publish puts peers (key -> prefixes) into l, all configured.
func publish(l *Peers, peers map[netmap.NodePublic][]string) {
	want := make(map[netmap.NodePublic][]netip.Prefix)
	for k, ps := range peers {
		for _, p := range ps {
			want[k] = append(want[k], netip.MustParsePrefix(p))
		}
	}
	l.Publish(want, func(netmap.NodePublic) bool { return true })
}

// TestPeerLayerAllocs checks that the per-packet work of the outbound peer
// layer (the destination lookup, the activity stamp) allocates nothing
// once peers are configured, and stamps the peer of a subnet route too.
func TestPeerLayerAllocs(t *testing.T) {
	l := NewPeers()
	k1, k2 := netmap.NewNodePrivate().Public(), netmap.NewNodePrivate().Public()
	publish(l, map[netmap.NodePublic][]string{k1: {"100.64.0.2/32"}, k2: {"100.64.0.3/32", "10.1.0.0/16"}})
	src := netip.MustParseAddr("100.64.0.1")
	var pkts [][]byte
	for _, dst := range []string{"100.64.0.2", "100.64.0.2", "10.1.2.3", "100.64.0.3", "100.64.0.99"} {
		pkts = append(pkts, tcp(src, netip.MustParseAddr(dst), 40000, 22, filtertest.ACK))
	}
	dev := New(&fixedTUN{pkts: pkts}, Config{Peers: l})
	bufs := make([][]byte, len(pkts))
	for i := range bufs {
		bufs[i] = make([]byte, 1500)
	}
	sizes := make([]int, len(pkts))
	if n := testing.AllocsPerRun(100, func() { dev.Read(bufs, sizes, 0) }); n != 0 {
		t.Errorf("Read: %v allocs per batch, want 0", n)
	}
	if l.Lookup(k2).last.Load() == 0 {
		t.Error("a packet to a subnet route did not stamp its peer's activity")
	}
}

// TestEnsureAbort checks that a wait for a peer's configuration ends when
// its abort channel closes (the bind closing: wireguard-go's Close waits
// for receivers) or the table closes (the engine closing).
func TestEnsureAbort(t *testing.T) {
	// In a bubble, synctest.Wait says when Ensure is durably blocked, so
	// "not returned yet" is a fact rather than a guess after a sleep.
	synctest.Test(t, func(t *testing.T) {
		l := NewPeers() // no configurer runs: activation never completes
		k := netmap.NewNodePrivate().Public()
		l.Publish(map[netmap.NodePublic][]netip.Prefix{k: {netip.MustParsePrefix("100.64.0.2/32")}}, func(netmap.NodePublic) bool { return false })
		pa := l.Lookup(k)
		abort := make(chan struct{})
		done := make(chan bool, 1)
		go func() { done <- l.Ensure(pa, ActivateHandshake, abort) }()
		synctest.Wait()
		select {
		case <-done:
			t.Fatal("Ensure returned before the peer was configured or the bind closed")
		default:
		}
		close(abort)
		synctest.Wait()
		select {
		case ok := <-done:
			if ok {
				t.Fatal("Ensure reported a configured peer after an abort")
			}
		default:
			t.Fatal("Ensure still blocked after abort")
		}
		if got := <-l.Activations(); got != pa || pa.Reason() != ActivateHandshake {
			t.Fatalf("queued %v for %v, want the peer for its handshake", got.Key(), pa.Reason())
		}
		go func() { done <- l.Ensure(pa, ActivateOutbound, nil) }()
		synctest.Wait()
		select {
		case <-done:
			t.Fatal("Ensure returned before the peer was configured or the table closed")
		default:
		}
		l.Close()
		synctest.Wait()
		select {
		case <-done:
		default:
			t.Fatal("Ensure still blocked after the table closed")
		}
	})
}

// syn builds a TCP SYN (flags) from src to dst announcing mss, with a valid
// checksum.
func syn(src, dst netip.Addr, flags uint8, mss uint16) []byte {
	b := filtertest.Packet{Src: src, Dst: dst, Proto: netmap.ProtoTCP, SrcPort: 40000, DstPort: 22, TCPFlags: flags, Payload: 4}.Build()
	l4 := 20
	if src.Is6() {
		l4 = 40
	}
	// Insert the option after the 20-byte TCP header.
	b = slices.Insert(b, l4+20, 2, 4, byte(mss>>8), byte(mss))
	b[l4+12] = 6 << 4
	if src.Is6() {
		binary.BigEndian.PutUint16(b[4:], uint16(len(b)-40))
	} else {
		binary.BigEndian.PutUint16(b[2:], uint16(len(b)))
	}
	binary.BigEndian.PutUint16(b[l4+16:], ^tcpSum(b, l4))
	return b
}

// tcpSum is the one's-complement sum of b's TCP segment (from l4) and
// pseudo-header, with gVisor's checksum code: 0xffff when the checksum in
// the segment is right.
func tcpSum(b []byte, l4 int) uint16 {
	addrs := b[12:20]
	if b[0]>>4 == 6 {
		addrs = b[8:40]
	}
	var tail [4]byte
	tail[1] = netmap.ProtoTCP
	binary.BigEndian.PutUint16(tail[2:], uint16(len(b)-l4))
	return checksum.Checksum(b[l4:], checksum.Checksum(tail[:], checksum.Checksum(addrs, 0)))
}

// inspect returns the MSS b announces and whether its TCP checksum holds.
func inspect(t *testing.T, b []byte) (mss uint16, sumOK bool) {
	t.Helper()
	var p packet.Parsed
	if !p.Decode(b) {
		t.Fatalf("packet % x does not decode", b)
	}
	mss, _ = p.MSS(b)
	return mss, tcpSum(b[:p.Len()], headerLen(b)) == 0xffff
}

// headerLen is the IP header length of b, which has no IPv6 extension
// headers.
func headerLen(b []byte) int {
	if b[0]>>4 == 6 {
		return 40
	}
	return int(b[0]&0x0f) * 4
}

// TestMSSClampFromPathMTU checks the wiring from the magic bind's path MTU
// result to the data path: SYNs to and from a peer whose direct path
// carries only 1,420-byte packets get an MSS that fits (1,380 on IPv4,
// 1,360 on IPv6, checksums still right); other peers' SYNs, and every SYN
// once the path carries full-size packets again, are left alone.
func TestMSSClampFromPathMTU(t *testing.T) {
	host4, peer4 := netip.MustParseAddr("100.64.0.1"), netip.MustParseAddr("100.64.0.2")
	host6, peer6 := netip.MustParseAddr("fd7a:115c:a1e0::1"), netip.MustParseAddr("fd7a:115c:a1e0::2")
	l := NewPeers()
	far, near := netmap.NewNodePrivate().Public(), netmap.NewNodePrivate().Public()
	publish(l, map[netmap.NodePublic][]string{
		far:  {"100.64.0.2/32", "fd7a:115c:a1e0::2/128"},
		near: {"100.64.0.1/32", "fd7a:115c:a1e0::1/128"},
	})
	l.SetPathMTU(far, 1420, true)
	if l.clamping.Load() != 1 {
		t.Fatalf("clamping = %d after one lossy path, want 1", l.clamping.Load())
	}
	read := func(pkt []byte) []byte {
		t.Helper()
		w := New(&fixedTUN{pkts: [][]byte{pkt}}, Config{Peers: l})
		bufs, sizes := [][]byte{make([]byte, 9000)}, []int{0}
		if _, err := w.Read(bufs, sizes, 0); err != nil {
			t.Fatal(err)
		}
		return bufs[0][:sizes[0]]
	}
	write := func(pkt []byte) []byte {
		t.Helper()
		dev := &fixedTUN{}
		if _, err := New(dev, Config{Peers: l}).Write([][]byte{pkt}, 0); err != nil || len(dev.written) != 1 {
			t.Fatalf("Write: %v, %d packets written", err, len(dev.written))
		}
		return dev.written[0]
	}
	for _, v6 := range []bool{false, true} {
		host, peer, wantMSS := host4, peer4, uint16(1380)
		if v6 {
			host, peer, wantMSS = host6, peer6, 1360
		}
		// Outbound: our SYN to the far peer.
		if mss, ok := inspect(t, read(syn(host, peer, filtertest.SYN, 8880))); mss != wantMSS || !ok {
			t.Errorf("v6=%v outbound SYN to the lossy peer: MSS %d (want %d), checksum ok %v", v6, mss, wantMSS, ok)
		}
		// Inbound: a SYN-ACK from the near peer (path fine) is left alone;
		// from the far one (its source) it is clamped.
		if mss, _ := inspect(t, write(syn(host, peer, filtertest.SYN|filtertest.ACK, 8880))); mss != 8880 {
			t.Errorf("v6=%v SYN-ACK from a peer with a full-size path: MSS %d, want 8880 untouched", v6, mss)
		}
		l.SetPathMTU(near, 1420, true)
		if mss, ok := inspect(t, write(syn(host, peer, filtertest.SYN|filtertest.ACK, 8880))); mss != wantMSS || !ok {
			t.Errorf("v6=%v inbound SYN-ACK from a lossy peer: MSS %d (want %d), checksum ok %v", v6, mss, wantMSS, ok)
		}
		l.SetPathMTU(near, 8920, false)
	}
	// The path carries full-size packets again: nothing is clamped.
	l.SetPathMTU(far, 8920, false)
	if l.clamping.Load() != 0 {
		t.Fatalf("clamping = %d after every path recovered, want 0", l.clamping.Load())
	}
	if mss, _ := inspect(t, read(syn(host4, peer4, filtertest.SYN, 8880))); mss != 8880 {
		t.Errorf("SYN after the path recovered: MSS %d, want 8880", mss)
	}
}

// TestMSSClampAfterFilterDrops checks that the inbound layers stay in
// step when the filter drops packets from the middle of a batch: each SYN
// it keeps is clamped by its own decoded form, not by that of a packet
// dropped before it.
func TestMSSClampAfterFilterDrops(t *testing.T) {
	l := NewPeers()
	lossy := netmap.NewNodePrivate().Public()
	publish(l, map[netmap.NodePublic][]string{lossy: {netip.PrefixFrom(peerIP, 32).String()}})
	l.SetPathMTU(lossy, 1420, true)
	dev := &fixedTUN{}
	w := New(dev, Config{Filter: newTestFilter(t, allowTCP(22)), Peers: l})
	denied := tcp(peerIP, selfIP, 40001, 80, filtertest.SYN) // a SYN too, without an MSS option
	in := batch(denied, syn(peerIP, selfIP, filtertest.SYN, 8880), []byte{0x45, 0, 0, 20}, denied, syn(peerIP, selfIP, filtertest.SYN, 1200))
	if n, err := w.Write(in, wgOffset); err != nil || n != 2 {
		t.Fatalf("Write = %d, %v; want the 2 allowed SYNs", n, err)
	}
	if len(dev.written) != 2 {
		t.Fatalf("device got %d packets, want 2", len(dev.written))
	}
	for i, want := range []uint16{1380, 1200} {
		if mss, ok := inspect(t, dev.written[i]); mss != want || !ok {
			t.Errorf("SYN %d: MSS %d (want %d), checksum ok %v", i, mss, want, ok)
		}
	}
}

// udp is a UDP datagram of total bytes from src to dst.
func udp(src, dst string, total int) []byte {
	return filtertest.Packet{Src: netip.MustParseAddr(src), Dst: netip.MustParseAddr(dst), Proto: netmap.ProtoUDP,
		SrcPort: 40000, DstPort: 5001, Payload: total - 28}.Build()
}

// TestTooBigFromPathMTU checks the data path's side of path MTU
// blackholes: a packet to a peer whose direct path carries only 1,420
// bytes is dropped and answered with one ICMP error written to the TUN
// (rate limited per peer), smaller ones and other peers' pass untouched,
// and the steady state allocates nothing.
func TestTooBigFromPathMTU(t *testing.T) {
	l := NewPeers()
	far, near := netmap.NewNodePrivate().Public(), netmap.NewNodePrivate().Public()
	publish(l, map[netmap.NodePublic][]string{far: {"100.64.0.2/32"}, near: {"100.64.0.3/32"}})
	l.SetPathMTU(far, 1420, true)
	pkts := [][]byte{
		udp("100.64.0.1", "100.64.0.2", 3000),
		udp("100.64.0.1", "100.64.0.2", 1420),
		udp("100.64.0.1", "100.64.0.3", 3000),
		udp("100.64.0.1", "100.64.0.2", 3000),
	}
	dev := &fixedTUN{pkts: pkts}
	const offset = 16
	w := New(dev, Config{Peers: l})
	bufs := make([][]byte, len(pkts))
	for i := range bufs {
		bufs[i] = make([]byte, offset+9000)
	}
	sizes := make([]int, len(pkts))
	if _, err := w.Read(bufs, sizes, offset); err != nil {
		t.Fatal(err)
	}
	if want := []int{0, 1420, 3000, 0}; !slices.Equal(sizes, want) {
		t.Errorf("sizes after Read = %v, want %v (too big for the far peer's path dropped)", sizes, want)
	}
	if len(dev.written) != 1 {
		t.Fatalf("%d ICMP errors written, want 1 (one per peer per %v)", len(dev.written), tooBigInterval)
	}
	if e := dev.written[0]; !isFragNeeded(e, 1420) || !bytes.Equal(e[12:16], []byte{100, 64, 0, 2}) {
		t.Errorf("ICMP error % x, want fragmentation-needed from 100.64.0.2 with MTU 1420", e[:min(len(e), 28)])
	}
	// Past the interval the next one is answered too; none of it allocates.
	pa := l.Lookup(far)
	dev.count, dev.nWrites = true, 0
	if n := testing.AllocsPerRun(50, func() {
		pa.lastTooBig.Store(l.Now() - int64(2*tooBigInterval))
		w.Read(bufs, sizes, offset)
	}); n != 0 {
		t.Errorf("%v allocations per batch with ICMP errors, want 0", n)
	}
	if dev.nWrites < 50 {
		t.Errorf("%d ICMP errors in 51 batches past the interval, want one per batch", dev.nWrites)
	}
	// The path recovered: full-size packets go through.
	l.SetPathMTU(far, 8920, false)
	w.Read(bufs, sizes, offset)
	if sizes[0] != 3000 {
		t.Errorf("size %d after the path recovered, want 3000", sizes[0])
	}
}

// isFragNeeded reports whether e is an ICMPv4 fragmentation-needed error
// announcing mtu.
func isFragNeeded(e []byte, mtu uint16) bool {
	return len(e) >= 28 && e[9] == packet.ProtoICMPv4 && e[20] == 3 && e[21] == 4 && binary.BigEndian.Uint16(e[26:]) == mtu
}
