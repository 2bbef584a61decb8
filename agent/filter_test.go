package agent

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/tun"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/filter"
	"meshd.dev/meshd/filter/filtertest"
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

// sshOnly allows TCP 22 on self from peerIP, as the seed policy gives an
// engineer on a training node.
func sshOnly(origin string) []netmap.FilterRule {
	return []netmap.FilterRule{{
		SrcIPs:   []netip.Prefix{netip.PrefixFrom(peerIP, 32)},
		DstPorts: []netmap.NetPortRange{{Net: netip.PrefixFrom(selfIP, 32), Ports: netmap.PortRange{First: 22, Last: 22}}},
		IPProto:  []uint8{netmap.ProtoTCP},
		Origin:   origin,
	}}
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

// TestFilterTUNWrite checks the inbound direction: a batch written by
// WireGuard reaches the device with exactly the accepted packets, in order,
// and every drop is counted by reason.
func TestFilterTUNWrite(t *testing.T) {
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
			f := newTestFilter(t, sshOnly("grants[0]"))
			w := newFilterTUN(dev, f)
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

// TestFilterTUNRead checks the outbound direction: what the kernel sends is
// read with malformed packets' sizes zeroed (wireguard-go skips them), and
// a connection this node opens lets the peer's replies in through Write,
// though no rule allows the peer to open one.
func TestFilterTUNRead(t *testing.T) {
	dev, kfd := newPipeTUN(t)
	f := newTestFilter(t, sshOnly(""))
	w := newFilterTUN(dev, f)
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

// TestFilterTUNAllocs asserts that the wrapper allocates nothing per batch
// in either direction, drops included.
func TestFilterTUNAllocs(t *testing.T) {
	dev, kfd := newPipeTUN(t)
	f := newTestFilter(t, sshOnly("grants[0]"))
	w := newFilterTUN(dev, f)
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
}

// BenchmarkFilterTUNWrite writes a 64-packet inbound batch to a
// pipe-backed TUN directly ("bare") and through the filter wrapper with
// 1,000 compiled rules ("filtered"): the difference is the filter's cost,
// small next to one write syscall per packet. "dropped" is a batch from an
// address no rule names: no packet reaches the device, so it measures the
// wrapper and the filter's drop path (counters, recent-drops ring) alone.
func BenchmarkFilterTUNWrite(b *testing.B) {
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
				dev = newFilterTUN(pdev, f)
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

// filterEngine starts a netstack + WireGuard data plane whose TUN carries
// the packet filter pf, as the agent builds it.
func filterEngine(t *testing.T, key netmap.NodePrivate, addr string, pf *packetFilter) *engine {
	t.Helper()
	e, err := newEngine(engineConfig{
		tunName: TUNUserspace, mtu: 1280, port: 0, nodeKey: key, filter: pf.f,
		addrs: pfx(addr + "/32"), newBind: conn.NewStdNetBind, log: slog.New(slog.DiscardHandler),
		localAddrs: func() ([]netip.Prefix, error) { return pfx("127.0.0.1/8"), nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.close)
	return e
}

// TestEngineFilter runs real TCP over real WireGuard between two netstack
// data planes with the filter installed: B's map allows A only on port 22.
// A connects to 22 and gets B's reply (A's own map allows B nothing: the
// reply comes in as part of A's flow); a connection to 8080 fails, shows up
// in B's drop counters and recent drops, and works on the next attempt once
// a new map allows it. A map whose rules do not compile keeps the previous
// rules in force.
func TestEngineFilter(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	ka, kb := netmap.NewNodePrivate(), netmap.NewNodePrivate()
	pfA, pfB := newPacketFilter(log), newPacketFilter(log)
	a := filterEngine(t, ka, peerIP.String(), pfA)
	b := filterEngine(t, kb, selfIP.String(), pfB)
	na := netmap.Node{ID: 1, NodeKey: ka.Public(), Addresses: pfx(peerIP.String() + "/32"), AllowedIPs: pfx(peerIP.String() + "/32"),
		Endpoints: []netip.AddrPort{netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), a.port)}}
	nb := netmap.Node{ID: 2, NodeKey: kb.Public(), Addresses: pfx(selfIP.String() + "/32"), AllowedIPs: pfx(selfIP.String() + "/32"),
		Endpoints: []netip.AddrPort{netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), b.port)}}
	mapA := &netmap.NetworkMap{Self: na, Peers: map[netmap.NodeID]*netmap.Node{2: &nb}, PacketFilter: []netmap.FilterRule{}}
	mapB := &netmap.NetworkMap{Self: nb, Peers: map[netmap.NodeID]*netmap.Node{1: &na}, PacketFilter: sshOnly("policy.hujson:12:5")}
	for _, x := range []struct {
		pf *packetFilter
		e  *engine
		nm *netmap.NetworkMap
	}{{pfA, a, mapA}, {pfB, b, mapB}} {
		x.pf.update(x.nm)
		if err := x.e.applyMap(x.nm); err != nil {
			t.Fatal(err)
		}
	}
	serve := func(port uint16) {
		ln, err := b.listen(netip.AddrPortFrom(selfIP, port))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Write([]byte("hello from b"))
				c.Close()
			}
		}()
	}
	serve(22)
	serve(8080)
	dial := func(port uint16, timeout time.Duration) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		c, err := a.dial(ctx, netip.AddrPortFrom(selfIP, port))
		if err != nil {
			return "", err
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(timeout))
		got, err := io.ReadAll(c)
		return string(got), err
	}
	if got, err := dial(22, 10*time.Second); err != nil || got != "hello from b" {
		t.Fatalf("allowed port 22: %q, %v", got, err)
	}
	if _, err := dial(8080, 1500*time.Millisecond); err == nil {
		t.Fatal("port 8080 connected; B's rules allow only 22")
	}
	if d := pfB.f.Dropped(filter.In, filter.DropNoRule); d == 0 {
		t.Fatal("B counted no no_rule drop for the SYN to 8080")
	}
	if st := pfB.status(); st.DropsIn["no_rule"] == 0 || st.Rules != 1 || st.Error != "" {
		t.Fatalf("B's filter status: %+v", st)
	}
	if d := pfA.f.Dropped(filter.In, filter.DropNoRule); d != 0 {
		t.Fatalf("A dropped %d replies of its own flows", d)
	}
	recent := pfB.f.RecentDrops()
	if len(recent) == 0 {
		t.Fatal("no recent drops on B")
	}
	last := recent[len(recent)-1]
	if last.Dir != "in" || last.Reason != "no_rule" || last.Proto != netmap.ProtoTCP || last.Src != peerIP || last.Dst != selfIP || last.DstPort != 8080 {
		t.Fatalf("last drop on B: %+v", last)
	}

	// A map with rules that do not compile: logged, previous rules stay.
	before := pfB.f.Rules()
	bad := *mapB
	bad.PacketFilter = []netmap.FilterRule{{SrcIPs: []netip.Prefix{{}}, DstPorts: []netmap.NetPortRange{{Net: netip.PrefixFrom(selfIP, 32), Ports: netmap.AllPorts}}}}
	pfB.update(&bad)
	if pfB.f.Rules() != before || pfB.err == nil || pfB.status().Error == "" {
		t.Fatalf("bad rules: rules swapped=%v err=%v", pfB.f.Rules() != before, pfB.err)
	}
	if _, err := dial(8080, 1500*time.Millisecond); err == nil {
		t.Fatal("port 8080 connected after a rejected map")
	}

	// The new policy opens 8080: the very next attempt connects.
	open := *mapB
	open.PacketFilter = append(sshOnly("policy.hujson:12:5"), netmap.FilterRule{
		SrcIPs:   []netip.Prefix{netip.PrefixFrom(peerIP, 32)},
		DstPorts: []netmap.NetPortRange{{Net: netip.PrefixFrom(selfIP, 32), Ports: netmap.PortRange{First: 8080, Last: 8080}}},
		Origin:   "policy.hujson:20:5",
	})
	pfB.update(&open)
	if pfB.err != nil || pfB.f.Rules().Len() != 2 {
		t.Fatalf("new rules not in force: %v", pfB.err)
	}
	if got, err := dial(8080, 10*time.Second); err != nil || got != "hello from b" {
		t.Fatalf("8080 after the policy change: %q, %v", got, err)
	}
}

