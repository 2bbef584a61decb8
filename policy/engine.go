package policy

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math/bits"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"

	"meshd.dev/meshd/netmap"
)

// Engine is a Policy compiled against the tailnet's nodes: it answers, per
// node, the inbound packet-filter rules, the peers the node may see and the
// capabilities a peer holds on it. It is safe for concurrent use.
//
// The compiled form is indexed so that one node's answer and one node's
// change cost what they touch, not a recompute for every node:
//
//   - nodes are indexed by identity key (a user, a tag, autogroup:member,
//     autogroup:tagged, "*");
//   - each destination selector of every rule is indexed by the same keys,
//     so FilterFor(n) visits only the rule targets that can match n;
//   - each rule keeps its resolved source addresses, sorted, computed on
//     first use; a node joining, leaving or changing identity or addresses
//     queues a change on only the rules whose sources it matched or now
//     matches, folded into the cached set by one merge on next use.
//
// The Engine satisfies control's Policy interface (CanSee, FilterFor,
// CheckTags). Keep it current with SetNodes, UpsertNode and RemoveNode;
// FilterFor given a non-nil node list also brings the index up to date.
type Engine struct {
	pol   *Policy
	rules []*crule

	// Rule indexes, built once per policy.
	dstByKey    map[idKey][]*tref   // node key -> targets whose dst selector has that key
	dstPrefix   []*tref             // targets whose dst is an address, CIDR or host
	dstSelf     []*tref             // autogroup:self targets
	dstInternet []*tref             // autogroup:internet targets: on exit nodes
	srcByKey    map[idKey][]*crule  // node key -> rules whose sources include it
	setsByKey   map[idKey][]*srcSet // node key -> distinct source sets including it
	srcOpen     []*crule            // rules whose src has "*" or an address/CIDR
	targetOrder int
	// visKey caches VisibilityKey: the rules never change after NewEngine.
	visKey func() [32]byte

	// mu guards the node index. Queries that only read it (Peers,
	// PeerCapsFor, FilterFor without a node list) share it, so the
	// coordinator's workers run them in parallel; each source set's cache,
	// which FilterFor fills, has its own lock.
	mu  sync.RWMutex
	gen uint64 // SetNodes generation, to find nodes no longer present
	// slots maps a dense slot to the node holding it (nil when free);
	// freeSlots are slots of removed nodes, reused by the next joins;
	// live has a bit set for each held slot. slotIDs are the slots' node
	// IDs, so that listing a peer set reads no node entry.
	slots     []*nodeEntry
	slotIDs   []netmap.NodeID
	freeSlots []int
	live      []uint64
	// lastAll is the node list of the last sync, to skip comparing node
	// fields when FilterFor is called again with the same values.
	lastAll []*netmap.Node
	nodes   map[netmap.NodeID]*nodeEntry
	// byKey lists the nodes under each index key in a slice, not a map:
	// Peers walks whole lists of them, and a slice of slots is read
	// without a hash or a pointer dereference per node.
	byKey map[idKey]*keyList
}

// keyList is the nodes under one index key. The lists of keys the policy
// names are made when it is compiled and kept while empty (pinned), so
// rule targets and source sets point at them and a query hashes no key.
type keyList struct {
	ms     []member
	pinned bool
}

// member is a node in one of the index's per-key lists.
type member struct {
	slot int32
	ne   *nodeEntry
}

// crule is a rule with its source side compiled.
type crule struct {
	r      *rule
	idx    int
	origin string
	// srcSet is shared by every rule with the same sources: policies name
	// the same group or tag in many rules, and each distinct source set is
	// resolved and kept current once.
	*srcSet
	targets []*tref
}

// srcSet is a resolved set of sources.
type srcSet struct {
	srcAny   bool
	srcKeys  map[idKey]bool
	srcPfx   []netip.Prefix // literal addresses, CIDRs and hosts
	srcIPs   []netip.Prefix // cache: every source address; valid when srcValid
	srcValid bool
	// pending are node joins and leaves not yet folded into srcIPs: a
	// join then costs one merge into the sorted cache on next use, not a
	// rebuild of a source set that may hold every device of the tailnet.
	pending []srcChange
	// mu guards srcIPs, srcValid and pending when the engine's lock is
	// only read-held (FilterFor fills the cache under a shared lock).
	mu sync.Mutex
	// lists are the index lists of srcKeys.
	lists []*keyList
}

// signature identifies the set's sources, to share it between rules.
func (ss *srcSet) signature() string {
	var parts []string
	if ss.srcAny {
		parts = append(parts, "*")
	}
	for k := range ss.srcKeys {
		parts = append(parts, fmt.Sprintf("%d:%s", k.kind, k.name))
	}
	for _, p := range ss.srcPfx {
		parts = append(parts, p.String())
	}
	slices.Sort(parts)
	return strings.Join(parts, "\x00")
}

