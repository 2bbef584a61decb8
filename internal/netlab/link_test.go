package netlab

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestLinkJumbo: a point-to-point link carries the MTU it was made with,
// both ends, and a datagram that only fits a jumbo MTU crosses it whole
// (don't-fragment set, so a smaller MTU anywhere would drop it).
func TestLinkJumbo(t *testing.T) {
	l := New(t)
	a, b := l.NewHost("a"), l.NewHost("b")
	aa, ba := l.Link(a, b, netip.MustParsePrefix("198.18.7.0/30"), 9000)
	if aa.String() != "198.18.7.1" || ba.String() != "198.18.7.2" {
		t.Fatalf("addresses %v %v", aa, ba)
	}
	for _, h := range []*Host{a, b} {
		if mtu, err := h.MTU("eth0"); err != nil || mtu != 9000 {
			t.Fatalf("MTU of eth0 in %s: %d, %v", h.Name, mtu, err)
		}
	}
	if _, err := a.MTU("nosuch0"); err == nil {
		t.Fatal("MTU of a missing interface: no error")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := a.Ping(ctx, ba); err != nil {
		t.Fatal(err)
	}
	var srv, cli *net.UDPConn
	if err := b.Do(func() (err error) {
		srv, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(ba, 7001)))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	if err := a.Do(func() (err error) {
		cli, err = net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(ba, 7001)))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	// Don't fragment, ever: 8,900 bytes are sent whole or the write fails
	// (EMSGSIZE on a 1,500-byte link).
	rc, err := cli.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_DO)
	}); err != nil || serr != nil {
		t.Fatalf("IP_PMTUDISC_DO: %v %v", err, serr)
	}
	if _, err := cli.Write(make([]byte, 8900)); err != nil {
		t.Fatalf("8,900-byte datagram: %v", err)
	}
	srv.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 9000)
	n, _, err := srv.ReadFromUDPAddrPort(buf)
	if err != nil || n != 8900 {
		t.Fatalf("received %d bytes, %v", n, err)
	}
}
