package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/agent/magicbind"
	"meshd.dev/meshd/netmap"
)

// bindOptions configure the magic bind of a data plane: this node's keys;
// it tells the agent when its home relay or public endpoints change, and
// probes direct paths for the overlay MTU so a path that drops full-size
// packets shows in status.
func (a *Agent) bindOptions() magicbind.Options {
	return magicbind.Options{
		DiscoKey: a.disco, Logger: a.log, OverlayMTU: a.opts.MTU, DERPDialContext: a.underlayDial(),
		OnChange: func() {
			select {
			case a.pathsChanged <- struct{}{}:
			default:
			}
		},
	}
}

// setMagicEndpoints configures every peer with the magic bind's stable
// per-peer endpoint instead of an address: the bind picks the path.
func setMagicEndpoints(peers map[netmap.NodePublic]wgPeer) {
	for k, p := range peers {
		p.BindEndpoint = magicbind.EndpointFor(k)
		peers[k] = p
	}
}

// withSTUNEndpoints adds the public mappings the magic bind learnt to the
// local endpoint candidates.
func withSTUNEndpoints(eng *engine, eps []netip.AddrPort) []netip.AddrPort {
	eps = append(eps, eng.bind.STUNEndpoints()...)
	slices.SortFunc(eps, func(x, y netip.AddrPort) int { return x.Compare(y) })
	return slices.Compact(eps)
}

// homeDERP is the home relay region to publish, 0 for none.
func (a *Agent) homeDERP() int {
	a.mu.Lock()
	eng := a.eng
	a.mu.Unlock()
	if eng == nil {
		return 0
	}
	return eng.bind.HomeDERP()
}

// peerPath is a peer's path and endpoint for status.
// setPeerPath fills p's path fields from the magic bind: the path and its
// endpoint, and for a direct path the probed path MTU and whether it drops
// full-size packets.
func setPeerPath(p *localapi.Peer, mb *magicbind.Bind, k netmap.NodePublic) {
	st := mb.PeerStatus(k)
	p.Path, p.Endpoint = st.Path, st.Endpoint()
	p.PathMTU, p.MTUProblem, p.OverlayMTU = st.PathMTU, st.MTUProblem, st.OverlayMTU
}

// Ping sends one disco ping to the peer named by peer (hostname or tailnet
// IP) over every path and reports the first pong, preferring a direct one.
func (a *Agent) Ping(ctx context.Context, peer string) (*localapi.PingResult, error) {
	a.mu.Lock()
	eng, nm := a.eng, a.nm
	a.mu.Unlock()
	if eng == nil || nm == nil {
		return nil, errors.New("ping: the node is not up (run meshd up)")
	}
	mb := eng.bind
	ip, err := resolvePeer(nm, peer)
	if err != nil {
		return nil, fmt.Errorf("ping: %w", err)
	}
	var n *netmap.Node
	for _, p := range nm.SortedPeers() {
		if slices.ContainsFunc(p.Addresses, func(x netip.Prefix) bool { return x.Addr() == ip }) {
			n = p
			break
		}
	}
	if n == nil {
		return nil, fmt.Errorf("ping: %s is not a peer (it is this node, or a subnet route)", peer)
	}
	res, err := mb.Ping(ctx, n.NodeKey)
	if err != nil {
		return nil, err
	}
	out := &localapi.PingResult{
		Peer: n.Hostname, IP: ip, Path: res.Path, DERPRegion: res.DERPRegion, DERPCode: res.DERPCode,
		LatencyMS: float64(res.Latency.Microseconds()) / 1000,
	}
	if res.Addr.IsValid() {
		out.Endpoint = res.Addr.String()
	}
	return out, nil
}
