package agent

import (
	"context"
	"log/slog"
	"net/netip"
	"reflect"
	"slices"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/filter"
	"meshd.dev/meshd/netmap"
)

// packetFilter feeds the agent's Filter with the rules of each network map.
// The Filter outlives data plane restarts (own addresses changed, down/up),
// so its counters and flow table do too. Guarded by Agent.mu.
type packetFilter struct {
	f   *filter.Filter
	log *slog.Logger
	// src and local are what the rules in force were compiled from, so
	// that maps which change only peers or endpoints cost no recompile.
	src       []netmap.FilterRule
	local     []netip.Prefix
	compiled  bool
	bootstrap bool  // the rules in force are the coordinator's allow-all bootstrap
	err       error // why the last map's rules were rejected; nil if in force
}

func newPacketFilter(log *slog.Logger) *packetFilter {
	return &packetFilter{f: filter.New(filter.Options{Logger: log}), log: log}
}

// update installs nm's packet filter, compiled for the prefixes routed to
// this node. Rules that fail to compile are logged and the previous rules
// stay in force. A map that never carried a filter compiles to no rules:
// inbound traffic is then limited to replies to flows this node opens.
func (p *packetFilter) update(nm *netmap.NetworkMap) {
	local := nm.Self.AllowedIPs
	if len(local) == 0 {
		local = nm.Self.Addresses
	}
	if p.compiled && slices.Equal(local, p.local) && reflect.DeepEqual(nm.PacketFilter, p.src) && p.bootstrap == nm.PolicyBootstrap {
		return
	}
	r, err := filter.Compile(nm.PacketFilter, local)
	if err != nil {
		p.err = err
		p.log.Error("packet filter in the network map rejected; the previous rules stay in force", "err", err)
		return
	}
	p.f.SetRules(r)
	p.src, p.local, p.compiled, p.err = slices.Clone(nm.PacketFilter), slices.Clone(local), true, nil
	p.bootstrap = nm.PolicyBootstrap
	p.log.Info("packet filter updated", "rules", r.Len(), "bootstrap_allow_all", nm.PolicyBootstrap)
}

func (p *packetFilter) status() *localapi.FilterStatus {
	s := p.f.Stats()
	fs := &localapi.FilterStatus{
		Rules: s.Rules, Flows: s.Flows, Fragments: s.Fragments,
		DropsIn: s.DropsIn, DropsOut: s.DropsOut, Bootstrap: p.bootstrap,
	}
	if p.err != nil {
		fs.Error = p.err.Error()
	}
	return fs
}

// Drops returns the packets the filter dropped last, oldest first. An
// inbound drop that the rules in force now would allow (it was dropped
// under an earlier policy) names the rule that allows it.
func (a *Agent) Drops(context.Context) (*localapi.Drops, error) {
	recs := a.pf.f.RecentDrops()
	rules := a.pf.f.Rules()
	out := &localapi.Drops{Drops: make([]localapi.Drop, 0, len(recs))}
	for _, r := range recs {
		d := localapi.Drop{
			Time: r.Time.UTC(), Dir: r.Dir, Reason: r.Reason, Proto: r.Proto,
			Src: r.Src, Dst: r.Dst, SrcPort: r.SrcPort, DstPort: r.DstPort, Len: r.Len,
		}
		if r.Direction == filter.In && r.Src.IsValid() {
			if origin, ok := rules.Match(r.Proto, r.Src, r.Dst, r.DstPort); ok {
				d.AllowedNowBy = origin
				if d.AllowedNowBy == "" {
					d.AllowedNowBy = "(rule without origin)"
				}
			}
		}
		out.Drops = append(out.Drops, d)
	}
	return out, nil
}
