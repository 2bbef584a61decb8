//go:build !linux

package agent

import (
	"errors"
	"net/netip"

	"golang.zx2c4.com/wireguard/tun"
)

type kernelLink struct{}

func createKernelTUN(name string, mtu int, addrs []netip.Prefix) (tun.Device, *kernelLink, error) {
	return nil, nil, errors.New("kernel TUN is only supported on Linux; use --tun userspace")
}

func (kl *kernelLink) setRoutes(want, src []netip.Prefix) error { return nil }

func (kl *kernelLink) addAddr(netip.Addr) error { return nil }
func (kl *kernelLink) index() int               { return 0 }

func (kl *kernelLink) setMTU(int) error { return nil }

// routeLookup is nil where meshd cannot ask the kernel for routes:
// chooseMTU then falls back to the interfaces alone.
var routeLookup routeFunc