type srcChange struct {
	add   bool
	addrs []netip.Prefix
}

// minPending is how many changes may queue on any rule before its source
// set is rebuilt from the index instead; larger sets queue up to an eighth
// of their size, since folding k changes costs O(n + k log k) against a
// rebuild's O(n log n).
const minPending = 64

// tref is one destination of a rule: an "ip" target, or (target == nil) an
// "app" capability destination.
type tref struct {
	rule   *crule
	order  int
	sel    selector
	target *target
	// dstLists are the index lists sel names, for the selector kinds
	// found by key.
	dstLists []*keyList
}

type nodeEntry struct {
	id      netmap.NodeID
	user    string
	tags    []string
	addrs   []netip.Prefix
	allowed []netip.Prefix
	keys    []idKey
	keyPos  []int32 // position in byKey[keys[i]]
	seen    uint64
	slot    int // dense index for peerSet
}

// entryFor describes n for matching. Entries kept in the index copy n's
// slices, since the index outlives them; transient ones (CanSee, FilterFor's
// own node) borrow them.
func entryFor(n *netmap.Node) *nodeEntry {
	e := transientEntry(n)
	e.addrs, e.allowed, e.tags = slices.Clone(e.addrs), slices.Clone(e.allowed), slices.Clone(e.tags)
	return e
}

func transientEntry(n *netmap.Node) *nodeEntry {
	e := &nodeEntry{id: n.ID, user: strings.ToLower(n.User), addrs: n.Addresses, allowed: n.AllowedIPs}
	e.tags = n.Tags
	cloned := false
	for i, t := range n.Tags {
		if lt := strings.ToLower(t); lt != t {
			if !cloned {
				e.tags, cloned = slices.Clone(n.Tags), true
			}
			e.tags[i] = lt
		}
	}
	e.keys = nodeKeys(e)
	if len(e.allowed) == 0 {
		e.allowed = e.addrs
	}
	return e
}

// idKey is an identity a node is indexed under and a selector matches:
// {selAny}, {selMember}, {selTagged}, {selUser, login} or {selTag, tag}.
// A struct rather than a "user:x" string so that building a node's keys
// costs no string concatenation.
type idKey struct {
	kind selKind
	name string
}

func userKey(u string) idKey { return idKey{selUser, u} }

// nodeKeys are the index keys a node is found under. A tagged node is a
// service identity: it is never one of its enrolling user's devices.
func nodeKeys(e *nodeEntry) []idKey {
	keys := make([]idKey, 1, 2+max(1, len(e.tags)))
	keys[0] = idKey{kind: selAny}
	switch {
	case len(e.tags) > 0:
		keys = append(keys, idKey{kind: selTagged})
		for _, t := range e.tags {
			keys = append(keys, idKey{selTag, t})
		}
	case e.user != "":
		keys = append(keys, idKey{kind: selMember}, userKey(e.user))
	}
	return keys
}

// selKeys are the index keys a selector matches.
func (p *Policy) selKeys(s selector) []idKey {
	switch s.kind {
	case selAny, selMember, selTagged:
		return []idKey{{kind: s.kind}}
	case selUser, selTag:
		return []idKey{{s.kind, s.name}}
	case selGroup:
		var ks []idKey
		for _, u := range p.groups[s.name] {
			ks = append(ks, userKey(u))
		}
		return ks
	}
	return nil
}

// NewEngine compiles p. Add the nodes with SetNodes.
func NewEngine(p *Policy) *Engine {
	e := &Engine{
		pol:       p,
		dstByKey:  map[idKey][]*tref{},
		srcByKey:  map[idKey][]*crule{},
		setsByKey: map[idKey][]*srcSet{},
		nodes:     map[netmap.NodeID]*nodeEntry{},
		byKey:     map[idKey]*keyList{},
	}
	sets := map[string]*srcSet{}
	for i := range p.rules {
		r := &p.rules[i]
		cr := &crule{r: r, idx: i, origin: r.origin(), srcSet: &srcSet{srcKeys: map[idKey]bool{}}}
		for _, s := range r.src {
			switch s.kind {
			case selAny:
				cr.srcAny = true
			case selPrefix:
				cr.srcPfx = append(cr.srcPfx, s.prefix)
			default:
				for _, k := range p.selKeys(s) {
					cr.srcKeys[k] = true
				}
			}
		}
		sig := cr.srcSet.signature()
		if shared, ok := sets[sig]; ok {
			cr.srcSet = shared
		} else {
			sets[sig] = cr.srcSet
			for k := range cr.srcKeys {
				e.setsByKey[k] = append(e.setsByKey[k], cr.srcSet)
				cr.lists = append(cr.lists, e.pinList(k))
			}
		}
		if cr.srcAny || len(cr.srcPfx) > 0 {
			e.srcOpen = append(e.srcOpen, cr)
		}
		for k := range cr.srcKeys {
			e.srcByKey[k] = append(e.srcByKey[k], cr)
		}
		for j := range r.targets {
			e.addTarget(cr, r.targets[j].dst, &r.targets[j])
		}
		for _, d := range r.capDsts {
			e.addTarget(cr, d, nil)
		}
		e.rules = append(e.rules, cr)
	}
	e.visKey = sync.OnceValue(e.visibilityKey)
	return e
}

