//go:build !linux

package agent

import (
	"errors"
	"net"
	"net/netip"
)

func listenOnLink(string, netip.AddrPort) (net.Listener, error) {
	return nil, errors.New("kernel TUN is only supported on Linux")
}

func linkName(*kernelLink) string { return "" }
