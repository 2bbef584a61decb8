package agent

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/tun"

	"meshd.dev/meshd/agent/magicbind"
	"meshd.dev/meshd/netmap"
)

// lazyNode is a userspace data plane with the magic bind and lazy peers.
type lazyNode struct {
	key   netmap.NodePrivate
	disco netmap.DiscoPrivate
	addr  string
	e     *engine
}

func newLazyNode(t *testing.T, key netmap.NodePrivate, disco netmap.DiscoPrivate, addr string, idle time.Duration) *lazyNode {
	t.Helper()
	e, err := newEngine(engineConfig{
		tunName: TUNUserspace, mtu: 1280, port: 0, nodeKey: key, addrs: pfx(addr + "/32"),
		newBind: func() conn.Bind {
			return magicbind.New(magicbind.Options{NodeKey: key, DiscoKey: disco, Logger: slog.New(slog.DiscardHandler)})
		},
		log:        slog.New(slog.DiscardHandler),
		localAddrs: func() ([]netip.Prefix, error) { return pfx("127.0.0.1/8"), nil },
		peerIdle:   idle,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.close)
	if e.lazy == nil {
		t.Fatal("engine with the magic bind and peerIdle > 0 did not enable lazy peers")
	}
	return &lazyNode{key: key, disco: disco, addr: addr, e: e}
}

func (n *lazyNode) node(id netmap.NodeID) netmap.Node {
	return netmap.Node{ID: id, NodeKey: n.key.Public(), DiscoKey: n.disco.Public(), Online: true,
		Addresses: pfx(n.addr + "/32"), AllowedIPs: pfx(n.addr + "/32"),
		Endpoints: []netip.AddrPort{netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), n.e.port)}}
}

// pair gives a and b each other as their only peer.
func pair(t *testing.T, a, b *lazyNode) {
	t.Helper()
	na, nb := a.node(1), b.node(2)
	if err := a.e.applyMap(&netmap.NetworkMap{Self: na, Peers: map[netmap.NodeID]*netmap.Node{2: &nb}}); err != nil {
		t.Fatal(err)
	}
	if err := b.e.applyMap(&netmap.NetworkMap{Self: nb, Peers: map[netmap.NodeID]*netmap.Node{1: &na}}); err != nil {
		t.Fatal(err)
	}
}

// serveEchoOn answers every connection on n's tailnet port with an echo.
func serveEchoOn(t *testing.T, n *lazyNode, port uint16) {
	t.Helper()
	ln, err := n.e.listen(netip.AddrPortFrom(netip.MustParseAddr(n.addr), port))
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
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
}