func (e *Engine) addTarget(cr *crule, sel selector, t *target) {
	tr := &tref{rule: cr, order: e.targetOrder, sel: sel, target: t}
	e.targetOrder++
	cr.targets = append(cr.targets, tr)
	switch sel.kind {
	case selPrefix:
		e.dstPrefix = append(e.dstPrefix, tr)
	case selSelf:
		e.dstSelf = append(e.dstSelf, tr)
	case selInternet:
		e.dstInternet = append(e.dstInternet, tr)
	default:
		for _, k := range e.pol.selKeys(sel) {
			e.dstByKey[k] = append(e.dstByKey[k], tr)
			tr.dstLists = append(tr.dstLists, e.pinList(k))
		}
	}
}

// pinList returns the index list of k, made if need be, and keeps it
// while empty.
func (e *Engine) pinList(k idKey) *keyList {
	l := e.byKey[k]
	if l == nil {
		l = &keyList{}
		e.byKey[k] = l
	}
	l.pinned = true
	return l
}

// members returns the indexed nodes under k.
func (e *Engine) members(k idKey) []member {
	if l := e.byKey[k]; l != nil {
		return l.ms
	}
	return nil
}

// Policy returns the policy the engine was compiled from.
func (e *Engine) Policy() *Policy { return e.pol }

// SetNodes makes the engine's node set exactly all, updating only the nodes
// whose identity (user, tags) or addresses changed.
func (e *Engine) SetNodes(all []*netmap.Node) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.syncLocked(all)
}

func (e *Engine) syncLocked(all []*netmap.Node) {
	// Fast path: the same node values as last time (callers replace a
	// changed node rather than modify it, as control does), one pointer
	// comparison each.
	if len(all) > 0 && slices.Equal(all, e.lastAll) {
		return
	}
	defer func() { e.lastAll = append(e.lastAll[:0], all...) }()
	e.gen++
	seen := 0
	for _, n := range all {
		if n == nil {
			continue
		}
		e.upsertLocked(n) // a no-op when nothing relevant changed
		if ne := e.nodes[n.ID]; ne.seen != e.gen {
			ne.seen = e.gen
			seen++
		}
	}
	if seen == len(e.nodes) {
		return
	}
	for id, ne := range e.nodes {
		if ne.seen != e.gen {
			e.removeLocked(id)
		}
	}
}

// sameIdentity reports whether n still matches what the index holds.
func sameIdentity(old *nodeEntry, n *netmap.Node) bool {
	if len(old.tags) != len(n.Tags) || !slices.Equal(old.addrs, n.Addresses) {
		return false
	}
	for i, t := range n.Tags {
		if !strings.EqualFold(old.tags[i], t) {
			return false
		}
	}
	allowed := n.AllowedIPs
	if len(allowed) == 0 {
		allowed = n.Addresses
	}
	return strings.EqualFold(old.user, n.User) && slices.Equal(old.allowed, allowed)
}

// UpsertNode adds n or updates it after a change of user, tags or
// addresses. Only the rules whose sources n matched or now matches are
// invalidated.
func (e *Engine) UpsertNode(n *netmap.Node) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.upsertLocked(n)
}

// RemoveNode forgets a node.
func (e *Engine) RemoveNode(id netmap.NodeID) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.removeLocked(id)
}

