package policy

import (
	"crypto/sha256"
	"fmt"
	"slices"
	"strings"
)

// VisibilityKey identifies the visibility relation of the engine's rules:
// which pairs of nodes CanSee and Peers connect. Two engines with the same
// key answer both alike for any nodes, whatever their rules' ports,
// protocols, capabilities, origins or order; a policy change that keeps
// the key changes no node's peers, only filters, and the coordinator then
// skips listing every node's peers under both policies.
//
// The key is a digest of the set of (sources, destination, via) triples
// the rules make, each part as the index resolves it (groups to their
// users, hosts to prefixes). Unequal keys may still describe one relation
// (a rule whose group is empty, say): the key is exact one way only, which
// is the way that matters.
func (e *Engine) VisibilityKey() [sha256.Size]byte {
	return e.visKey()
}

func (e *Engine) visibilityKey() [sha256.Size]byte {
	var triples []string
	for _, cr := range e.rules {
		src := cr.srcSet.signature()
		var via []string
		for _, v := range cr.r.via {
			via = append(via, v.name)
		}
		slices.Sort(via)
		for _, tr := range cr.targets {
			triples = append(triples, strings.Join([]string{src, e.dstSignature(tr), strings.Join(via, "\x00")}, "\x01"))
		}
	}
	slices.Sort(triples)
	triples = slices.Compact(triples)
	h := sha256.New()
	for _, t := range triples {
		// Length-prefixed, so that no two sets run together alike.
		fmt.Fprintf(h, "%d:%s", len(t), t)
	}
	return [sha256.Size]byte(h.Sum(nil))
}

// dstSignature identifies the nodes a target's destination names, as
// addDests and reaches find them.
func (e *Engine) dstSignature(tr *tref) string {
	switch tr.sel.kind {
	case selPrefix:
		return "prefix " + tr.sel.prefix.String()
	case selSelf:
		return "self"
	case selInternet:
		return "internet"
	}
	var keys []string
	for _, k := range e.pol.selKeys(tr.sel) {
		keys = append(keys, fmt.Sprintf("%d:%s", k.kind, k.name))
	}
	slices.Sort(keys)
	return "keys " + strings.Join(slices.Compact(keys), "\x00")
}

// GrantsCapabilities reports whether any rule carries "app" capabilities:
// when it does not, no node's filter has CapGrants and no peer entry has
// capabilities, and the coordinator asks for neither.
func (e *Engine) GrantsCapabilities() bool {
	for _, cr := range e.rules {
		if len(cr.r.capDsts) > 0 {
			return true
		}
	}
	return false
}
