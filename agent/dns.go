package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"golang.zx2c4.com/wireguard/tun/netstack"

	"meshd.dev/meshd/agent/resolver"
	"meshd.dev/meshd/netmap"
)

// MagicDNS in the agent. One resolver.Resolver per agent holds the names
// of the current map (it outlives data plane restarts, like the packet
// filter); each engine serves it on the resolver addresses of its TUN:
//
//   - kernel mode: 100.100.100.100/32 and fd5e:5a1e:d::53/128 are added
//     to the TUN and real sockets bound to them, so every program of the
//     host (dig, the C library, systemd-resolved) reaches the resolver
//     through the kernel's local delivery, UDP and TCP alike, with no
//     packet interception in the data path. The addresses vanish with the
//     TUN.
//   - netstack mode: the same addresses are added to the netstack after
//     the node's own (so they are never picked as a source address: the
//     first IPv4 address is, and IPv6 prefers the longest common prefix,
//     which the node's address wins for every tailnet destination) and
//     the resolver listens there; the proxies reach it by dialling it.
//
// Peers never get answers: the packet filter judges every packet from the
// tunnel against this node's own addresses (AllowedIPs), so a packet to a
// resolver address is dropped as not_local, and the resolver itself
// serves only sources that are this host's (loopback, the resolver
// addresses, the node's tailnet addresses; see dnsAccept), which also
// refuses a LAN neighbour that routes 100.100.100.100 to this host.
// TestResolverNotReachableFromPeers holds both.

// magicDNS is the agent's resolver and what forwarding needs from the
// current engine.
type magicDNS struct {
	res *resolver.Resolver
	// tnet is the running engine's netstack (nil in kernel mode or with no
	// engine): a split DNS resolver on a tailnet address is reachable only
	// through it.
	tnet atomic.Pointer[netstack.Net]
}

// newMagicDNS makes the agent's resolver. upstreams are where it forwards
// names it does not serve (Agent.DNSUpstreams: the host's resolvers as
// they are without meshd); nil reads /etc/resolv.conf.
func newMagicDNS(log *slog.Logger, upstreams func() []netip.AddrPort) *magicDNS {
	m := &magicDNS{}
	m.res = resolver.New(resolver.Options{Dial: m.dial, Logger: log, Upstreams: upstreams})
	return m
}

// dial opens a forwarded query's connection: through the netstack for a
// tailnet address in userspace mode, else through the host.
func (m *magicDNS) dial(ctx context.Context, network string, addr netip.AddrPort) (net.Conn, error) {
	if tnet := m.tnet.Load(); tnet != nil && inTailnet(addr.Addr()) {
		if network == "udp" {
			return tnet.DialUDPAddrPort(netip.AddrPort{}, addr)
		}
		return tnet.DialContextTCPAddrPort(ctx, addr)
	}
	var d net.Dialer
	return d.DialContext(ctx, network, addr.String())
}

// inTailnet reports whether a is in the ranges tailnet addresses come
// from (the CGNAT range, the tailnet's ULA /48).
func inTailnet(a netip.Addr) bool {
	a = a.Unmap()
	if a.Is4() {
		return cgnatRange.Contains(a)
	}
	r, _ := netmap.ResolverIPv6.Prefix(48)
	return r.Contains(a)
}

// resolverAddrs are the addresses MagicDNS answers on.
var resolverAddrs = []netip.Addr{netmap.ResolverIPv4, netmap.ResolverIPv6}

// isResolverAddr reports whether a is one of them.
func isResolverAddr(a netip.Addr) bool { return slices.Contains(resolverAddrs, a.Unmap()) }

// dnsAccept says which sources the resolver serves: programs of this host
// only. Local traffic to a resolver address carries a local source: the
// resolver address itself unless the program bound another, loopback, or
// the node's tailnet address.
func dnsAccept(own []netip.Prefix) func(netip.Addr) bool {
	own = slices.Clone(own)
	return func(a netip.Addr) bool {
		if a.IsLoopback() || isResolverAddr(a) {
			return true
		}
		return slices.ContainsFunc(own, func(p netip.Prefix) bool { return p.Addr() == a })
	}
}

