package filter

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"
	"sync/atomic"

	"github.com/gaissmai/bart"

	"meshd.dev/meshd/netmap"
	"meshd.dev/meshd/packet"
)

// smallSet is the size up to which prefix sets are scanned linearly instead
// of going through a bart table: for a handful of prefixes a few mask
// compares beat a trie walk, and real policies usually have one or two
// destination prefixes per node.
const smallSet = 8

// defaultProtos is what an empty FilterRule.IPProto means.
var defaultProtos = []uint8{protoTCP, protoUDP, protoICMPv4, protoICMPv6}

// Rules is a compiled, immutable packet filter for traffic arriving at one
// node. A lookup costs the same whatever the number of rules: the protocol
// indexes an array, the destination port is binary-searched among the
// policy's distinct port-range boundaries, and destination and source are
// longest-prefix lookups in tables built for that (protocol, port interval).
// No lookup ever walks the rule list.
//
// A Rules value is safe for concurrent use and is never modified after
// Compile returns.
type Rules struct {
	protos [256]*protoRules
	local  prefixList // this node's addresses and routes; empty: no check
	// dstsLocal: every rule destination lies inside local, so a packet a
	// rule allows is local and the per-packet local check can be skipped.
	dstsLocal     bool
	localPrefixes []netip.Prefix
	origins       []string // by rule index
	n             int
}

// protoRules is the lookup structure of one IP protocol.
type protoRules struct {
	// bounds are the first ports of the elementary port intervals:
	// interval i is [bounds[i], bounds[i+1]-1]. bounds[0] is 0.
	// Portless protocols have a single interval.
	bounds []uint16
	cells  []*dstTable // by interval
	// byPort maps a port straight to its interval when there are at most
	// 256 intervals (nearly always): one load from a 64 KiB table instead
	// of a binary search whose every step waits on the previous load.
	byPort []uint8
}

// dstTable maps a destination address to the sources allowed to reach it.
// Nested destination prefixes are merged at compile time (a /32 inside a /24
// also carries the /24's sources), so one longest-prefix match suffices.
type dstTable struct {
	small netList   // value: index into srcs
	srcs  []*srcSet // for small
	big   *bart.Table[*srcSet]
}

// srcSet is a set of source prefixes; the value of each is the index of a
// rule that allows it (for explaining a verdict). Policies name hosts far
// more often than subnets, so single addresses go into flat hash sets (one
// multiply and usually one probe) and only real prefixes into a short
// mask-compare list or, when there are many, a bart trie.
type srcSet struct {
	hosts4 hostSet4
	hosts6 hostSet6
	small  netList // non-host prefixes; value: rule index
	big    *bart.Table[int32]
}

// prefixList is a set of prefixes without values.
type prefixList struct {
	small netList
	big   *bart.Lite
}

func (l *prefixList) empty() bool { return l.small.len() == 0 && l.big == nil }

func (l *prefixList) contains(a packet.Addr) bool {
	if l.big != nil {
		return l.big.Contains(a.Netip())
	}
	return l.small.lookup(a) >= 0
}

func (d *dstTable) lookup(a packet.Addr) *srcSet {
	if d.big != nil {
		s, _ := d.big.Lookup(a.Netip())
		return s
	}
	if i := d.small.lookup(a); i >= 0 {
		return d.srcs[i]
	}
	return nil
}

func (s *srcSet) lookup(a packet.Addr) int32 {
	if a.Is4() {
		if r := s.hosts4.get(a.V4()); r >= 0 {
			return r
		}
	} else if r := s.hosts6.get(a.Hi, a.Lo); r >= 0 {
		return r
	}
	return s.lookupNets(a)
}

// lookupNets is lookup without the host sets, for a caller that has
// already asked them.
func (s *srcSet) lookupNets(a packet.Addr) int32 {
	if s.big != nil {
		if r, ok := s.big.Lookup(a.Netip()); ok {
			return r
		}
		return -1
	}
	return s.small.lookup(a)
}

