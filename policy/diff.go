package policy

import (
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"

	"meshd.dev/meshd/netmap"
)

// Flow is a set of connections a policy allows: sources matching Src may
// open flows to destinations matching Dst on Ports over Protos.
type Flow struct {
	Src    string `json:"src"`
	Dst    string `json:"dst"`
	Protos string `json:"protos"` // e.g. "tcp,udp,icmp,icmpv6"
	Ports  string `json:"ports"`  // e.g. "22,8080" or "*"
	// App, instead of ports, is an "app" capability grant: the capability
	// name and its values, e.g. meshd.dev/cap/kubernetes=[{...}].
	App string `json:"app,omitempty"`
	// Rule is the file:line of the rule in the policy that allows (for an
	// opened flow: NEW; for a closed one: OLD) the flow.
	Rule string `json:"rule"`
}

func (f Flow) String() string {
	if f.App != "" {
		return fmt.Sprintf("%s -> %s app %s  [%s]", f.Src, f.Dst, f.App, f.Rule)
	}
	return fmt.Sprintf("%s -> %s:%s (%s)  [%s]", f.Src, f.Dst, f.Ports, f.Protos, f.Rule)
}

// PolicyDiff lists the flows NEW opens and closes compared with OLD.
type PolicyDiff struct {
	Opened []Flow `json:"opened"`
	Closed []Flow `json:"closed"`
}

// flowAtom is one rule target with groups expanded to their users (so a
// membership change shows up as the flows it opens or closes) and one
// protocol.
type flowAtom struct {
	src, dst selector
	proto    uint8
	ports    []netmap.PortRange
	rule     *rule
	// app is set for a capability grant ("name=values"); proto and ports
	// are then unused.
	app string
	// srcGroup/dstGroup name the group a user selector was expanded from,
	// so rows can be folded back into the group for display.
	srcGroup, dstGroup string
}

func (p *Policy) atoms() []flowAtom {
	var out []flowAtom
	type expanded struct {
		sel   selector
		group string
	}
	expand := func(s selector) []expanded {
		if s.kind != selGroup {
			return []expanded{{sel: s}}
		}
		var us []expanded
		for _, u := range p.groups[s.name] {
			us = append(us, expanded{selector{kind: selUser, name: u, raw: u}, s.name})
		}
		return us
	}
	for i := range p.rules {
		r := &p.rules[i]
		for _, s := range r.src {
			for _, src := range expand(s) {
				for _, t := range r.targets {
					for _, dst := range expand(t.dst) {
						for _, proto := range effectiveProtos(t.protos) {
							ports := t.ports
							if !hasPorts([]uint8{proto}) {
								ports = []netmap.PortRange{netmap.AllPorts}
							}
							out = append(out, flowAtom{src: src.sel, dst: dst.sel, proto: proto, ports: ports, rule: r,
								srcGroup: src.group, dstGroup: dst.group})
						}
					}
				}
				for _, d := range r.capDsts {
					for _, dst := range expand(d) {
						for _, name := range slices.Sorted(maps.Keys(r.caps)) {
							vals, _ := json.Marshal(r.caps[name])
							out = append(out, flowAtom{src: src.sel, dst: dst.sel, ports: []netmap.PortRange{netmap.AllPorts}, rule: r,
								app: name + "=" + string(vals), srcGroup: src.group, dstGroup: dst.group})
						}
					}
				}
			}
		}
	}
	return out
}

// Diff compares two policies by the flows they allow: what NEW opens that
// OLD did not allow, and what it closes. A flow allowed by a wider
// selector on the other side (say "*" or autogroup:member) counts as
// allowed, so rewording a rule does not show up as a change.
func Diff(old, new *Policy) PolicyDiff {
	oa, na := old.atoms(), new.atoms()
	return PolicyDiff{
		Opened: uncovered(na, new, oa, old),
		Closed: uncovered(oa, old, na, new),
	}
}