// dnsServer is an engine's MagicDNS listeners.
type dnsServer struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// startDNS serves the agent's resolver on the resolver addresses of e's
// TUN. A failure (port 53 taken on those addresses, IPv6 disabled on the
// TUN) costs MagicDNS on that address only, never the data plane.
func (e *engine) startDNS() error {
	m := e.cfg.dns
	ctx, cancel := context.WithCancel(context.Background())
	e.dnsSrv = &dnsServer{cancel: cancel}
	if e.tnet != nil {
		m.tnet.Store(e.tnet)
	}
	accept := dnsAccept(e.cfg.addrs)
	var errs []error
	for _, a := range resolverAddrs {
		ap := netip.AddrPortFrom(a, 53)
		if e.link != nil {
			if err := e.link.addAddr(a); err != nil {
				errs = append(errs, fmt.Errorf("MagicDNS on %v: %w", a, err))
				continue
			}
		}
		pc, ln, err := e.listenDNS(ap)
		if err != nil {
			errs = append(errs, fmt.Errorf("MagicDNS on %v: %w", ap, err))
			continue
		}
		e.dnsSrv.wg.Add(2)
		go func() {
			defer e.dnsSrv.wg.Done()
			if err := m.res.ServeUDP(ctx, pc, accept); err != nil {
				e.cfg.log.Warn("MagicDNS UDP server stopped", "addr", ap, "err", err)
			}
		}()
		go func() {
			defer e.dnsSrv.wg.Done()
			if err := m.res.ServeTCP(ctx, ln, accept); err != nil {
				e.cfg.log.Warn("MagicDNS TCP server stopped", "addr", ap, "err", err)
			}
		}()
		e.cfg.log.Info("MagicDNS listening", "addr", ap)
	}
	return errors.Join(errs...)
}

// listenDNS opens the UDP and TCP sockets of one resolver address.
func (e *engine) listenDNS(ap netip.AddrPort) (net.PacketConn, net.Listener, error) {
	if e.tnet != nil {
		pc, err := e.tnet.ListenUDPAddrPort(ap)
		if err != nil {
			return nil, nil, err
		}
		ln, err := e.tnet.ListenTCPAddrPort(ap)
		if err != nil {
			pc.Close()
			return nil, nil, err
		}
		return pc, ln, nil
	}
	pc, err := net.ListenPacket("udp", ap.String())
	if err != nil {
		return nil, nil, err
	}
	ln, err := net.Listen("tcp", ap.String())
	if err != nil {
		pc.Close()
		return nil, nil, err
	}
	return pc, ln, nil
}

// stopDNS closes e's listeners and waits for their queries.
func (e *engine) stopDNS() {
	if e.dnsSrv == nil {
		return
	}
	if e.tnet != nil {
		e.cfg.dns.tnet.CompareAndSwap(e.tnet, nil)
	}
	e.dnsSrv.cancel()
	e.dnsSrv.wg.Wait()
}

// nodeHasName reports whether n answers to name (lowercase, no trailing
// dot) in the proxies and Dial: its hostname, or its MagicDNS name given
// in full ("host.SUFFIX") or as its first label ("host"). Only a DNS name
// under the map's suffix counts, as in the resolver: a map cannot make a
// proxy send a public name's traffic into the tailnet.
func nodeHasName(n *netmap.Node, name, suffix string) bool {
	if strings.ToLower(n.Hostname) == name {
		return true
	}
	dns := strings.TrimSuffix(strings.ToLower(n.DNSName), ".")
	if suffix == "" || !strings.HasSuffix(dns, "."+suffix) {
		return false
	}
	return dns == name || dns == name+"."+suffix
}