// allowed reports whether a rule allows a packet of proto from src to
// dst:dport (dport is ignored for portless protocols).
func (r *Rules) allowed(proto uint8, src, dst packet.Addr, dport uint16) bool {
	return r.match(proto, src, dst, dport) >= 0
}

// match returns the index of a rule allowing a packet of proto from src to
// dst:dport, or -1. Portless protocols ignore dport.
func (r *Rules) match(proto uint8, src, dst packet.Addr, dport uint16) int32 {
	pr := r.protos[proto]
	if pr == nil {
		return -1
	}
	i := 0
	switch {
	case pr.byPort != nil:
		i = int(pr.byPort[dport])
	case len(pr.bounds) > 1:
		// Largest i with bounds[i] <= dport; bounds[0] == 0.
		lo, hi := 0, len(pr.bounds)
		for hi-lo > 1 {
			m := int(uint(lo+hi) >> 1)
			if pr.bounds[m] <= dport {
				lo = m
			} else {
				hi = m
			}
		}
		i = lo
	}
	cell := pr.cells[i]
	if cell == nil {
		return -1
	}
	srcs := cell.lookup(dst)
	if srcs == nil {
		return -1
	}
	return srcs.lookup(src)
}

// allows reports whether a rule lets p, a packet with ports, in. It is
// match and the local check for the most common case spelled out: a port
// index, a short destination list and the source host sets, read straight
// from p, without the calls and family tests of the general lookups
// (measured: a third of the accept path). Anything else goes through
// match.
func (r *Rules) allows(p *packet.Parsed) bool {
	pr := r.protos[p.Proto]
	if pr == nil {
		return false
	}
	if pr.byPort == nil || !r.dstsLocal {
		return r.match(p.Proto, p.Src, p.Dst, p.DstPort) >= 0 && r.isLocal(p.Dst)
	}
	cell := pr.cells[pr.byPort[p.DstPort]]
	if cell == nil {
		return false
	}
	if cell.big != nil {
		srcs := cell.lookup(p.Dst)
		return srcs != nil && srcs.lookup(p.Src) >= 0
	}
	var srcs *srcSet
	if p.Dst.Is4() {
		dst := p.Dst.V4()
		for i := range cell.small.v4 {
			if n := &cell.small.v4[i]; dst&n.mask == n.net {
				srcs = cell.srcs[n.val]
				break
			}
		}
	} else {
		for i := range cell.small.v6 {
			if n := &cell.small.v6[i]; p.Dst.Hi&n.mhi == n.hi && p.Dst.Lo&n.mlo == n.lo {
				srcs = cell.srcs[n.val]
				break
			}
		}
	}
	if srcs == nil {
		return false
	}
	if p.Src.Is4() {
		return srcs.hosts4.get(p.Src.V4()) >= 0 || srcs.lookupNets(p.Src) >= 0
	}
	return srcs.hosts6.get(p.Src.Hi, p.Src.Lo) >= 0 || srcs.lookupNets(p.Src) >= 0
}

// Len is the number of rules compiled.
func (r *Rules) Len() int { return r.n }

// Match reports whether the rules allow a new flow of proto from src to
// dst:dstPort, and the Origin of a rule that does. For ICMP and other
// portless protocols dstPort is ignored. It does not consult flow state:
// it answers "would the policy let this flow open", for explaining drops.
func (r *Rules) Match(proto uint8, src, dst netip.Addr, dstPort uint16) (origin string, ok bool) {
	s, d := packet.AddrFromNetip(src), packet.AddrFromNetip(dst)
	if !r.isLocal(d) {
		return "", false
	}
	i := r.match(proto, s, d, dstPort)
	if i < 0 {
		return "", false
	}
	return r.origins[i], true
}