func (e *Engine) upsertLocked(n *netmap.Node) {
	e.lastAll = e.lastAll[:0]
	if old, ok := e.nodes[n.ID]; ok {
		if sameIdentity(old, n) {
			return
		}
		e.removeLocked(n.ID)
	}
	ne := entryFor(n)
	if k := len(e.freeSlots); k > 0 {
		ne.slot, e.freeSlots = e.freeSlots[k-1], e.freeSlots[:k-1]
		e.slots[ne.slot], e.slotIDs[ne.slot] = ne, n.ID
	} else {
		ne.slot = len(e.slots)
		e.slots, e.slotIDs = append(e.slots, ne), append(e.slotIDs, n.ID)
		if ne.slot%64 == 0 {
			e.live = append(e.live, 0)
		}
	}
	e.live[ne.slot/64] |= 1 << uint(ne.slot%64)
	e.nodes[n.ID] = ne
	ne.keyPos = make([]int32, len(ne.keys))
	for i, k := range ne.keys {
		l := e.byKey[k]
		if l == nil {
			l = &keyList{}
			e.byKey[k] = l
		}
		ne.keyPos[i] = int32(len(l.ms))
		l.ms = append(l.ms, member{int32(ne.slot), ne})
		e.noteChange(k, true, ne.addrs)
	}
}

func (e *Engine) removeLocked(id netmap.NodeID) {
	e.lastAll = e.lastAll[:0]
	ne, ok := e.nodes[id]
	if !ok {
		return
	}
	delete(e.nodes, id)
	e.slots[ne.slot] = nil
	e.live[ne.slot/64] &^= 1 << uint(ne.slot%64)
	e.freeSlots = append(e.freeSlots, ne.slot)
	for i, k := range ne.keys {
		// Swap-remove, moving the list's last member into ne's place.
		l := e.byKey[k]
		pos, last := ne.keyPos[i], l.ms[len(l.ms)-1]
		l.ms[pos] = last
		last.ne.keyPos[slices.Index(last.ne.keys, k)] = pos
		l.ms[len(l.ms)-1] = member{}
		l.ms = l.ms[:len(l.ms)-1]
		if len(l.ms) == 0 && !l.pinned {
			delete(e.byKey, k)
		}
		e.noteChange(k, false, ne.addrs)
	}
}

// noteChange records that a node with addrs joined (add) or left the set
// of nodes under key, for every source set that includes key.
func (e *Engine) noteChange(key idKey, add bool, addrs []netip.Prefix) {
	for _, cr := range e.setsByKey[key] {
		if !cr.srcValid {
			continue
		}
		if len(cr.pending) >= max(minPending, len(cr.srcIPs)/8) {
			cr.srcValid, cr.srcIPs, cr.pending = false, nil, nil
			continue
		}
		cr.pending = append(cr.pending, srcChange{add: add, addrs: addrs})
	}
}

var allIPs = []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")}

// srcIPsLocked returns the set's source addresses, from the cache when
// no node it depends on changed. e.mu must be held, read or write.
func (e *Engine) srcIPsLocked(ss *srcSet) []netip.Prefix {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.srcValid && len(ss.pending) > 0 {
		ss.srcIPs = applyChanges(ss.srcIPs, ss.pending, ss.srcPfx)
		ss.pending = nil
	}
	if ss.srcValid {
		return ss.srcIPs
	}
	var ips []netip.Prefix
	if ss.srcAny {
		ips = slices.Clone(allIPs)
	} else {
		ips = slices.Clone(ss.srcPfx)
		for _, l := range ss.lists {
			for _, m := range l.ms {
				ips = append(ips, m.ne.addrs...)
			}
		}
		sortPrefixes(&ips)
	}
	ss.srcIPs, ss.srcValid = ips, true
	return ips
}

// applyChanges returns a new sorted source set: cur with the queued joins
// and leaves applied in order. cur itself is never modified, since earlier
// FilterFor results share it. Addresses in literal (the rule's own
// addresses and CIDRs) stay even when a node holding one leaves. Node
// addresses are unique in a tailnet, so a leave removes exactly that
// node's addresses.
func applyChanges(cur []netip.Prefix, changes []srcChange, literal []netip.Prefix) []netip.Prefix {
	final := map[netip.Prefix]bool{} // true: add, false: remove
	for _, c := range changes {
		for _, a := range c.addrs {
			final[a] = c.add
		}
	}
	var adds, dels []netip.Prefix
	for a, add := range final {
		switch {
		case add:
			adds = append(adds, a)
		case !slices.Contains(literal, a):
			dels = append(dels, a)
		}
	}
	sortPrefixes(&adds)
	sortPrefixes(&dels)
	out := make([]netip.Prefix, 0, len(cur)+len(adds))
	i, j, k := 0, 0, 0
	for i < len(cur) || j < len(adds) {
		var next netip.Prefix
		if j == len(adds) || i < len(cur) && netmap.ComparePrefix(cur[i], adds[j]) <= 0 {
			next = cur[i]
			i++
		} else {
			next = adds[j]
			j++
		}
		for k < len(dels) && netmap.ComparePrefix(dels[k], next) < 0 {
			k++
		}
		if k < len(dels) && dels[k] == next {
			continue
		}
		if len(out) > 0 && out[len(out)-1] == next {
			continue
		}
		out = append(out, next)
	}
	return out
}

