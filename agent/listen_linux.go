//go:build linux

package agent

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"
)

// listenOnLink listens on addr for connections that arrive through
// interface link only (SO_BINDTODEVICE). Binding to the tailnet address is
// not enough: Linux accepts a packet for any local address on any
// interface (the weak host model), so a machine on the node's LAN that
// routes the tailnet address to the node's LAN address would reach the
// socket without WireGuard or the packet filter. Bound to the TUN, the
// socket sees only packets the data path delivered; connections from this
// machine itself (which arrive on lo) are refused as well.
func listenOnLink(link string, addr netip.AddrPort) (net.Listener, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) { serr = unix.BindToDevice(int(fd), link) }); err != nil {
			return err
		}
		if serr != nil {
			return fmt.Errorf("bind to %s: %w", link, serr)
		}
		return nil
	}}
	return lc.Listen(context.Background(), "tcp", addr.String())
}

func linkName(l *kernelLink) string { return l.name }