// uncovered returns the flows of as (from policy ap) not allowed by any atom
// of bs (from policy bp), merged across protocols, with users folded back
// into their group when every member of the group has the same row.
func uncovered(as []flowAtom, ap *Policy, bs []flowAtom, bp *Policy) []Flow {
	type row struct {
		src, dst, ports, rule, app string
		srcGroup, dstGroup         string
	}
	// Gather the uncovered ports per source, destination, rule and
	// protocol, uniting the ports of a rule's separate "ip" entries.
	type cell struct {
		row   row
		proto uint8
	}
	cellPorts := map[cell][]netmap.PortRange{}
	var cells []cell
	// Only atoms whose destination is broad, or names the same thing, can
	// cover an atom: bucket bs so large policies do not compare every pair.
	type bucket struct {
		proto uint8
		app   string
		kind  selKind
		name  string
	}
	buckets := map[bucket][]flowAtom{}
	for _, b := range bs {
		k := bucket{proto: b.proto, app: b.app}
		switch b.dst.kind {
		case selTag, selUser:
			k.kind, k.name = b.dst.kind, b.dst.name
		default:
			k.kind = selAny // broad: "*", autogroups, addresses
		}
		buckets[k] = append(buckets[k], b)
	}
	for _, a := range as {
		rest := slices.Clone(a.ports)
		candidates := buckets[bucket{proto: a.proto, app: a.app, kind: selAny}]
		if a.dst.kind == selTag || a.dst.kind == selUser {
			candidates = append(slices.Clip(candidates), buckets[bucket{a.proto, a.app, a.dst.kind, a.dst.name}]...)
		}
		for _, b := range candidates {
			if len(rest) == 0 {
				break
			}
			if b.proto == a.proto && b.app == a.app && bp.selCovers(b.src, a.src) && bp.selCovers(b.dst, a.dst) && viaCovers(b.rule.via, a.rule.via) {
				rest = subtractPorts(rest, b.ports)
			}
		}
		if len(rest) == 0 {
			continue
		}
		c := cell{row{src: a.src.raw, dst: a.dst.raw, rule: a.rule.origin(), app: a.app, srcGroup: a.srcGroup, dstGroup: a.dstGroup}, a.proto}
		if _, ok := cellPorts[c]; !ok {
			cells = append(cells, c)
		}
		cellPorts[c] = normalizePorts(append(cellPorts[c], rest...))
	}
	protos := map[row][]uint8{}
	var order []row
	for _, c := range cells {
		k := c.row
		k.ports = formatPorts(cellPorts[c])
		if _, ok := protos[k]; !ok {
			order = append(order, k)
		}
		protos[k] = append(protos[k], c.proto)
	}
	// Fold: a row whose source (then destination) came from a group is
	// shown as the group when every member has the same row.
	fold := func(rows []row, isSrc bool) []row {
		type gk struct {
			r     row
			proto string
		}
		count := map[gk]int{}
		norm := func(r row) row {
			if isSrc {
				r.src = r.srcGroup
			} else {
				r.dst = r.dstGroup
			}
			return r
		}
		for _, r := range rows {
			g := r.srcGroup
			if !isSrc {
				g = r.dstGroup
			}
			if g != "" {
				count[gk{norm(r), string(protos[r])}]++
			}
		}
		var out []row
		done := map[gk]bool{}
		for _, r := range rows {
			g := r.srcGroup
			if !isSrc {
				g = r.dstGroup
			}
			k := gk{norm(r), string(protos[r])}
			if g == "" || count[k] != len(ap.groups[g]) {
				out = append(out, r)
				continue
			}
			if !done[k] {
				done[k] = true
				protos[k.r] = protos[r]
				out = append(out, k.r)
			}
		}
		return out
	}
	order = fold(fold(order, true), false)
	out := []Flow{}
	for _, k := range order {
		names := make([]string, 0, len(protos[k]))
		for _, p := range protos[k] {
			names = append(names, protoName(p))
		}
		if k.app != "" {
			out = append(out, Flow{Src: k.src, Dst: k.dst, App: k.app, Rule: k.rule})
			continue
		}
		out = append(out, Flow{Src: k.src, Dst: k.dst, Ports: k.ports, Protos: strings.Join(names, ","), Rule: k.rule})
	}
	return out
}

// viaCovers reports whether a flow through the routers sub names (all
// routers when empty) is allowed through the routers sup names.
func viaCovers(sup, sub []selector) bool {
	if len(sup) == 0 {
		return true
	}
	if len(sub) == 0 {
		return false
	}
	for _, s := range sub {
		if !slices.ContainsFunc(sup, func(t selector) bool { return t.name == s.name }) {
			return false
		}
	}
	return true
}
