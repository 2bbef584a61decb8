// Package netcheck measures what the network allows a node: whether UDP
// gets out, the public IPv4/IPv6 address and port a NAT maps it to, whether
// that mapping changes with the destination (a symmetric NAT, which defeats
// hole punching), and the latency to each DERP region.
package netcheck

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"time"

	"meshd.dev/meshd/nat/stun"
	"meshd.dev/meshd/netmap"
)

// Options configures Run. DERPMap is required.
type Options struct {
	DERPMap *netmap.DERPMap
	// Timeout bounds the whole check (default 2s). Servers that have not
	// answered by then count as unreachable over UDP.
	Timeout time.Duration
	// Probes is how many binding requests go to each STUN server (default
	// 3, spaced by ProbeSpacing, default 100ms); the fastest answer counts,
	// so one lost datagram does not mark a region slow.
	Probes       int
	ProbeSpacing time.Duration
	// ListenV4 and ListenV6 are the local UDP addresses to probe from
	// (default "0.0.0.0:0" and "[::]:0").
	ListenV4, ListenV6 string
	// Resolve looks up relay host names; nil uses net.DefaultResolver.
	Resolve func(ctx context.Context, host string) ([]netip.Addr, error)
	// Logger receives debug detail; nil discards it.
	Logger *slog.Logger
}

// Report is the result of one check.
type Report struct {
	// UDP is true when any STUN server answered.
	UDP  bool `json:"udp"`
	IPv4 bool `json:"ipv4"`
	IPv6 bool `json:"ipv6"`
	// GlobalV4 and GlobalV6 are the public addresses the STUN servers saw
	// (zero when unknown).
	GlobalV4 netip.AddrPort `json:"global_v4,omitzero"`
	GlobalV6 netip.AddrPort `json:"global_v6,omitzero"`
	// MappingVariesByDest is true behind a symmetric NAT: two STUN
	// servers saw the same socket with different public ports. Nil when
	// fewer than two servers answered, so it could not be tested.
	MappingVariesByDest *bool `json:"mapping_varies_by_dest,omitempty"`
	// RegionLatency is the best round trip to each region that answered:
	// over STUN, or over a TCP connect to its DERP port when UDP did not
	// get through (RegionLatencyTCP then lists it).
	RegionLatency    map[int]time.Duration `json:"region_latency"`
	RegionLatencyTCP []int                 `json:"region_latency_tcp,omitempty"`
	// PreferredDERP is the lowest-latency region, 0 if none was reachable.
	PreferredDERP int `json:"preferred_derp"`
}

// target is one STUN server address.
type target struct {
	region int
	node   string
	addr   netip.AddrPort
}

type result struct {
	mapped netip.AddrPort
	rtt    time.Duration
}