func sortPrefixes(ps *[]netip.Prefix) {
	slices.SortFunc(*ps, netmap.ComparePrefix)
	*ps = slices.Compact(*ps)
}

// srcMatches reports whether node x is a source of rule cr.
func srcMatches(cr *crule, x *nodeEntry) bool {
	if cr.srcAny {
		return true
	}
	for _, k := range x.keys {
		if cr.srcKeys[k] {
			return true
		}
	}
	for _, p := range cr.srcPfx {
		for _, a := range x.allowed {
			if p.Overlaps(a) {
				return true
			}
		}
	}
	return false
}

// targetsFor returns the rule targets whose destination matches n, in
// policy order.
func (e *Engine) targetsFor(n *nodeEntry) []*tref {
	var out []*tref
	for _, k := range n.keys {
		out = append(out, e.dstByKey[k]...)
	}
	for _, tr := range e.dstPrefix {
		if prefixDst(tr.sel.prefix, n) && viaOK(tr.rule, n) {
			out = append(out, tr)
		}
	}
	if len(n.tags) == 0 && n.user != "" {
		out = append(out, e.dstSelf...)
	}
	if len(e.dstInternet) > 0 && isExitNode(n) {
		for _, tr := range e.dstInternet {
			if viaOK(tr.rule, n) {
				out = append(out, tr)
			}
		}
	}
	slices.SortFunc(out, func(a, b *tref) int { return a.order - b.order })
	return slices.CompactFunc(out, func(a, b *tref) bool { return a == b })
}

// dstNets returns the prefixes of n that sel names as a destination: its own
// addresses, every routed prefix but exit routes for "*", the internet
// for autogroup:internet on an exit node, or for an address or CIDR the
// parts of n's routed prefixes inside it.
func dstNets(sel selector, n *nodeEntry) []netip.Prefix {
	switch sel.kind {
	case selAny:
		return withoutExitRoutes(n)
	case selInternet:
		return internetNets(n)
	case selPrefix:
		var out []netip.Prefix
		for _, a := range n.allowed {
			if sel.prefix.Overlaps(a) {
				if sel.prefix.Bits() > a.Bits() {
					out = append(out, sel.prefix)
				} else {
					out = append(out, a)
				}
			}
		}
		return out
	}
	return n.addrs
}

// FilterFor returns the inbound packet-filter rules for n: the flows other
// nodes (and addresses) may open to n's addresses and routes, each naming
// its policy rule in Origin. If all is non-nil the engine's node set is
// first brought up to date with it: a pointer comparison per node when
// the list holds the same *Node values as last time (so replace a changed
// node, never modify one in place), else a field comparison per node and
// an index update per changed one. Pass nil when the engine is kept
// current with UpsertNode/RemoveNode. The returned SrcIPs slices are
// shared between calls and must not be modified.
func (e *Engine) FilterFor(n *netmap.Node, all []*netmap.Node) []netmap.FilterRule {
	if all != nil {
		e.mu.RLock()
		current := len(all) > 0 && slices.Equal(all, e.lastAll)
		e.mu.RUnlock()
		if !current {
			e.mu.Lock()
			e.syncLocked(all)
			e.mu.Unlock()
		}
	}
	e.mu.RLock()
	defer e.mu.RUnlock()
	self := transientEntry(n)
	out := []netmap.FilterRule{}
	// One FilterRule per rule and protocol set, merging that rule's
	// destinations, so a grant with many dst entries stays one rule.
	type mergeKey struct {
		rule   int
		protos string
		caps   bool
	}
	merged := map[mergeKey]int{}
	dirty := map[int]bool{} // merged rules that may hold duplicates
	for _, tr := range e.targetsFor(self) {
		nets := dstNets(tr.sel, self)
		var src []netip.Prefix
		if tr.sel.kind == selSelf {
			src = e.selfSourcesLocked(tr.rule, self)
		} else {
			src = e.srcIPsLocked(tr.rule.srcSet)
		}
		if len(src) == 0 || len(nets) == 0 {
			continue
		}
		if tr.target == nil {
			k := mergeKey{rule: tr.rule.idx, caps: true}
			if i, ok := merged[k]; ok && tr.sel.kind != selSelf {
				out[i].CapGrants[0].Dsts = append(out[i].CapGrants[0].Dsts, nets...)
				dirty[i] = true
				continue
			}
			merged[k] = len(out)
			out = append(out, netmap.FilterRule{
				SrcIPs:    src,
				CapGrants: []netmap.CapGrant{{Dsts: slices.Clone(nets), Caps: tr.rule.r.caps}},
				Origin:    tr.rule.origin,
			})
			continue
		}
		var ports []netmap.NetPortRange
		for _, d := range nets {
			for _, pr := range tr.target.ports {
				ports = append(ports, netmap.NetPortRange{Net: d, Ports: pr})
			}
		}
		k := mergeKey{rule: tr.rule.idx, protos: string(tr.target.protos)}
		if i, ok := merged[k]; ok && tr.sel.kind != selSelf {
			out[i].DstPorts = append(out[i].DstPorts, ports...)
			dirty[i] = true
			continue
		}
		if tr.sel.kind != selSelf {
			merged[k] = len(out)
		}
		out = append(out, netmap.FilterRule{
			SrcIPs:   src,
			DstPorts: ports,
			IPProto:  slices.Clone(tr.target.protos),
			Origin:   tr.rule.origin,
		})
	}
	for i := range dirty {
		r := &out[i]
		if len(r.CapGrants) > 0 {
			sortPrefixes(&r.CapGrants[0].Dsts)
			continue
		}
		// Keep the rule's own order (address, then ports as written) but
		// drop repeats, as when two dst entries name the same node.
		seen := make(map[netmap.NetPortRange]bool, len(r.DstPorts))
		r.DstPorts = slices.DeleteFunc(r.DstPorts, func(np netmap.NetPortRange) bool {
			dup := seen[np]
			seen[np] = true
			return dup
		})
	}
	return out
}