// TestAgentFilterFromSavedMap checks that the agent feeds the filter from
// the coordinator's map (the bootstrap policy's single allow-all rule), shows
// it in status, and that a restarted agent enforces the saved map's rules
// before it hears from the coordinator (which is gone).
func TestAgentFilterFromSavedMap(t *testing.T) {
	m := newFakeMesh(t)
	dir := filepath.Join(t.TempDir(), "node")
	start := func() (*Agent, func()) {
		a, err := New(m.options(dir))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- a.Run(ctx) }()
		return a, func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Run: %v", err)
			}
			a.Close()
		}
	}
	a, stop := start()
	if st, err := a.Status(context.Background()); err != nil || st.Filter != nil {
		t.Fatalf("status before registration: filter %+v, %v", st.Filter, err)
	}
	if _, err := a.Up(context.Background(), localapi.UpRequest{AuthKey: m.key, Coordinator: m.url, Hostname: "n1"}); err != nil {
		t.Fatal(err)
	}
	st := waitStatus(t, a, "filter rules from the map", func(st *localapi.Status) bool {
		return st.Filter != nil && st.Filter.Rules == 1
	})
	if _, ok := st.Filter.DropsIn["no_rule"]; !ok || st.Filter.Error != "" || !st.Filter.Bootstrap {
		t.Fatalf("filter status: %+v", st.Filter)
	}
	stop()
	m.fake.SetDown(true)

	a, stop = start()
	defer stop()
	// Run brings the data plane up from the saved map at once.
	waitStatus(t, a, "saved rules in force with the coordinator down", func(st *localapi.Status) bool {
		return st.BackendState == localapi.StateRunning && st.Filter != nil && st.Filter.Rules == 1
	})
	d, err := a.Drops(context.Background())
	if err != nil || d.Drops == nil {
		t.Fatalf("Drops: %+v, %v", d, err)
	}
}
