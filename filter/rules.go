package filter

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/gaissmai/bart"

	"meshd.dev/meshd/netmap"
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
	protos  [256]*protoRules
	local   prefixList // this node's addresses and routes; empty: no check
	origins []string   // by rule index
	n       int
}

// protoRules is the lookup structure of one IP protocol.
type protoRules struct {
	// bounds are the first ports of the elementary port intervals:
	// interval i is [bounds[i], bounds[i+1]-1]. bounds[0] is 0.
	// Portless protocols have a single interval.
	bounds []uint16
	cells  []*dstTable // by interval
}

// dstTable maps a destination address to the sources allowed to reach it.
// Nested destination prefixes are merged at compile time (a /32 inside a /24
// also carries the /24's sources), so one longest-prefix match suffices.
type dstTable struct {
	small []dstEntry // longest prefix first
	big   *bart.Table[*srcSet]
}

type dstEntry struct {
	pfx  netip.Prefix
	srcs *srcSet
}

// srcSet is a set of source prefixes; the value of each is the index of a
// rule that allows it (for explaining a verdict).
type srcSet struct {
	small []srcEntry // longest prefix first
	big   *bart.Table[int32]
}

type srcEntry struct {
	pfx  netip.Prefix
	rule int32
}

type prefixList struct {
	small []netip.Prefix
	big   *bart.Lite
}

func (l *prefixList) empty() bool { return len(l.small) == 0 && l.big == nil }

func (l *prefixList) contains(a netip.Addr) bool {
	if l.big != nil {
		return l.big.Contains(a)
	}
	for _, p := range l.small {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

func (d *dstTable) lookup(a netip.Addr) *srcSet {
	if d.big != nil {
		s, _ := d.big.Lookup(a)
		return s
	}
	for i := range d.small {
		if d.small[i].pfx.Contains(a) {
			return d.small[i].srcs
		}
	}
	return nil
}

func (s *srcSet) lookup(a netip.Addr) int32 {
	if s.big != nil {
		if r, ok := s.big.Lookup(a); ok {
			return r
		}
		return -1
	}
	for i := range s.small {
		if s.small[i].pfx.Contains(a) {
			return s.small[i].rule
		}
	}
	return -1
}

func (s *srcSet) contains(a netip.Addr) bool {
	if s.big != nil {
		return s.big.Contains(a)
	}
	for i := range s.small {
		if s.small[i].pfx.Contains(a) {
			return true
		}
	}
	return false
}

// allowed reports whether a rule allows a packet of proto from src to
// dst:dport. It is match without the rule label, on the per-packet path.
func (r *Rules) allowed(proto uint8, src, dst netip.Addr, dport uint16) bool {
	srcs := r.lookupDst(proto, dst, dport)
	return srcs != nil && srcs.contains(src)
}

// match returns the index of a rule allowing a packet of proto from src to
// dst:dport, or -1. Portless protocols ignore dport.
func (r *Rules) match(proto uint8, src, dst netip.Addr, dport uint16) int32 {
	srcs := r.lookupDst(proto, dst, dport)
	if srcs == nil {
		return -1
	}
	return srcs.lookup(src)
}

// lookupDst finds the sources allowed to reach dst:dport over proto.
func (r *Rules) lookupDst(proto uint8, dst netip.Addr, dport uint16) *srcSet {
	pr := r.protos[proto]
	if pr == nil {
		return nil
	}
	i := 0
	if len(pr.bounds) > 1 {
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
		return nil
	}
	return cell.lookup(dst)
}

// Len is the number of rules compiled.
func (r *Rules) Len() int { return r.n }

// Match reports whether the rules allow a new flow of proto from src to
// dst:dstPort, and the Origin of a rule that does. For ICMP and other
// portless protocols dstPort is ignored. It does not consult flow state:
// it answers "would the policy let this flow open", for explaining drops.
func (r *Rules) Match(proto uint8, src, dst netip.Addr, dstPort uint16) (origin string, ok bool) {
	if !r.isLocal(dst) {
		return "", false
	}
	i := r.match(proto, src.Unmap(), dst.Unmap(), dstPort)
	if i < 0 {
		return "", false
	}
	return r.origins[i], true
}

func (r *Rules) isLocal(a netip.Addr) bool {
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

	c := &compiler{
		rules: rules,
		cells: make(map[string]*dstTable),
		srcs:  make(map[string]*srcSet),
	}
	groupIDs := make(map[string]int32)
	var byProto [256][]atom
	for i, rule := range rules {
		out.origins[i] = rule.Origin
		where := fmt.Sprintf("rule %d", i)
		if rule.Origin != "" {
			where += " (" + rule.Origin + ")"
		}
		srcs := make([]netip.Prefix, 0, len(rule.SrcIPs))
		for _, s := range rule.SrcIPs {
			if !s.IsValid() {
				return nil, fmt.Errorf("filter: %s: invalid source prefix %q", where, s)
			}
			srcs = append(srcs, s.Masked())
		}
		slices.SortFunc(srcs, netip.Prefix.Compare)
		srcs = slices.Compact(srcs)
		gkey := prefixKey(srcs)
		g, ok := groupIDs[gkey]
		if !ok {
			g = int32(len(c.groups))
			groupIDs[gkey] = g
			c.groups = append(c.groups, srcs)
		}
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
			if len(srcs) == 0 {
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
	for p := range byProto {
		if len(byProto[p]) > 0 {
			out.protos[p] = c.protoRules(uint8(p), byProto[p])
		}
	}
	return out, nil
}

func newPrefixList(ps []netip.Prefix) prefixList {
	if len(ps) <= smallSet {
		l := prefixList{small: make([]netip.Prefix, 0, len(ps))}
		for _, p := range ps {
			l.small = append(l.small, p.Masked())
		}
		return l
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
	entries := make([]dstEntry, 0, len(dsts))
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
		entries = append(entries, dstEntry{pfx: d, srcs: c.srcSet(rep)})
	}
	if len(entries) <= smallSet {
		slices.SortStableFunc(entries, func(x, y dstEntry) int { return y.pfx.Bits() - x.pfx.Bits() })
		t.small = entries
	} else {
		t.big = new(bart.Table[*srcSet])
		for _, e := range entries {
			t.big.Insert(e.pfx, e.srcs)
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
	if len(label) <= smallSet {
		for p, r := range label {
			s.small = append(s.small, srcEntry{pfx: p, rule: r})
		}
		slices.SortFunc(s.small, func(x, y srcEntry) int {
			if d := y.pfx.Bits() - x.pfx.Bits(); d != 0 {
				return d
			}
			return x.pfx.Compare(y.pfx)
		})
	} else {
		s.big = new(bart.Table[int32])
		for p, r := range label {
			s.big.Insert(p, r)
		}
	}
	c.srcs[string(key)] = s
	return s
}

func prefixKey(ps []netip.Prefix) string {
	var b strings.Builder
	for _, p := range ps {
		b.WriteString(p.String())
		b.WriteByte(',')
	}
	return b.String()
}
