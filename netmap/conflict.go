package netmap

import (
	"cmp"
	"fmt"
	"slices"
	"strings"
)

// KeyConflict is a key that more than one node of a map claims: peers
// sharing a node key or disco key, or a peer claiming one of ours.
type KeyConflict struct {
	Kind  string   // "node key" or "disco key"
	Key   string   // short form, for logs
	Peers []NodeID // the peers that claim it, sorted; all were dropped
	Self  bool     // one of the claims is our own key
}

func (c KeyConflict) String() string {
	ids := make([]string, len(c.Peers))
	for i, id := range c.Peers {
		ids[i] = fmt.Sprint(id)
	}
	who := "peers " + strings.Join(ids, ", ")
	if c.Self {
		who += " and this node"
	}
	return fmt.Sprintf("%s %s claimed by %s", c.Kind, c.Key, who)
}

// DropKeyConflicts removes from m every peer whose node key or (non-zero)
// disco key another peer of m also claims, or that equals this node's own,
// and reports each conflict. All claimants go, not all but one: a map
// cannot tell the genuine holder from an impostor, and keeping either
// would route one node's traffic or paths by another's identity (keyed by
// node key, the last one configured would get the other's allowed IPs).
// A coordinator that keeps keys unique never sends such a map; this is
// the node's own defence against one that does (an older, buggy or
// hostile coordinator), so every consumer of m sees one node per key.
func (m *NetworkMap) DropKeyConflicts() []KeyConflict {
	byNode := make(map[NodePublic][]NodeID, len(m.Peers))
	byDisco := make(map[DiscoPublic][]NodeID, len(m.Peers))
	for id, p := range m.Peers {
		byNode[p.NodeKey] = append(byNode[p.NodeKey], id)
		if !p.DiscoKey.IsZero() {
			byDisco[p.DiscoKey] = append(byDisco[p.DiscoKey], id)
		}
	}
	var out []KeyConflict
	add := func(kind, key string, ids []NodeID, self bool) {
		if len(ids) < 2 && !self {
			return
		}
		ids = slices.Clone(ids)
		slices.Sort(ids)
		out = append(out, KeyConflict{Kind: kind, Key: key, Peers: ids, Self: self})
	}
	for k, ids := range byNode {
		add("node key", k.ShortString(), ids, k == m.Self.NodeKey)
	}
	for k, ids := range byDisco {
		add("disco key", k.ShortString(), ids, k == m.Self.DiscoKey)
	}
	for _, c := range out {
		for _, id := range c.Peers {
			delete(m.Peers, id)
		}
	}
	slices.SortFunc(out, func(a, b KeyConflict) int {
		if c := strings.Compare(a.Kind, b.Kind); c != 0 {
			return c
		}
		return cmp.Compare(a.Peers[0], b.Peers[0])
	})
	return out
}