// Run performs a check.
func Run(ctx context.Context, opts Options) (*Report, error) {
	if opts.DERPMap == nil || len(opts.DERPMap.Regions) == 0 {
		return nil, errors.New("netcheck: no DERP map: nothing to measure against")
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 2 * time.Second
	}
	if opts.Probes <= 0 {
		opts.Probes = 3
	}
	if opts.ProbeSpacing <= 0 {
		opts.ProbeSpacing = 100 * time.Millisecond
	}
	if opts.ListenV4 == "" {
		opts.ListenV4 = "0.0.0.0:0"
	}
	if opts.ListenV6 == "" {
		opts.ListenV6 = "[::]:0"
	}
	if opts.Resolve == nil {
		opts.Resolve = func(ctx context.Context, host string) ([]netip.Addr, error) {
			return net.DefaultResolver.LookupNetIP(ctx, "ip", host)
		}
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithTimeout(ctx, opts.Timeout)
	defer cancel()

	targets, derpAddrs := resolveTargets(ctx, opts, log)
	p := &prober{results: make(map[netip.AddrPort]result), pending: make(map[stun.TxID]pendingProbe)}
	var wg sync.WaitGroup
	var tcpLat map[int]time.Duration
	wg.Add(1)
	go func() { defer wg.Done(); tcpLat = tcpLatencies(ctx, derpAddrs) }()
	for _, fam := range []struct {
		network, listen string
		is6             bool
	}{{"udp4", opts.ListenV4, false}, {"udp6", opts.ListenV6, true}} {
		var fts []target
		for _, t := range targets {
			if t.addr.Addr().Is6() == fam.is6 {
				fts = append(fts, t)
			}
		}
		if len(fts) == 0 {
			continue
		}
		pc, err := net.ListenPacket(fam.network, fam.listen)
		if err != nil {
			log.Debug("netcheck: no socket", "network", fam.network, "err", err)
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			p.probeFamily(ctx, pc.(*net.UDPConn), fts, opts)
		}()
	}
	wg.Wait()

	r := &Report{RegionLatency: make(map[int]time.Duration)}
	var mapped4 []netip.AddrPort
	for _, t := range targets {
		res, ok := p.results[t.addr]
		if !ok {
			continue
		}
		r.UDP = true
		if t.addr.Addr().Is4() {
			r.IPv4 = true
			if !r.GlobalV4.IsValid() {
				r.GlobalV4 = res.mapped
			}
			mapped4 = append(mapped4, res.mapped)
		} else {
			r.IPv6 = true
			if !r.GlobalV6.IsValid() {
				r.GlobalV6 = res.mapped
			}
		}
		if cur, ok := r.RegionLatency[t.region]; !ok || res.rtt < cur {
			r.RegionLatency[t.region] = res.rtt
		}
	}
	// Symmetric-NAT test over IPv4, where NATs live: one socket, several
	// destinations. IPv6 is rarely translated.
	if len(mapped4) >= 2 {
		varies := slices.ContainsFunc(mapped4, func(m netip.AddrPort) bool { return m != mapped4[0] })
		r.MappingVariesByDest = &varies
	}
	// Regions UDP could not reach: how far is their DERP port over TCP?
	for id, d := range tcpLat {
		if _, ok := r.RegionLatency[id]; !ok {
			r.RegionLatency[id] = d
			r.RegionLatencyTCP = append(r.RegionLatencyTCP, id)
		}
	}
	slices.Sort(r.RegionLatencyTCP)
	for id, d := range r.RegionLatency {
		if r.PreferredDERP == 0 || d < r.RegionLatency[r.PreferredDERP] || (d == r.RegionLatency[r.PreferredDERP] && id < r.PreferredDERP) {
			r.PreferredDERP = id
		}
	}
	return r, nil
}

func resolveTargets(ctx context.Context, opts Options, log *slog.Logger) (stunTargets []target, derpTargets []target) {
	for _, reg := range opts.DERPMap.Regions {
		for _, n := range reg.Nodes {
			addrs, err := resolveHost(ctx, opts, n.Host)
			if err != nil {
				log.Debug("netcheck: resolve relay", "host", n.Host, "err", err)
				continue
			}
			for _, a := range addrs {
				if n.STUNPort > 0 {
					stunTargets = append(stunTargets, target{reg.ID, n.Name, netip.AddrPortFrom(a, uint16(n.STUNPort))})
				}
				if !n.STUNOnly && n.DERPPort > 0 {
					derpTargets = append(derpTargets, target{reg.ID, n.Name, netip.AddrPortFrom(a, uint16(n.DERPPort))})
				}
			}
		}
	}
	return stunTargets, derpTargets
}

func resolveHost(ctx context.Context, opts Options, host string) ([]netip.Addr, error) {
	if a, err := netip.ParseAddr(host); err == nil {
		return []netip.Addr{a.Unmap()}, nil
	}
	addrs, err := opts.Resolve(ctx, host)
	if err != nil {
		return nil, fmt.Errorf("resolve %s: %w", host, err)
	}
	for i, a := range addrs {
		addrs[i] = a.Unmap()
	}
	return addrs, nil
}

type pendingProbe struct {
	dst  netip.AddrPort
	sent time.Time
}

type prober struct {
	mu      sync.Mutex
	pending map[stun.TxID]pendingProbe
	results map[netip.AddrPort]result
}

// probeFamily sends the probes of one address family from one socket and
// collects answers until every target answered or ctx ends.
func (p *prober) probeFamily(ctx context.Context, pc *net.UDPConn, targets []target, opts Options) {
	defer pc.Close()
	stop := context.AfterFunc(ctx, func() { pc.SetReadDeadline(time.Now()) })
	defer stop()
	allDone := make(chan struct{})
	go func() {
		// Send rounds; stop early once everything answered.
		for round := 0; round < opts.Probes; round++ {
			for _, t := range targets {
				p.mu.Lock()
				_, answered := p.results[t.addr]
				p.mu.Unlock()
				if answered && round > 0 {
					continue
				}
				tx, req := stun.NewRequest()
				p.mu.Lock()
				p.pending[tx] = pendingProbe{dst: t.addr, sent: time.Now()}
				p.mu.Unlock()
				pc.WriteToUDPAddrPort(req, t.addr)
			}
			select {
			case <-ctx.Done():
				return
			case <-allDone:
				return
			case <-time.After(opts.ProbeSpacing):
			}
		}
	}()
	defer close(allDone)
	buf := make([]byte, 1500)
	for {
		n, from, err := pc.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		now := time.Now()
		tx, mapped, err := stun.ParseResponse(buf[:n])
		if err != nil {
			continue
		}
		from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
		p.mu.Lock()
		pp, ok := p.pending[tx]
		if ok && pp.dst == from {
			delete(p.pending, tx)
			rtt := now.Sub(pp.sent)
			if cur, seen := p.results[pp.dst]; !seen || rtt < cur.rtt {
				p.results[pp.dst] = result{mapped: mapped, rtt: rtt}
			}
		}
		done := true
		for _, t := range targets {
			if _, ok := p.results[t.addr]; !ok {
				done = false
				break
			}
		}
		p.mu.Unlock()
		if done {
			return
		}
	}
}

// tcpLatencies measures a TCP connect to the DERP port of every relay and
// returns the best per region. It runs alongside the STUN probes so a
// network that blocks UDP still gets region latencies within the timeout.
func tcpLatencies(ctx context.Context, targets []target) map[int]time.Duration {
	var mu sync.Mutex
	var wg sync.WaitGroup
	lat := make(map[int]time.Duration)
	for _, t := range targets {
		wg.Add(1)
		go func() {
			defer wg.Done()
			start := time.Now()
			c, err := (&net.Dialer{}).DialContext(ctx, "tcp", net.JoinHostPort(t.addr.Addr().String(), strconv.Itoa(int(t.addr.Port()))))
			if err != nil {
				return
			}
			rtt := time.Since(start)
			c.Close()
			mu.Lock()
			defer mu.Unlock()
			if cur, ok := lat[t.region]; !ok || rtt < cur {
				lat[t.region] = rtt
			}
		}()
	}
	wg.Wait()
	return lat
}
