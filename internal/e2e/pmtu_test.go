package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/control"
	"meshd.dev/meshd/internal/netlab"
)

// pmtuLab is two hosts on jumbo-frame (9000) links, each behind its own
// router, the routers joined by a link of midMTU, and a coordinator (in this
// process, its socket in the first router's namespace) without relays: the
// only path between the nodes is direct.
//
//	a --9000-- r1 --midMTU-- r2 --9000-- b
type pmtuLab struct {
	e     *env
	hosts [2]*netlab.Host
	nodes [2]*node
	ips   [2]netip.Addr // tailnet IPv4 of each node
}

func newPMTULab(t *testing.T, midMTU int, dropFragNeeded bool) *pmtuLab {
	lab := netlab.New(t)
	e := &env{t: t, bin: buildMeshd(t), dir: t.TempDir()}
	a, r1, r2, b := lab.NewHost("a"), lab.NewHost("r1"), lab.NewHost("r2"), lab.NewHost("b")
	netA, netB, netMid := netip.MustParsePrefix("198.18.1.0/24"), netip.MustParsePrefix("198.18.2.0/24"), netip.MustParsePrefix("198.18.3.0/24")
	_, r1A := lab.Link(a, r1, netA, 9000)
	r1M, r2M := lab.Link(r1, r2, netMid, midMTU)
	r2B, _ := lab.Link(r2, b, netB, 9000)
	a.AddRoute(netip.Prefix{}, r1A)
	b.AddRoute(netip.Prefix{}, r2B)
	r1.AddRoute(netB, r2M)
	r2.AddRoute(netA, r1M)
	for _, r := range []*netlab.Host{r1, r2} {
		r.EnableForwarding()
		if dropFragNeeded {
			// The cloud router's habit: it cannot forward the full-size
			// packet and does not say so.
			r.MustRun("iptables", "-A", "OUTPUT", "-p", "icmp", "--icmp-type", "fragmentation-needed", "-j", "DROP")
		}
	}
	key := startPMTUCoordinator(t, e, r1, r1A)
	pl := &pmtuLab{e: e, hosts: [2]*netlab.Host{a, b}}
	for i, name := range []string{"a", "b"} {
		// No --mtu: the overlay MTU comes from the 9000 underlay (8920).
		pl.nodes[i] = e.newNode(name, pl.hosts[i], "--tun", "meshd0")
		e.startDaemon(pl.nodes[i])
		e.up(pl.nodes[i], key)
	}
	e.waitPeers(pl.nodes[0], "b")
	e.waitPeers(pl.nodes[1], "a")
	for i := range pl.nodes {
		pl.ips[i] = ipv4Of(e.status(pl.nodes[i]))
	}
	return pl
}

// startPMTUCoordinator runs a coordinator without a DERP map in this
// process, listening in h's namespace on addr, and returns a reusable auth
// key. (startLabCoordinator listens on the NAT lab's internet address.)
func startPMTUCoordinator(t *testing.T, e *env, h *netlab.Host, addr netip.Addr) string {
	t.Helper()
	ctx := context.Background()
	srv, err := control.NewServer(ctx, control.ServerOptions{StateDir: filepath.Join(e.dir, "coordinator"), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	ap := netip.AddrPortFrom(addr, 8443)
	var ln net.Listener
	if err := h.Do(func() (err error) { ln, err = net.Listen("tcp", ap.String()); return }); err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { ln.Close(); srv.Close() })
	e.coordURL = "https://" + ap.String()
	key, _, err := srv.CreateAuthKey(ctx, control.AuthKeyOptions{Reusable: true, Preauthorized: true, Tags: []string{"tag:e2e"}})
	if err != nil {
		t.Fatal(err)
	}
	return key
}

// peer returns node i's status entry for the other node.
func (pl *pmtuLab) peer(i int) localapi.Peer {
	st := pl.e.status(pl.nodes[i])
	if len(st.Peers) != 1 {
		pl.e.t.Fatalf("%s has %d peers, want 1", pl.nodes[i].name, len(st.Peers))
	}
	return st.Peers[0]
}

// waitProbed keeps small traffic flowing from node i to the other (an
// active peer is probed, an idle one is not) until its status has a probe
// result for the direct path, and returns it.
func (pl *pmtuLab) waitProbed(i int, within time.Duration) localapi.Peer {
	pl.e.t.Helper()
	var p localapi.Peer
	waitFor(pl.e.t, within, pl.nodes[i].name+" to probe the path MTU", func() (bool, string) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		err := pl.hosts[i].Ping(ctx, pl.ips[1-i])
		cancel()
		p = pl.peer(i)
		return err == nil && p.Path == "direct" && p.OverlayMTU != 0,
			fmt.Sprintf("ping: %v; path %q endpoint %q path_mtu %d overlay_mtu %d", err, p.Path, p.Endpoint, p.PathMTU, p.OverlayMTU)
	})
	return p
}