func (r *Rules) isLocalPrefix(p netip.Prefix) bool {
	if r.local.empty() {
		return true
	}
	if r.local.big != nil {
		return r.local.big.LookupPrefix(p)
	}
	for _, l := range r.localPrefixes {
		if l.Bits() <= p.Bits() && l.Contains(p.Addr()) {
			return true
		}
	}
	return false
}

func (r *Rules) isLocal(a packet.Addr) bool {
	return r.local.empty() || r.local.contains(a)
}

// hasPorts reports whether rules for proto are keyed by destination port.
func hasPorts(proto uint8) bool {
	return proto == protoTCP || proto == protoUDP || proto == protoSCTP
}

// atom is one (rule, destination prefix, port range) of the input.
type atom struct {
	rule  int32
	group int32 // identical SrcIPs lists share a group
	dst   netip.Prefix
	first uint16
	last  uint16
}

// compiler holds the caches that keep compilation of large policies fast
// and the result small: identical source lists, identical rule sets per
// cell, and identical source unions are each built once.
type compiler struct {
	rules  []netmap.FilterRule
	groups [][]netip.Prefix // by group id
	cells  map[string]*dstTable
	srcs   map[string]*srcSet
	key    []byte
}

// Compile builds the lookup structure for rules, which describe traffic
// arriving at a node whose own addresses and served routes are local
// (inbound packets to other destinations are dropped; nil disables the
// check). It rejects invalid prefixes and port ranges with the rule's index
// and Origin. CapGrants are ignored: they match no packets.
func Compile(rules []netmap.FilterRule, local []netip.Prefix) (*Rules, error) {
	out := &Rules{n: len(rules), origins: make([]string, len(rules))}
	for i, p := range local {
		if !p.IsValid() {
			return nil, fmt.Errorf("filter: local prefix %d is invalid", i)
		}
	}
	out.local = newPrefixList(local)
	out.localPrefixes = slices.Clone(local)

	c := &compiler{
		rules: rules,
		cells: make(map[string]*dstTable),
		srcs:  make(map[string]*srcSet),
	}
	groupIDs := make(map[string]int32)
	var rawKey []byte
	var byProto [256][]atom
	for i, rule := range rules {
		out.origins[i] = rule.Origin
		where := fmt.Sprintf("rule %d", i)
		if rule.Origin != "" {
			where += " (" + rule.Origin + ")"
		}
		// Policies give many rules the same source list (a tag, a group):
		// key the raw list first so each distinct list is normalised and
		// built into tables once.
		rawKey = rawKey[:0]
		for _, s := range rule.SrcIPs {
			if !s.IsValid() {
				return nil, fmt.Errorf("filter: %s: invalid source prefix %q", where, s)
			}
			a := s.Addr().As16()
			rawKey = append(rawKey, a[:]...)
			rawKey = append(rawKey, byte(s.Bits()), byte(len(s.Addr().AsSlice())))
		}
		g, ok := groupIDs[string(rawKey)]
		if !ok {
			srcs := make([]netip.Prefix, 0, len(rule.SrcIPs))
			for _, s := range rule.SrcIPs {
				srcs = append(srcs, s.Masked())
			}
			slices.SortFunc(srcs, netip.Prefix.Compare)
			srcs = slices.Compact(srcs)
			g = int32(len(c.groups))
			groupIDs[string(rawKey)] = g
			c.groups = append(c.groups, srcs)
		}
		nsrcs := len(c.groups[g])
		protos := defaultProtos
		if len(rule.IPProto) > 0 {
			protos = slices.Clone(rule.IPProto)
			slices.Sort(protos)
			protos = slices.Compact(protos)
		}
		for _, d := range rule.DstPorts {
			if !d.Net.IsValid() {
				return nil, fmt.Errorf("filter: %s: invalid destination prefix %q", where, d.Net)
			}
			if d.Ports.First > d.Ports.Last {
				return nil, fmt.Errorf("filter: %s: port range %d-%d is empty", where, d.Ports.First, d.Ports.Last)
			}
			if nsrcs == 0 {
				continue
			}
			a := atom{rule: int32(i), group: g, dst: d.Net.Masked(), first: d.Ports.First, last: d.Ports.Last}
			for _, p := range protos {
				if !hasPorts(p) && p != protoICMPv4 && p != protoICMPv6 && (a.first != 0 || a.last != 65535) {
					// A port range means nothing for a portless protocol;
					// only an all-ports rule opens it (as in Tailscale).
					continue
				}
				byProto[p] = append(byProto[p], a)
			}
		}
	}
	out.dstsLocal = true
	for p := range byProto {
		for _, a := range byProto[p] {
			if !out.isLocalPrefix(a.dst) {
				out.dstsLocal = false
			}
		}
		if len(byProto[p]) > 0 {
			out.protos[p] = c.protoRules(uint8(p), byProto[p])
		}
	}
	return out, nil
}

