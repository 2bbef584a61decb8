package control

import (
	"encoding/json"
	"net/netip"

	"meshd.dev/meshd/netmap"
)

// Policy decides what nodes may learn about and send to each other. The
// policy engine (package policy) provides the real one; until one is set the
// coordinator runs the bootstrap default. Implementations must be safe for
// concurrent use: a policy change computes every node's update in parallel
// (the optional interfaces below included).
type Policy interface {
	// CanSee reports whether node a may learn about node b (either may reach
	// the other). It must be a pure function of the two nodes.
	CanSee(a, b *netmap.Node) bool
	// FilterFor returns the inbound packet-filter rules for node n given all
	// nodes.
	FilterFor(n *netmap.Node, all []*netmap.Node) []netmap.FilterRule
	// CheckTags reports whether the requester (a user, or an auth key's tags)
	// may apply the requested tags. This is the tagOwners hook.
	CheckTags(user string, keyTags []string, requested []string) error
}

// TagOwnership is implemented by policies with "tagOwners"
// (policy.Engine): OwnedByTags reports whether every one of tags is owned
// by one of owners, which are tags too (carrying a tag is not owning it).
// Registration uses it so that tags a node advertises which its auth key's
// tags own replace the key's tags rather than join them, as a tenant's
// enrolment key creates that tenant's GPU nodes. Policies without it (the
// bootstrap default) always join.
type TagOwnership interface {
	OwnedByTags(owners, tags []string) bool
}

// NodeIndexer is implemented by policies that index the node list so that
// FilterFor costs what it touches (policy.Engine). The coordinator keeps such
// a policy current with every node change and then calls FilterFor with a
// nil node list.
type NodeIndexer interface {
	SetNodes(all []*netmap.Node)
	UpsertNode(n *netmap.Node)
	RemoveNode(id netmap.NodeID)
}

// PeerCapper is implemented by policies with "app" grants (policy.Engine):
// PeerCaps returns the capabilities peer holds on dst, which the coordinator
// puts in the Capabilities of peer's entry in dst's map.
//
// A capability is granted through the destination's packet filter, as in
// Tailscale (a FilterRule's CapGrants): PeerCaps(dst, peer) must be empty
// when FilterFor(dst) has no rule with CapGrants. The coordinator relies on
// it to skip the per-pair PeerCaps calls for such nodes, which under most
// policies (no "app" grants) is every node.
type PeerCapper interface {
	PeerCaps(dst, peer *netmap.Node) map[string][]json.RawMessage
}

// PeerCapsBatcher is implemented by indexing policies with "app" grants
// (policy.Engine): PeerCapsFor returns the indexed nodes holding
// capabilities on dst, IDs ascending, and what each holds (caps[i] is
// what PeerCaps(dst, p) returns for the node with ID ids[i]; nodes for
// which that is nil are absent), working out dst's side once instead of
// once per pair. The maps may be shared between peers and must not be
// modified. The coordinator uses it, when the policy is also a current
// NodeIndexer, wherever it needs the capabilities of many of one node's
// peers (a policy change, a full map).
type PeerCapsBatcher interface {
	PeerCapsFor(dst *netmap.Node) (ids []netmap.NodeID, caps []map[string][]json.RawMessage)
}

// PeerLister is implemented by indexing policies (policy.Engine): Peers
// returns the IDs of the nodes n may see, sorted ascending, n excluded,
// consistent with CanSee. The coordinator uses it, when the policy is also
// a NodeIndexer, to compute whole peer lists on a policy change without a
// CanSee call per pair of nodes.
type PeerLister interface {
	Peers(n *netmap.Node) []netmap.NodeID
}

// VisibilityKeyer is implemented by policies that can tell when two of
// them connect the same pairs of nodes (policy.Engine): VisibilityKey is
// equal for two policies only if CanSee and Peers answer alike under both,
// for any nodes. A policy change between two such policies (one that
// alters ports, say) lists no node's peers unless capabilities or exit
// nodes need them.
type VisibilityKeyer interface {
	VisibilityKey() [32]byte
}

// CapabilityGranter is implemented by policies that can tell they carry no
// "app" capabilities at all (policy.Engine): GrantsCapabilities is false
// only if no FilterFor result has CapGrants. A policy change away from one
// that grants none skips the old filter of every node.
type CapabilityGranter interface {
	GrantsCapabilities() bool
}

// grantsCapabilities reports whether p may grant capabilities.
func grantsCapabilities(p Policy) bool {
	if g, ok := p.(CapabilityGranter); ok {
		return g.GrantsCapabilities()
	}
	return true
}

// sameVisibility reports whether a and b provably connect the same pairs
// of nodes.
func sameVisibility(a, b Policy) bool {
	x, ok1 := a.(VisibilityKeyer)
	y, ok2 := b.(VisibilityKeyer)
	return ok1 && ok2 && x.VisibilityKey() == y.VisibilityKey()
}

// bootstrapPolicy is in force while no policy is loaded: every node sees
// every other, inbound traffic from any tailnet address is allowed, and any
// tag may be applied.
type bootstrapPolicy struct{ rules []netmap.FilterRule }

func newBootstrapPolicy() bootstrapPolicy {
	return bootstrapPolicy{rules: []netmap.FilterRule{{
		SrcIPs: []netip.Prefix{IPv4Pool, IPv6Pool},
		DstPorts: []netmap.NetPortRange{
			{Net: IPv4Pool, Ports: netmap.AllPorts},
			{Net: IPv6Pool, Ports: netmap.AllPorts},
		},
		Origin: "bootstrap: no policy loaded, allow all",
	}}}
}

func (bootstrapPolicy) CanSee(a, b *netmap.Node) bool { return true }

func (p bootstrapPolicy) FilterFor(*netmap.Node, []*netmap.Node) []netmap.FilterRule {
	return p.rules
}

func (bootstrapPolicy) CheckTags(string, []string, []string) error { return nil }