// udpAcrossBlackhole checks, from node i to the other, that the kernel's
// path MTU is still the overlay MTU (TCP never needed an ICMP error, so
// the MSS clamp kept its segments small); that a datagram too big for the
// path draws ICMP fragmentation-needed from the agent, lowering the
// kernel's path MTU to the probed 1420; and that big datagrams then cross,
// fragmented by the sender.
func (pl *pmtuLab) udpAcrossBlackhole(t *testing.T, i int) {
	t.Helper()
	from, to := pl.nodes[i].name, pl.nodes[1-i].name
	dst := net.UDPAddrFromAddrPort(netip.AddrPortFrom(pl.ips[1-i], 6000+uint16(i)))
	var ln, c *net.UDPConn
	if err := pl.hosts[1-i].Do(func() (err error) { ln, err = net.ListenUDP("udp4", dst); return }); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if err := pl.hosts[i].Do(func() (err error) { c, err = net.DialUDP("udp4", nil, dst); return }); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	sockopt := func(set bool, opt, v int) int {
		var err error
		cerr := rc.Control(func(fd uintptr) {
			if set {
				err = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, opt, v)
			} else {
				v, err = unix.GetsockoptInt(int(fd), unix.IPPROTO_IP, opt)
			}
		})
		if err = errors.Join(cerr, err); err != nil {
			t.Fatalf("socket option %d: %v", opt, err)
		}
		return v
	}
	sockopt(true, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_DO)
	if mtu := sockopt(false, unix.IP_MTU, 0); mtu != 8920 {
		t.Errorf("%s's kernel path MTU to %s is %d before any big datagram, want 8920: TCP needed an ICMP error (MSS not clamped?)", from, to, mtu)
	}
	big := bytes.Repeat([]byte{0x5a}, 3000)
	waitFor(t, 5*time.Second, from+"'s kernel to learn the path MTU from the agent's ICMP error", func() (bool, string) {
		c.Write(big) // EMSGSIZE once the path MTU is known
		time.Sleep(50 * time.Millisecond)
		mtu := sockopt(false, unix.IP_MTU, 0)
		return mtu == 1420, fmt.Sprintf("path MTU %d", mtu)
	})
	// Now let the kernel fragment.
	sockopt(true, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_WANT)
	got := make(chan int, 1)
	go func() {
		buf := make([]byte, 9000)
		ln.SetReadDeadline(time.Now().Add(10 * time.Second))
		n, _, err := ln.ReadFromUDP(buf)
		if err != nil {
			n = -1
		}
		got <- n
	}()
	for try := 0; ; try++ {
		// A connected socket reports the ICMP error once, on a later send,
		// as it would for a router's.
		if _, err := c.Write(big); err != nil && !errors.Is(err, unix.EMSGSIZE) {
			t.Fatalf("send %d bytes %s -> %s: %v", len(big), from, to, err)
		}
		select {
		case n := <-got:
			if n != len(big) {
				t.Errorf("%s received %d bytes, want a %d-byte datagram from %s", to, n, len(big), from)
			}
			return
		case <-time.After(time.Second):
			if try == 4 {
				t.Errorf("no %d-byte datagram %s -> %s crossed the blackhole in 5 tries", len(big), from, to)
				return
			}
		}
	}
}

