package agent

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"meshd.dev/meshd/agent/magicbind"
	"meshd.dev/meshd/internal/clock"
	"meshd.dev/meshd/internal/clock/clocktest"
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
	return newLazyNodeOn(t, key, disco, addr, idle, nil)
}

// newLazyNodeOn is newLazyNode with its idle times on clk.
func newLazyNodeOn(t *testing.T, key netmap.NodePrivate, disco netmap.DiscoPrivate, addr string, idle time.Duration, clk clock.Clock) *lazyNode {
	t.Helper()
	e, err := newEngine(engineConfig{
		tunName: TUNUserspace, mtu: 1280, port: 0, nodeKey: key, addrs: pfx(addr + "/32"),
		bind:       magicbind.Options{DiscoKey: disco, Logger: slog.New(slog.DiscardHandler)},
		log:        slog.New(slog.DiscardHandler),
		localAddrs: func() ([]netip.Prefix, error) { return pfx("127.0.0.1/8"), nil },
		peerIdle:   idle,
		clock:      clk,
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

// serveUDPEchoOn answers every datagram to n's tailnet port with itself.
func serveUDPEchoOn(t *testing.T, n *lazyNode, port uint16) {
	t.Helper()
	pc, err := n.e.tnet.ListenUDPAddrPort(netip.AddrPortFrom(netip.MustParseAddr(n.addr), port))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(buf[:n], from)
		}
	}()
}

// echoUDP sends one datagram from from to to's port and waits up to d for
// it to come back. It is never resent: a reply proves the first packet
// through lazily configured peers was not lost, and once it is in, no
// more data moves (unlike TCP's teardown, which goes on after echo).
func echoUDP(from, to *lazyNode, port uint16, d time.Duration) error {
	c, err := from.e.tnet.DialUDPAddrPort(netip.AddrPort{}, netip.AddrPortFrom(netip.MustParseAddr(to.addr), port))
	if err != nil {
		return fmt.Errorf("dial udp %s:%d: %w", to.addr, port, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(d))
	msg := []byte("lazy peers")
	if _, err := c.Write(msg); err != nil {
		return err
	}
	got := make([]byte, 64)
	n, err := c.Read(got)
	if err != nil {
		return fmt.Errorf("udp echo: %w", err)
	}
	if string(got[:n]) != string(msg) {
		return fmt.Errorf("udp echo: got %q", got[:n])
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
	// Idleness is on a test clock, so the trim is checked on both sides of
	// the production timeout instead of waited for; the packets and
	// handshakes are real, over loopback UDP.
	const idle = DefaultPeerIdleTimeout
	clk := clocktest.New(time.Now())
	ka, kb := netmap.NewNodePrivate(), netmap.NewNodePrivate()
	da, db := netmap.NewDiscoPrivate(), netmap.NewDiscoPrivate()
	a := newLazyNodeOn(t, ka, da, "100.64.0.1", idle, clk)
	b := newLazyNodeOn(t, kb, db, "100.64.0.2", idle, clk)
	pair(t, a, b)
	serveUDPEchoOn(t, a, 7000)
	serveUDPEchoOn(t, b, 7000)

	// The map alone configures nothing.
	if a.e.configuredPeers() != 0 || b.e.configuredPeers() != 0 {
		t.Fatalf("peers configured before any traffic: a %d, b %d", a.e.configuredPeers(), b.e.configuredPeers())
	}
	st, err := a.e.stats()
	if err != nil || len(st.Peers) != 0 {
		t.Fatalf("WireGuard device has peers before any traffic: %+v %v", st, err)
	}

	// a's first packet configures b at a (outbound) and a at b (inbound
	// handshake), and is not lost: its one datagram comes back.
	if err := echoUDP(a, b, 7000, 5*time.Second); err != nil {
		t.Fatalf("first packet through lazily configured peers: %v", err)
	}
	waitConfigured(t, a, 1, 5*time.Second)
	waitConfigured(t, b, 1, 5*time.Second)

	// Idle: both sides remove the peer at idle, not before (keepalives
	// do not count). Just before, the ticks that fell due and a trim of
	// our own keep it.
	if err := clk.AwaitStarted(t.Context(), 2); err != nil {
		t.Fatalf("the trim tickers never started: %v", err)
	}
	clk.Advance(idle - time.Nanosecond)
	for _, n := range []*lazyNode{a, b} {
		n.e.trim()
		if got := n.e.configuredPeers(); got != 1 {
			t.Fatalf("%s: %d peers configured %v after the last packet, want 1 until %v", n.addr, got, idle-time.Nanosecond, idle)
		}
	}
	// At idle the trim ticker (every 30 s at this timeout) removes it.
	clk.Advance(time.Nanosecond)
	waitConfigured(t, a, 0, 5*time.Second)
	waitConfigured(t, b, 0, 5*time.Second)
	if st, _ := a.e.stats(); len(st.Peers) != 0 {
		t.Fatalf("idle peer still in the WireGuard device: %+v", st.Peers)
	}

	// The other direction after the trim.
	if err := echoUDP(b, a, 7000, 5*time.Second); err != nil {
		t.Fatalf("first packet after the idle trim: %v", err)
	}
	waitConfigured(t, a, 1, 5*time.Second)
	waitConfigured(t, b, 1, 5*time.Second)
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