func newPrefixList(ps []netip.Prefix) prefixList {
	if len(ps) <= smallSet {
		return prefixList{small: newNetList(ps, make([]int32, len(ps)))}
	}
	lite := new(bart.Lite)
	for _, p := range ps {
		lite.Insert(p)
	}
	return prefixList{big: lite}
}

func (c *compiler) protoRules(proto uint8, atoms []atom) *protoRules {
	pr := &protoRules{}
	if !hasPorts(proto) {
		pr.bounds = []uint16{0}
		pr.cells = []*dstTable{c.cell(atoms)}
		return pr
	}
	bounds := []uint16{0}
	for _, a := range atoms {
		bounds = append(bounds, a.first)
		if a.last < 65535 {
			bounds = append(bounds, a.last+1)
		}
	}
	slices.Sort(bounds)
	bounds = slices.Compact(bounds)

	// Sweep the intervals; an atom is active in every interval its range
	// covers. Adjacent intervals with the same atoms share one cell.
	slices.SortFunc(atoms, func(x, y atom) int { return int(x.first) - int(y.first) })
	var active []atom
	next := 0
	for _, start := range bounds {
		for next < len(atoms) && atoms[next].first <= start {
			active = append(active, atoms[next])
			next++
		}
		active = slices.DeleteFunc(active, func(a atom) bool { return a.last < start })
		cell := c.cell(active)
		if n := len(pr.cells); n > 0 && pr.cells[n-1] == cell {
			continue
		}
		pr.bounds = append(pr.bounds, start)
		pr.cells = append(pr.cells, cell)
	}
	if len(pr.cells) > 1 && len(pr.cells) <= 256 {
		pr.byPort = make([]uint8, 65536)
		for i, start := range pr.bounds {
			end := 65536
			if i+1 < len(pr.bounds) {
				end = int(pr.bounds[i+1])
			}
			for port := int(start); port < end; port++ {
				pr.byPort[port] = uint8(i)
			}
		}
	}
	return pr
}