// selfSourcesLocked returns the addresses of n's owner's own untagged
// devices that are sources of cr (autogroup:self).
func (e *Engine) selfSourcesLocked(cr *crule, n *nodeEntry) []netip.Prefix {
	var ips []netip.Prefix
	for _, m := range e.members(userKey(n.user)) {
		if srcMatches(cr, m.ne) {
			ips = append(ips, m.ne.addrs...)
		}
	}
	sortPrefixes(&ips)
	return ips
}

// reaches reports whether x may open some flow to y (or holds an "app"
// capability on y). It allocates nothing: control calls CanSee for many
// pairs.
func (e *Engine) reaches(x, y *nodeEntry) bool {
	for _, k := range y.keys {
		for _, tr := range e.dstByKey[k] {
			if srcMatches(tr.rule, x) {
				return true
			}
		}
	}
	for _, tr := range e.dstPrefix {
		if prefixDst(tr.sel.prefix, y) && viaOK(tr.rule, y) && srcMatches(tr.rule, x) {
			return true
		}
	}
	if len(e.dstInternet) > 0 && isExitNode(y) {
		for _, tr := range e.dstInternet {
			if viaOK(tr.rule, y) && srcMatches(tr.rule, x) {
				return true
			}
		}
	}
	if len(y.tags) == 0 && y.user != "" && len(x.tags) == 0 && x.user == y.user {
		for _, tr := range e.dstSelf {
			if srcMatches(tr.rule, x) {
				return true
			}
		}
	}
	return false
}

// prefixDst reports whether an address or CIDR destination names part of
// n: one of its addresses or routed prefixes.
func prefixDst(p netip.Prefix, n *nodeEntry) bool {
	for _, a := range n.allowed {
		if p.Overlaps(a) {
			return true
		}
	}
	return false
}

// CanSee reports whether a may learn about b: either may reach the other.
// It needs no node index.
func (e *Engine) CanSee(a, b *netmap.Node) bool {
	if a.ID == b.ID {
		return true
	}
	ea, eb := transientEntry(a), transientEntry(b)
	return e.reaches(ea, eb) || e.reaches(eb, ea)
}

// Peers returns the IDs of the indexed nodes n may see (n itself
// excluded), sorted: every node that can reach n and every node n can
// reach. It costs the rules touching n plus the size of the answer, not a
// CanSee call per pair.
func (e *Engine) Peers(n *netmap.Node) []netmap.NodeID {
	e.mu.RLock()
	defer e.mu.RUnlock()
	self := transientEntry(n)
	set := make(peerSet, len(e.live))
	done := make([]bool, len(e.rules)) // each rule's sources added once
	// Who reaches n.
	for _, tr := range e.targetsFor(self) {
		cr := tr.rule
		if tr.sel.kind == selSelf {
			for _, m := range e.members(userKey(self.user)) {
				if srcMatches(cr, m.ne) {
					set.add(m.slot)
				}
			}
			continue
		}
		if !done[cr.idx] {
			done[cr.idx] = true
			e.addSources(cr, set)
		}
	}
	// Whom n reaches.
	clear(done)
	// matched: n is known to be a source of cr (found by one of n's keys).
	visit := func(cr *crule, matched bool) {
		if done[cr.idx] || !matched && !srcMatches(cr, self) {
			return
		}
		done[cr.idx] = true
		for _, tr := range cr.targets {
			e.addDests(tr, self, set)
		}
	}
	for _, cr := range e.srcOpen {
		visit(cr, false)
	}
	for _, k := range self.keys {
		for _, cr := range e.srcByKey[k] {
			visit(cr, true)
		}
	}
	return e.idsLocked(set, n.ID)
}

