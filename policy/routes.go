package policy

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"meshd.dev/meshd/netmap"
)

// routeApprover is one entry of "autoApprovers".routes: routes inside
// prefix advertised by a node who matches are approved.
type routeApprover struct {
	prefix netip.Prefix
	who    []selector
	pos    Pos
}

// AutoApproves reports whether the policy's "autoApprovers" approve route
// p advertised by node n: an exit route (0.0.0.0/0, ::/0) if n matches
// "exitNode", any other route if an entry of "routes" whose prefix
// contains p names n. Selectors match the node's identity as everywhere
// else (a tagged node is never its enrolling user's); "*" approves every
// node (the author said so). Address selectors are refused by the parser.
func (e *Engine) AutoApproves(n *netmap.Node, p netip.Prefix) bool {
	keys := nodeKeys(transientEntry(n))
	match := func(sels []selector) bool {
		for _, s := range sels {
			if s.kind == selAny {
				return true
			}
			for _, k := range e.pol.selKeys(s) {
				if slices.Contains(keys, k) {
					return true
				}
			}
		}
		return false
	}
	if netmap.IsExitRoute(p) {
		return match(e.pol.exitApprovers)
	}
	for _, ra := range e.pol.routeApprovers {
		if ra.prefix.Bits() <= p.Bits() && ra.prefix.Contains(p.Addr()) && match(ra.who) {
			return true
		}
	}
	return false
}

// routedPath lists the autoApprovers that concern a destination outside
// the tailnet.
func (p *Policy) routedPath(a netip.Addr) *RoutedPath {
	rp := &RoutedPath{}
	names := func(sels []selector) string {
		var out []string
		for _, s := range sels {
			out = append(out, s.raw)
		}
		return strings.Join(out, ", ")
	}
	for _, ra := range p.routeApprovers {
		if ra.prefix.Contains(a) {
			rp.AutoApprovers = append(rp.AutoApprovers, fmt.Sprintf("%v by %s at %s", ra.prefix, names(ra.who), ra.pos))
		}
	}
	if len(p.exitApprovers) > 0 {
		rp.ExitNode = append(rp.ExitNode, names(p.exitApprovers))
	}
	return rp
}