// cell builds (or reuses) the destination table for a set of active atoms.
func (c *compiler) cell(active []atom) *dstTable {
	if len(active) == 0 {
		return nil
	}
	sorted := slices.Clone(active)
	slices.SortFunc(sorted, func(x, y atom) int {
		if x.rule != y.rule {
			return int(x.rule - y.rule)
		}
		return x.dst.Compare(y.dst)
	})
	c.key = c.key[:0]
	for _, a := range sorted {
		c.key = binary.AppendUvarint(c.key, uint64(a.rule))
		c.key = append(c.key, a.dst.Addr().AsSlice()...)
		c.key = append(c.key, byte(a.dst.Bits()))
	}
	if t, ok := c.cells[string(c.key)]; ok {
		return t
	}

	// Group by destination prefix, then give each prefix the sources of
	// every prefix that contains it, so the longest match is complete.
	var dsts []netip.Prefix
	for _, a := range sorted {
		dsts = append(dsts, a.dst)
	}
	slices.SortFunc(dsts, netip.Prefix.Compare)
	dsts = slices.Compact(dsts)
	t := &dstTable{}
	srcs := make([]*srcSet, 0, len(dsts))
	for _, d := range dsts {
		// rep[group] = lowest rule index contributing that source group.
		rep := make(map[int32]int32)
		for _, a := range sorted {
			if a.dst.Bits() <= d.Bits() && a.dst.Contains(d.Addr()) {
				if r, ok := rep[a.group]; !ok || a.rule < r {
					rep[a.group] = a.rule
				}
			}
		}
		srcs = append(srcs, c.srcSet(rep))
	}
	if len(dsts) <= smallSet {
		idx := make([]int32, len(dsts))
		for i := range idx {
			idx[i] = int32(i)
		}
		t.small, t.srcs = newNetList(dsts, idx), srcs
	} else {
		t.big = new(bart.Table[*srcSet])
		for i, d := range dsts {
			t.big.Insert(d, srcs[i])
		}
	}
	c.cells[string(c.key)] = t
	return t
}

// srcSet builds (or reuses) the union of the source groups in rep, each
// source prefix labelled with the lowest rule that grants it.
func (c *compiler) srcSet(rep map[int32]int32) *srcSet {
	groups := make([]int32, 0, len(rep))
	for g := range rep {
		groups = append(groups, g)
	}
	slices.Sort(groups)
	var key []byte
	for _, g := range groups {
		key = binary.AppendUvarint(key, uint64(g))
		key = binary.AppendUvarint(key, uint64(rep[g]))
	}
	if s, ok := c.srcs[string(key)]; ok {
		return s
	}
	label := make(map[netip.Prefix]int32)
	for _, g := range groups {
		for _, p := range c.groups[g] {
			if r, ok := label[p]; !ok || rep[g] < r {
				label[p] = rep[g]
			}
		}
	}
	s := &srcSet{}
	var h4 []hostRule4
	var h6 []hostRule6
	var prefixes []netip.Prefix
	var rules []int32
	for p, r := range label {
		switch {
		case p.IsSingleIP() && p.Addr().Is4():
			h4 = append(h4, hostRule4{key: binary.BigEndian.Uint32(p.Addr().AsSlice()), rule: r})
		case p.IsSingleIP():
			a := p.Addr().As16()
			h6 = append(h6, hostRule6{hi: binary.BigEndian.Uint64(a[:8]), lo: binary.BigEndian.Uint64(a[8:]), rule: r})
		default:
			prefixes = append(prefixes, p)
			rules = append(rules, r)
		}
	}
	s.hosts4 = newHostSet4(h4)
	s.hosts6 = newHostSet6(h6)
	if len(prefixes) <= smallSet {
		s.small = newNetList(prefixes, rules)
	} else {
		s.big = new(bart.Table[int32])
		for i, p := range prefixes {
			s.big.Insert(p, rules[i])
		}
	}
	c.srcs[string(key)] = s
	return s
}

// portSet is a set of TCP and UDP port numbers, safe for concurrent use;
// ports are only ever added.
type portSet struct {
	bits [2][65536 / 64]atomic.Uint64 // [0] TCP, [1] UDP
}

func portSetRow(proto uint8) int {
	if proto == protoUDP {
		return 1
	}
	return 0
}

func (s *portSet) has(proto uint8, port uint16) bool {
	if proto != protoTCP && proto != protoUDP {
		return false
	}
	return s.bits[portSetRow(proto)][port>>6].Load()&(1<<(port&63)) != 0
}

// add adds a TCP or UDP port; other protocols are ignored.
func (s *portSet) add(proto uint8, port uint16) {
	if proto != protoTCP && proto != protoUDP {
		return
	}
	w := &s.bits[portSetRow(proto)][port>>6]
	if m := uint64(1) << (port & 63); w.Load()&m == 0 {
		w.Or(m)
	}
}