// echo dials to's port from from and checks one round trip, within d.
func echo(from, to *lazyNode, port uint16, d time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	c, err := from.e.dial(ctx, netip.AddrPortFrom(netip.MustParseAddr(to.addr), port))
	if err != nil {
		return fmt.Errorf("dial %s:%d: %w", to.addr, port, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(d))
	msg := []byte("lazy peers")
	if _, err := c.Write(msg); err != nil {
		return err
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		return fmt.Errorf("echo: %w", err)
	}
	return nil
}

func waitConfigured(t *testing.T, n *lazyNode, want int, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for n.e.configuredPeers() != want {
		if time.Now().After(deadline) {
			t.Fatalf("%s: %d peers configured in WireGuard after %v, want %d", n.addr, n.e.configuredPeers(), within, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestLazyPeers checks the life cycle: a peer enters WireGuard on its first
// packet, in either direction, leaves after the idle timeout, and comes back
// on the next packet; a restarted peer whose old session the other side
// still uses recovers at once instead of after WireGuard's 15 s timeout.
func TestLazyPeers(t *testing.T) {
	const idle = 1500 * time.Millisecond
	ka, kb := netmap.NewNodePrivate(), netmap.NewNodePrivate()
	da, db := netmap.NewDiscoPrivate(), netmap.NewDiscoPrivate()
	a := newLazyNode(t, ka, da, "100.64.0.1", idle)
	b := newLazyNode(t, kb, db, "100.64.0.2", idle)
	pair(t, a, b)
	serveEchoOn(t, a, 7000)
	serveEchoOn(t, b, 7000)

	// The map alone configures nothing.
	if a.e.configuredPeers() != 0 || b.e.configuredPeers() != 0 {
		t.Fatalf("peers configured before any traffic: a %d, b %d", a.e.configuredPeers(), b.e.configuredPeers())
	}
	st, err := a.e.stats()
	if err != nil || len(st.Peers) != 0 {
		t.Fatalf("WireGuard device has peers before any traffic: %+v %v", st, err)
	}

	// a's first packet configures b at a (outbound) and a at b (inbound
	// handshake); the first SYN is not lost, so this takes well under
	// TCP's 1 s retransmission.
	start := time.Now()
	if err := echo(a, b, 7000, 5*time.Second); err != nil {
		t.Fatalf("first connection: %v", err)
	}
	if d := time.Since(start); d > 900*time.Millisecond {
		t.Errorf("first connection through lazily configured peers took %v: the first packet was lost", d)
	}
	waitConfigured(t, a, 1, time.Second)
	waitConfigured(t, b, 1, time.Second)

	// Idle: both sides remove the peer (keepalives do not count).
	waitConfigured(t, a, 0, idle+5*time.Second)
	waitConfigured(t, b, 0, idle+5*time.Second)
	if st, _ := a.e.stats(); len(st.Peers) != 0 {
		t.Fatalf("idle peer still in the WireGuard device: %+v", st.Peers)
	}

	// The other direction after the trim.
	if err := echo(b, a, 7000, 5*time.Second); err != nil {
		t.Fatalf("connection after the idle trim: %v", err)
	}
	waitConfigured(t, a, 1, time.Second)

}

// TestLazyPeersRestartedPeer checks that a restarted peer whose old
// session the other side still uses recovers at once: the data it cannot
// decrypt makes it configure the sender and start a handshake, instead of
// both waiting out WireGuard's 15 s timeout.
func TestLazyPeersRestartedPeer(t *testing.T) {
	ka, kb := netmap.NewNodePrivate(), netmap.NewNodePrivate()
	da, db := netmap.NewDiscoPrivate(), netmap.NewDiscoPrivate()
	a := newLazyNode(t, ka, da, "100.64.0.1", time.Hour)
	b := newLazyNode(t, kb, db, "100.64.0.2", time.Hour)
	pair(t, a, b)
	serveEchoOn(t, b, 7000)
	if err := echo(a, b, 7000, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	// b restarts with the same key on a new port; a keeps its session.
	b.e.close()
	b2 := newLazyNode(t, kb, db, "100.64.0.2", time.Hour)
	pair(t, a, b2)
	serveEchoOn(t, b2, 7000)
	if err := echo(a, b2, 7000, 5*time.Second); err != nil {
		t.Fatalf("connection to the restarted peer over a stale session: %v (WireGuard's own recovery takes 15 s)", err)
	}
}

// TestLazyPeersRemovedFromMap checks that a peer leaving the map leaves the
// device, and that a packet to it is dropped rather than waiting forever.
func TestLazyPeersRemovedFromMap(t *testing.T) {
	ka, kb := netmap.NewNodePrivate(), netmap.NewNodePrivate()
	a := newLazyNode(t, ka, netmap.NewDiscoPrivate(), "100.64.0.1", time.Hour)
	b := newLazyNode(t, kb, netmap.NewDiscoPrivate(), "100.64.0.2", time.Hour)
	pair(t, a, b)
	serveEchoOn(t, b, 7000)
	if err := echo(a, b, 7000, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	waitConfigured(t, a, 1, time.Second)
	na := a.node(1)
	if err := a.e.applyMap(&netmap.NetworkMap{Self: na, Peers: map[netmap.NodeID]*netmap.Node{}}); err != nil {
		t.Fatal(err)
	}
	if n := a.e.configuredPeers(); n != 0 {
		t.Fatalf("%d peers configured after the peer left the map", n)
	}
	if err := echo(a, b, 7000, time.Second); err == nil {
		t.Fatal("connection to a peer no longer in the map succeeded")
	}
}

// fixedTUN returns the same batch on every Read.
type fixedTUN struct {
	tun.Device
	pkts [][]byte
}

func (f *fixedTUN) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	for i, p := range f.pkts {
		sizes[i] = copy(bufs[i][offset:], p)
	}
	return len(f.pkts), nil
}

// TestLazyDataPathAllocs checks that the per-packet work (the destination
// lookup, the activity stamp; the receive side's attribution) allocates
// nothing once peers are configured.
func TestLazyDataPathAllocs(t *testing.T) {
	l := newLazyPeers()
	k1, k2 := netmap.NewNodePrivate().Public(), netmap.NewNodePrivate().Public()
	want := map[netmap.NodePublic]wgPeer{
		k1: {Key: k1, AllowedIPs: pfx("100.64.0.2/32")},
		k2: {Key: k2, AllowedIPs: pfx("100.64.0.3/32", "10.1.0.0/16")},
	}
	l.publish(want, want)
	src := netip.MustParseAddr("100.64.0.1")
	var pkts [][]byte
	for _, dst := range []string{"100.64.0.2", "100.64.0.2", "10.1.2.3", "100.64.0.3", "100.64.0.99"} {
		pkts = append(pkts, tcp(src, netip.MustParseAddr(dst), 40000, 22, 0x10))
	}
	dev := &lazyTUN{Device: &fixedTUN{pkts: pkts}, l: l}
	bufs := make([][]byte, len(pkts))
	for i := range bufs {
		bufs[i] = make([]byte, 1500)
	}
	sizes := make([]int, len(pkts))
	if n := testing.AllocsPerRun(100, func() { dev.Read(bufs, sizes, 0) }); n != 0 {
		t.Errorf("lazyTUN.Read: %v allocs per batch, want 0", n)
	}
	pa := (*l.byKey.Load())[k2]
	if pa.last.Load() == 0 {
		t.Error("a packet to a subnet route did not stamp its peer's activity")
	}
}

// TestLazyBindAbort checks that a receive blocked on a peer's configuration
// returns when the bind closes: wireguard-go's Close waits for receivers.
func TestLazyBindAbort(t *testing.T) {
	l := newLazyPeers() // no configurer runs: activation never completes
	k := netmap.NewNodePrivate().Public()
	l.publish(map[netmap.NodePublic]wgPeer{k: {Key: k, AllowedIPs: pfx("100.64.0.2/32")}}, nil)
	pa := (*l.byKey.Load())[k]
	abort := make(chan struct{})
	done := make(chan bool, 1)
	go func() { done <- l.ensure(pa, activateHandshake, abort) }()
	select {
	case <-done:
		t.Fatal("ensure returned before the peer was configured or the bind closed")
	case <-time.After(50 * time.Millisecond):
	}
	close(abort)
	select {
	case ok := <-done:
		if ok {
			t.Fatal("ensure reported a configured peer after an abort")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ensure still blocked after abort")
	}
	// The engine's closing signal releases TUN readers the same way.
	go func() { done <- l.ensure(pa, activateOutbound, nil) }()
	close(l.closing)
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("ensure still blocked after the engine closed")
	}
}

// recordTUN keeps what is written to it.
type recordTUN struct {
	fixedTUN
	written [][]byte
}

func (r *recordTUN) Write(bufs [][]byte, offset int) (int, error) {
	for _, b := range bufs {
		r.written = append(r.written, bytes.Clone(b[offset:]))
	}
	return len(bufs), nil
}

// TestMSSClampFromPathMTU checks the wiring from the magic bind's path MTU
// result to the data path: SYNs to and from a peer whose direct path
// carries only 1,420-byte packets get an MSS that fits (1,380 on IPv4,
// 1,360 on IPv6, checksums still right); other peers' SYNs, and every SYN
// once the path carries full-size packets again, are left alone.
func TestMSSClampFromPathMTU(t *testing.T) {
	const syn, synAck = 0x02, 0x12
	l := newLazyPeers()
	// synPacket goes from 100.64.0.1 / fd7a:115c:a1e0::1 to .2 / ::2.
	far, near := netmap.NewNodePrivate().Public(), netmap.NewNodePrivate().Public()
	want := map[netmap.NodePublic]wgPeer{
		far:  {Key: far, AllowedIPs: pfx("100.64.0.2/32", "fd7a:115c:a1e0::2/128")},
		near: {Key: near, AllowedIPs: pfx("100.64.0.1/32", "fd7a:115c:a1e0::1/128")},
	}
	l.publish(want, want)
	l.setPathMTU(far, 1420, true)
	if l.clamping.Load() != 1 {
		t.Fatalf("clamping = %d after one lossy path, want 1", l.clamping.Load())
	}

	for _, v6 := range []bool{false, true} {
		wantMSS := uint16(1380)
		if v6 {
			wantMSS = 1360
		}
		// Outbound: our SYN to the far peer.
		out := &lazyTUN{Device: &fixedTUN{pkts: [][]byte{synPacket(v6, false, syn, mssOption(8880))}}, l: l}
		bufs := [][]byte{make([]byte, 9000)}
		sizes := []int{0}
		if _, err := out.Read(bufs, sizes, 0); err != nil {
			t.Fatal(err)
		}
		pkt := bufs[0][:sizes[0]]
		if got := mssOf(pkt); got != wantMSS || !checksumOK(pkt) {
			t.Errorf("v6=%v outbound SYN to the lossy peer: MSS %d (want %d), checksum ok %v", v6, got, wantMSS, checksumOK(pkt))
		}
		// Inbound: a SYN-ACK from the near peer (path fine) is left alone;
		// from the far one (its source) it is clamped.
		rec := &recordTUN{}
		in := &lazyTUN{Device: rec, l: l}
		fromNear := synPacket(v6, false, synAck, mssOption(8880)) // source .1: near
		if _, err := in.Write([][]byte{fromNear}, 0); err != nil {
			t.Fatal(err)
		}
		if got := mssOf(rec.written[0]); got != 8880 {
			t.Errorf("v6=%v SYN-ACK from a peer with a full-size path: MSS %d, want 8880 untouched", v6, got)
		}
		l.setPathMTU(near, 1420, true)
		rec.written = nil
		if _, err := in.Write([][]byte{synPacket(v6, false, synAck, mssOption(8880))}, 0); err != nil {
			t.Fatal(err)
		}
		if got := mssOf(rec.written[0]); got != wantMSS || !checksumOK(rec.written[0]) {
			t.Errorf("v6=%v inbound SYN-ACK from a lossy peer: MSS %d (want %d), checksum ok %v", v6, got, wantMSS, checksumOK(rec.written[0]))
		}
		l.setPathMTU(near, 8920, false)
	}

	// The path carries full-size packets again: nothing is clamped.
	l.setPathMTU(far, 8920, false)
	if l.clamping.Load() != 0 {
		t.Fatalf("clamping = %d after every path recovered, want 0", l.clamping.Load())
	}
	out := &lazyTUN{Device: &fixedTUN{pkts: [][]byte{synPacket(false, false, syn, mssOption(8880))}}, l: l}
	bufs, sizes := [][]byte{make([]byte, 9000)}, []int{0}
	out.Read(bufs, sizes, 0)
	if got := mssOf(bufs[0][:sizes[0]]); got != 8880 {
		t.Errorf("SYN after the path recovered: MSS %d, want 8880", got)
	}
}

// TestPacketTooBigFromPathMTU checks the data path's side of path MTU
// blackholes: a packet to a peer whose direct path carries only 1,420
// bytes is dropped and answered with one ICMP error on the raw TUN (rate
// limited per peer), smaller ones and other peers' pass untouched, and
// the steady state allocates nothing.
func TestPacketTooBigFromPathMTU(t *testing.T) {
	l := newLazyPeers()
	far, near := netmap.NewNodePrivate().Public(), netmap.NewNodePrivate().Public()
	want := map[netmap.NodePublic]wgPeer{
		far:  {Key: far, AllowedIPs: pfx("100.64.0.2/32")},
		near: {Key: near, AllowedIPs: pfx("100.64.0.3/32")},
	}
	l.publish(want, want)
	l.setPathMTU(far, 1420, true)
	udp := []byte{0x9c, 0x40, 0x13, 0x89, 0, 0, 0, 0}
	pkts := [][]byte{
		ipPacket("100.64.0.1", "100.64.0.2", 17, 3000, udp),
		ipPacket("100.64.0.1", "100.64.0.2", 17, 1420, udp),
		ipPacket("100.64.0.1", "100.64.0.3", 17, 3000, udp),
		ipPacket("100.64.0.1", "100.64.0.2", 17, 3000, udp),
	}
	raw := &recordTUN{}
	const offset = 16
	dev := &lazyTUN{Device: &fixedTUN{pkts: pkts}, l: l, raw: raw, log: slog.New(slog.DiscardHandler)}
	bufs := make([][]byte, len(pkts))
	for i := range bufs {
		bufs[i] = make([]byte, offset+9000)
	}
	sizes := make([]int, len(pkts))
	if _, err := dev.Read(bufs, sizes, offset); err != nil {
		t.Fatal(err)
	}
	if want := []int{0, 1420, 3000, 0}; !slices.Equal(sizes, want) {
		t.Errorf("sizes after Read = %v, want %v (too big for the far peer's path dropped)", sizes, want)
	}
	if len(raw.written) != 1 {
		t.Fatalf("%d ICMP errors written, want 1 (one per peer per %v)", len(raw.written), ptbInterval)
	}
	e := raw.written[0]
	if len(e) < 28 || e[9] != 1 || e[20] != 3 || e[21] != 4 || binary.BigEndian.Uint16(e[26:]) != 1420 || !bytes.Equal(e[12:16], []byte{100, 64, 0, 2}) {
		t.Errorf("ICMP error % x, want fragmentation-needed from 100.64.0.2 with MTU 1420", e[:min(len(e), 28)])
	}
	// Past the interval the next one is answered too; none of it allocates.
	pa := (*l.byKey.Load())[far]
	counter := &countTUN{}
	dev.raw = counter
	if n := testing.AllocsPerRun(50, func() {
		pa.lastPTB.Store(l.now() - int64(2*ptbInterval))
		dev.Read(bufs, sizes, offset)
	}); n != 0 {
		t.Errorf("%v allocations per batch with ICMP errors, want 0", n)
	}
	if counter.n < 50 {
		t.Errorf("%d ICMP errors in 51 batches past the interval, want one per batch", counter.n)
	}
	// The path recovered: full-size packets go through.
	l.setPathMTU(far, 8920, false)
	dev.Read(bufs, sizes, offset)
	if sizes[0] != 3000 {
		t.Errorf("size %d after the path recovered, want 3000", sizes[0])
	}
}

// countTUN counts the packets written to it.
type countTUN struct {
	fixedTUN
	n int
}

func (c *countTUN) Write(bufs [][]byte, offset int) (int, error) {
	c.n += len(bufs)
	return len(bufs), nil
}