// idsLocked returns the IDs of the nodes in set but self, sorted.
func (e *Engine) idsLocked(set peerSet, self netmap.NodeID) []netmap.NodeID {
	count := 0
	for _, word := range set {
		count += bits.OnesCount64(word)
	}
	ids := make([]netmap.NodeID, 0, count)
	for w, word := range set {
		for word != 0 {
			b := bits.TrailingZeros64(word)
			word &^= 1 << b
			if id := e.slotIDs[w*64+b]; id != self {
				ids = append(ids, id)
			}
		}
	}
	// Slots are handed out in join order, which is mostly ID order: this
	// sort is nearly free.
	slices.Sort(ids)
	return ids
}

// peerSet is a set of indexed nodes, a bit per index slot: adding the
// thousands of nodes a wide rule names costs a bit each, not a map insert.
type peerSet []uint64

func (s peerSet) add(slot int32) { s[slot/64] |= 1 << uint(slot%64) }

func (s peerSet) has(slot int) bool { return s[slot/64]&(1<<uint(slot%64)) != 0 }

// addAll adds every indexed node.
func (s peerSet) addAll(live []uint64) {
	for i, w := range live {
		s[i] |= w
	}
}

func (e *Engine) addSources(cr *crule, set peerSet) {
	if cr.srcAny {
		set.addAll(e.live)
		return
	}
	for _, l := range cr.lists {
		for _, m := range l.ms {
			set.add(m.slot)
		}
	}
	if len(cr.srcPfx) > 0 {
		for slot, ne := range e.slots {
			if ne != nil && !set.has(slot) && srcMatches(cr, ne) {
				set.add(int32(slot))
			}
		}
	}
}

func (e *Engine) addDests(tr *tref, src *nodeEntry, set peerSet) {
	switch tr.sel.kind {
	case selSelf:
		if len(src.tags) == 0 && src.user != "" {
			for _, m := range e.members(userKey(src.user)) {
				set.add(m.slot)
			}
		}
	case selPrefix:
		for slot, ne := range e.slots {
			if ne != nil && !set.has(slot) && prefixDst(tr.sel.prefix, ne) && viaOK(tr.rule, ne) {
				set.add(int32(slot))
			}
		}
	case selInternet:
		for slot, ne := range e.slots {
			if ne != nil && !set.has(slot) && isExitNode(ne) && viaOK(tr.rule, ne) {
				set.add(int32(slot))
			}
		}
	case selAny:
		set.addAll(e.live)
	default:
		for _, l := range tr.dstLists {
			for _, m := range l.ms {
				set.add(m.slot)
			}
		}
	}
}

// PeerCaps returns the "app" capabilities peer holds on dst: what control
// puts in the Capabilities of peer's entry in dst's network map. Nil when
// none. Each grant counts once, even when several of its destinations name
// dst. To ask about every peer of one node, PeerCapsFor costs far less.
func (e *Engine) PeerCaps(dst, peer *netmap.Node) map[string][]json.RawMessage {
	d, p := transientEntry(dst), transientEntry(peer)
	var caps map[string][]json.RawMessage
	var last *crule // a rule's targets are adjacent in policy order
	for _, tr := range e.targetsFor(d) {
		if tr.target != nil || tr.rule == last {
			continue
		}
		if tr.sel.kind == selSelf && (len(p.tags) > 0 || p.user != d.user) {
			continue
		}
		if !srcMatches(tr.rule, p) {
			continue
		}
		last = tr.rule
		if caps == nil {
			caps = map[string][]json.RawMessage{}
		}
		mergeCaps(caps, tr.rule)
	}
	return caps
}

func mergeCaps(caps map[string][]json.RawMessage, cr *crule) {
	for name, vals := range cr.r.caps {
		caps[name] = append(caps[name], vals...)
	}
}