// echoes reports whether an ICMP or ICMPv6 echo with size bytes of data
// from h gets an answer from dst (each try waits a third of a second).
// The kernel sends it with DF, as TCP does.
func echoes(t *testing.T, h *netlab.Host, dst netip.Addr, size, tries int) bool {
	t.Helper()
	network, listen, proto := "ip4:icmp", "0.0.0.0", 1
	var request, reply icmp.Type = ipv4.ICMPTypeEcho, ipv4.ICMPTypeEchoReply
	if dst.Is6() {
		// The kernel fills in the ICMPv6 checksum of a raw socket.
		network, listen, proto = "ip6:ipv6-icmp", "::", 58
		request, reply = ipv6.ICMPTypeEchoRequest, ipv6.ICMPTypeEchoReply
	}
	var c *icmp.PacketConn
	if err := h.Do(func() (err error) { c, err = icmp.ListenPacket(network, listen); return }); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	id := (os.Getpid() + size) & 0xffff
	data := bytes.Repeat([]byte{0xa5}, size)
	buf := make([]byte, size+100)
	for seq := 1; seq <= tries; seq++ {
		wb, err := (&icmp.Message{Type: request, Body: &icmp.Echo{ID: id, Seq: seq, Data: data}}).Marshal(nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.WriteTo(wb, &net.IPAddr{IP: dst.AsSlice()}); err != nil && !errors.Is(err, unix.EMSGSIZE) {
			t.Fatalf("echo of %d bytes to %v: %v", size, dst, err)
		}
		c.SetReadDeadline(time.Now().Add(time.Second / 3))
		for {
			n, _, err := c.ReadFrom(buf)
			if err != nil {
				break
			}
			m, err := icmp.ParseMessage(proto, buf[:n])
			if err != nil || m.Type != reply {
				continue
			}
			if e, ok := m.Body.(*icmp.Echo); ok && e.ID == id && len(e.Data) == size {
				return true
			}
		}
	}
	return false
}

// TestPMTUBlackholeReported: the jumbo hosts' tunnel MTU is 8920, but the
// routers' middle link carries 1500 and they drop the ICMP that would say
// so. Small packets cross the tunnel, full-size ones vanish; both daemons
// report the problem in status (JSON and text, with the fix) and log it.
func TestPMTUBlackholeReported(t *testing.T) {
	t.Parallel()
	pl := newPMTULab(t, 1500, true)
	for i := range pl.nodes {
		p := pl.waitProbed(i, 15*time.Second)
		if !p.MTUProblem || p.PathMTU != 1420 || p.OverlayMTU != 8920 {
			t.Errorf("%s: peer status %+v, want mtu_problem with path_mtu 1420 of overlay 8920", pl.nodes[i].name, p)
		}
	}
	if !echoes(t, pl.hosts[0], pl.ips[1], 56, 3) {
		t.Error("a small ping through the tunnel got no answer")
	}
	// TCP works across it both ways without a single segment lost to the
	// path: the agent clamps the MSS of SYNs to and from the peer to the
	// probed path MTU, so neither end builds segments the path drops
	// (udpAcrossBlackhole checks no ICMP error was needed).
	for i := range pl.nodes {
		ap := netip.AddrPortFrom(pl.ips[1-i], 5201+uint16(i))
		var ln net.Listener
		if err := pl.hosts[1-i].Do(func() (err error) { ln, err = net.Listen("tcp", ap.String()); return }); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go serveSHA(ln)
		var c net.Conn
		if err := pl.hosts[i].Do(func() (err error) { c, err = net.DialTimeout("tcp", ap.String(), 10*time.Second); return }); err != nil {
			t.Fatalf("dial %v from %s: %v", ap, pl.nodes[i].name, err)
		}
		done := make(chan error, 1)
		start := time.Now()
		go func() { done <- transfer(c) }()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("TCP transfer %s -> %s across the blackhole: %v", pl.nodes[i].name, pl.nodes[1-i].name, err)
			}
			t.Logf("TCP transfer %s -> %s across the 1500 link: %v", pl.nodes[i].name, pl.nodes[1-i].name, time.Since(start).Round(time.Millisecond))
		case <-time.After(20 * time.Second):
			c.Close()
			t.Errorf("TCP transfer %s -> %s stalled for 20 s: full-size segments blackholed (MSS not clamped)", pl.nodes[i].name, pl.nodes[1-i].name)
		}
	}
	// Other traffic crosses too: a packet too big for the path draws an
	// ICMP error from the agent, as from a router, and the sender's kernel
	// fragments to fit.
	for i := range pl.nodes {
		pl.udpAcrossBlackhole(t, i)
	}
	if !echoes(t, pl.hosts[0], pl.ips[1], 8000, 6) {
		t.Error("an 8000-byte ping got no answer across the blackhole: no ICMP fragmentation-needed from the agents?")
	}
	if ip6 := ipv6Of(pl.e.status(pl.nodes[1])); !echoes(t, pl.hosts[0], ip6, 8000, 6) {
		t.Errorf("an 8000-byte ping to %v got no answer across the blackhole: no ICMPv6 packet-too-big from the agents?", ip6)
	}
	out, err := pl.e.cli(pl.nodes[0], "status")
	want := "# warning: peer b: direct path drops packets over 1420 bytes (overlay MTU 8920; TCP to it is clamped, larger packets are answered with ICMP packet-too-big): run `meshd daemon --mtu 1420`, or allow ICMP fragmentation-needed on the path"
	if err != nil || !strings.Contains(out, want) {
		t.Errorf("meshd status (err %v):\n%s\nwant the line %q", err, out, want)
	}
	if log := pl.nodes[0].proc.out.String(); strings.Count(log, "path MTU problem") != 1 {
		t.Errorf("daemon a logged the path MTU problem %d times, want once:\n%s", strings.Count(log, "path MTU problem"), log)
	}
}

// TestPMTUCleanPath: the same lab with a jumbo middle link: full-size
// packets cross, and no problem is reported.
func TestPMTUCleanPath(t *testing.T) {
	t.Parallel()
	pl := newPMTULab(t, 9000, true)
	for i := range pl.nodes {
		p := pl.waitProbed(i, 15*time.Second)
		if p.MTUProblem || p.PathMTU != 8920 || p.OverlayMTU != 8920 {
			t.Errorf("%s: peer status %+v, want path_mtu 8920 without a problem", pl.nodes[i].name, p)
		}
	}
	if !echoes(t, pl.hosts[0], pl.ips[1], 8000, 3) {
		t.Error("an 8000-byte ping through the tunnel got no answer on the all-jumbo path")
	}
	if out, err := pl.e.cli(pl.nodes[0], "status"); err != nil || strings.Contains(out, "warning") {
		t.Errorf("meshd status (err %v) on a clean path:\n%s", err, out)
	}
}

func ipv6Of(st *localapi.Status) netip.Addr {
	for _, ip := range st.Self.IPs {
		if ip.Is6() {
			return ip
		}
	}
	return netip.Addr{}
}
