//go:build !linux

package agent

import (
	"context"
	"errors"
	"net"
	"net/netip"

	"golang.zx2c4.com/wireguard/tun"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/netmap"
)

type kernelLink struct{}

func createKernelTUN(name string, mtu int, addrs []netip.Prefix) (tun.Device, *kernelLink, error) {
	return nil, nil, errors.New("kernel TUN is only supported on Linux; use --tun userspace")
}

func (kl *kernelLink) setRoutes(want, src []netip.Prefix) error              { return nil }
func (kl *kernelLink) setTableRoutes(want, throws, src []netip.Prefix) error { return nil }
func (kl *kernelLink) cleanupRouting() error                                 { return nil }

type routerState struct{}

func (e *engine) setRouter(*netmap.NetworkMap, localapi.RoutePrefs) error { return nil }

func (kl *kernelLink) addAddr(netip.Addr) error { return nil }
func (kl *kernelLink) index() int               { return 0 }

func (kl *kernelLink) setMTU(int) error { return nil }

// routeLookup is nil where meshd cannot ask the kernel for routes:
// chooseMTU then falls back to the interfaces alone.
var routeLookup routeFunc

func (a *Agent) underlayDial() func(ctx context.Context, network, addr string) (net.Conn, error) {
	return nil
}