// PeerCapsFor returns the indexed nodes holding "app" capabilities on dst
// (dst itself excluded), IDs ascending, and what each holds: caps[i] is
// what PeerCaps(dst, p) returns for the node p with ID ids[i], and a node
// is absent when that is nil. Every holder is one of Peers(dst), so a
// caller walking dst's sorted peer list finds each one's capabilities by
// a cursor or a binary search, without hashing.
//
// dst's side (the grants whose capability destinations name it) is worked
// out once per call rather than once per pair, the holders come from the
// index like Peers, and peers holding capabilities through the same grants
// share one map: treat the maps as read-only. Like Peers, the answer is as
// current as the index (see FilterFor).
func (e *Engine) PeerCapsFor(dst *netmap.Node) (ids []netmap.NodeID, caps []map[string][]json.RawMessage) {
	e.mu.RLock()
	defer e.mu.RUnlock()
	d := transientEntry(dst)
	// The grants giving capabilities on dst, in policy order, each once,
	// with the nodes holding them.
	var rules []*crule
	var holders []peerSet
	var union peerSet
	var last *crule
	for _, tr := range e.targetsFor(d) {
		if tr.target != nil {
			continue
		}
		if tr.rule != last {
			last = tr.rule
			rules, holders = append(rules, tr.rule), append(holders, make(peerSet, len(e.live)))
		}
		set := holders[len(holders)-1]
		if tr.sel.kind == selSelf {
			// dst is an untagged user device (targetsFor), and the holders
			// are that user's own untagged devices among the sources.
			for _, m := range e.members(userKey(d.user)) {
				if srcMatches(tr.rule, m.ne) {
					set.add(m.slot)
				}
			}
		} else {
			e.addSources(tr.rule, set)
		}
	}
	if len(rules) == 0 {
		return nil, nil
	}
	union = holders[0]
	if len(holders) > 1 {
		union = make(peerSet, len(e.live))
		for _, set := range holders {
			for i, w := range set {
				union[i] |= w
			}
		}
	}
	count := 0
	for _, w := range union {
		count += bits.OnesCount64(w)
	}
	ids = make([]netmap.NodeID, 0, count)
	caps = make([]map[string][]json.RawMessage, 0, count)
	// Peers holding capabilities through the same grants get the same map:
	// a bit mask of the grants, as bytes, finds it. Neighbouring slots
	// mostly hold the same grants, so the last mask is tried first.
	shared := map[string]map[string][]json.RawMessage{}
	words := (len(rules) + 63) / 64
	mask := make([]uint64, words)
	var key, lastKey []byte
	var lastCaps map[string][]json.RawMessage
	for w, word := range union {
		for word != 0 {
			b := bits.TrailingZeros64(word)
			word &^= 1 << b
			slot := w*64 + b
			id := e.slotIDs[slot]
			if id == dst.ID {
				continue
			}
			clear(mask)
			for i, set := range holders {
				if set.has(slot) {
					mask[i/64] |= 1 << uint(i%64)
				}
			}
			key = key[:0]
			for _, m := range mask {
				key = binary.LittleEndian.AppendUint64(key, m)
			}
			ids = append(ids, id)
			if lastCaps != nil && bytes.Equal(key, lastKey) {
				caps = append(caps, lastCaps)
				continue
			}
			c, ok := shared[string(key)]
			if !ok {
				c = map[string][]json.RawMessage{}
				for i, cr := range rules {
					if mask[i/64]&(1<<uint(i%64)) != 0 {
						mergeCaps(c, cr)
					}
				}
				shared[string(key)] = c
			}
			caps = append(caps, c)
			key, lastKey, lastCaps = lastKey, key, c
		}
	}
	// Slots are handed out in join order, mostly ID order.
	if !slices.IsSorted(ids) {
		sort.Sort(holdersByID{ids, caps})
	}
	return ids, caps
}

// holdersByID sorts PeerCapsFor's two answers together.
type holdersByID struct {
	ids  []netmap.NodeID
	caps []map[string][]json.RawMessage
}

func (h holdersByID) Len() int           { return len(h.ids) }
func (h holdersByID) Less(i, j int) bool { return h.ids[i] < h.ids[j] }
func (h holdersByID) Swap(i, j int) {
	h.ids[i], h.ids[j] = h.ids[j], h.ids[i]
	h.caps[i], h.caps[j] = h.caps[j], h.caps[i]
}

// CheckTags reports whether the requester may apply the requested tags; see
// Policy.CheckTags.
func (e *Engine) CheckTags(user string, keyTags []string, requested []string) error {
	return e.pol.CheckTags(user, keyTags, requested)
}

// OwnedByTags reports whether owners own every one of tags; see
// Policy.OwnedByTags.
func (e *Engine) OwnedByTags(owners, tags []string) bool {
	return e.pol.OwnedByTags(owners, tags)
}
