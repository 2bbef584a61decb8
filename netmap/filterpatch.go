package netmap

import (
	"cmp"
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"
)

// FilterRulePatch changes one rule of the packet filter a map stream sent
// last (MapResponse.PacketFilterPatch): its sources by insertion and
// deletion (from FilterPatchVersion on), and its other fields by
// replacement (from FilterRulePatchVersion on).
//
// Under a tenant of k nodes every join and leave changes the sources of k
// filters of about k sources each; sending the filters whole cost the
// coordinator and every member O(k) bytes each, 1.5 MB per join and leave
// in a tenant of 100, where a patch is a few dozen bytes. A policy change
// that changes ports or protocols keeps every rule's sources: sent whole,
// it was 5 KB per node in a tenant of 100 (50 MB for 10,000 nodes to
// encode, encrypt, send, decode and check), where the patch names the new
// ports alone.
//
// A rule's sources are kept in ascending order (ComparePrefix) without
// repeats, which is how the coordinator lists them; a patch removes
// prefixes that are there and inserts ones that are not, in that order. A
// patch that does not fit the filter the node holds is refused whole and
// the node asks for a full map, so a lost or misapplied patch can never
// leave a source allowed that the coordinator removed.
type FilterRulePatch struct {
	// Rule is the index of the rule in the current filter.
	Rule int `json:"rule"`
	// Add are sources to insert, ascending.
	Add []netip.Prefix `json:"add,omitempty"`
	// Remove are sources to delete, ascending.
	Remove []netip.Prefix `json:"remove,omitempty"`

	// The fields below, when present, replace the rule's own (an empty
	// list replaces it with an empty one). Clients before
	// FilterRulePatchVersion are never sent them.

	DstPorts  *[]NetPortRange `json:"dst_ports,omitempty"`
	IPProto   *[]uint8        `json:"ip_proto,omitempty"`
	CapGrants *[]CapGrant     `json:"cap_grants,omitempty"`
	Origin    *string         `json:"origin,omitempty"`
}

// Changes reports whether p changes anything: sources to add or remove,
// or a field to replace. A patch that changes nothing is refused.
func (p *FilterRulePatch) Changes() bool {
	return len(p.Add) > 0 || len(p.Remove) > 0 ||
		p.DstPorts != nil || p.IPProto != nil || p.CapGrants != nil || p.Origin != nil
}

// ErrFilterPatch is wrapped by the errors of a patch that does not fit the
// filter it is applied to; it also wraps ErrNeedFullMap, so the client
// starts again from a full map.
var ErrFilterPatch = fmt.Errorf("packet filter patch does not fit the current filter: %w", ErrNeedFullMap)

// ComparePrefix orders prefixes by address, then by length: the order of a
// filter rule's sources. It is netip.Addr.Compare's order for the addresses
// prefixes hold (they have no zone) without reading zones, which made
// comparing IPv6 sources several times slower.
func ComparePrefix(a, b netip.Prefix) int {
	x, y := a.Addr(), b.Addr()
	if c := cmp.Compare(x.BitLen(), y.BitLen()); c != 0 {
		return c
	}
	xa, ya := x.As16(), y.As16()
	if c := cmp.Compare(binary.BigEndian.Uint64(xa[:8]), binary.BigEndian.Uint64(ya[:8])); c != 0 {
		return c
	}
	if c := cmp.Compare(binary.BigEndian.Uint64(xa[8:]), binary.BigEndian.Uint64(ya[8:])); c != 0 {
		return c
	}
	return cmp.Compare(a.Bits(), b.Bits())
}

// ascending reports whether ps is strictly ascending under ComparePrefix.
func ascending(ps []netip.Prefix) bool {
	for i := 1; i < len(ps); i++ {
		if ComparePrefix(ps[i-1], ps[i]) >= 0 {
			return false
		}
	}
	return true
}

// validatePatch checks a patch list on its own: rules named once each, in
// ascending order, and each list valid, ascending and disjoint from the
// other.
func validatePatch(ps []FilterRulePatch) error {
	for i, p := range ps {
		if p.Rule < 0 || i > 0 && p.Rule <= ps[i-1].Rule {
			return fmt.Errorf("packet filter patch %d: rule %d out of order or negative", i, p.Rule)
		}
		if !p.Changes() {
			return fmt.Errorf("packet filter patch %d: changes nothing", i)
		}
		if p.DstPorts != nil {
			r := FilterRule{DstPorts: *p.DstPorts}
			if err := r.Validate(); err != nil {
				return fmt.Errorf("packet filter patch %d: %w", i, err)
			}
		}
		for _, l := range [][]netip.Prefix{p.Add, p.Remove} {
			for _, x := range l {
				if !x.IsValid() {
					return fmt.Errorf("packet filter patch %d: invalid prefix", i)
				}
			}
			if !ascending(l) {
				return fmt.Errorf("packet filter patch %d: prefixes not in ascending order", i)
			}
		}
		for _, x := range p.Remove {
			if _, found := slices.BinarySearchFunc(p.Add, x, ComparePrefix); found {
				return fmt.Errorf("packet filter patch %d: %v both added and removed", i, x)
			}
		}
	}
	return nil
}

// ApplyFilterPatch returns f with ps applied. f is not modified: rules and
// source lists that change are copied, the others shared.
func ApplyFilterPatch(f []FilterRule, ps []FilterRulePatch) ([]FilterRule, error) {
	if err := validatePatch(ps); err != nil {
		return nil, err
	}
	out := slices.Clone(f)
	for _, p := range ps {
		if p.Rule >= len(out) {
			return nil, fmt.Errorf("rule %d of %d: %w", p.Rule, len(out), ErrFilterPatch)
		}
		r := &out[p.Rule]
		if len(p.Add) > 0 || len(p.Remove) > 0 {
			srcs, err := patchSources(r.SrcIPs, p.Add, p.Remove)
			if err != nil {
				return nil, fmt.Errorf("rule %d: %w", p.Rule, err)
			}
			r.SrcIPs = srcs
		}
		// The replacements are the decoded response's own lists, which
		// nothing else holds: no copy needed.
		if p.DstPorts != nil {
			r.DstPorts = *p.DstPorts
		}
		if p.IPProto != nil {
			r.IPProto = *p.IPProto
		}
		if p.CapGrants != nil {
			r.CapGrants = *p.CapGrants
		}
		if p.Origin != nil {
			r.Origin = *p.Origin
		}
	}
	return out, nil
}

// patchSources returns cur with remove deleted and add inserted, all
// ascending, in a new list. Each change finds its place by binary search
// and the runs between are copied whole: a node in a tenant of a hundred
// patches a list of two hundred sources on every join and leave there, and
// even checking that the whole list is in order cost it twice the patch.
// It need not: the coordinator patches only lists it has checked are
// ascending (the list it sent last), and in such a list a source to remove
// is found or the patch is refused, and the search finds the first of any
// repeats, which are refused too.
func patchSources(cur, add, remove []netip.Prefix) ([]netip.Prefix, error) {
	out := make([]netip.Prefix, 0, max(0, len(cur)+len(add)-len(remove)))
	i, j, k := 0, 0, 0 // next in cur, add, remove
	for j < len(add) || k < len(remove) {
		isAdd := k == len(remove) || j < len(add) && ComparePrefix(add[j], remove[k]) < 0
		var x netip.Prefix
		if isAdd {
			x = add[j]
		} else {
			x = remove[k]
		}
		pos, found := slices.BinarySearchFunc(cur[i:], x, ComparePrefix)
		pos += i
		out = append(out, cur[i:pos]...)
		switch {
		case isAdd && found:
			return nil, fmt.Errorf("adds %v, which is there: %w", x, ErrFilterPatch)
		case isAdd:
			out = append(out, x)
			i = pos
			j++
		case !found:
			return nil, fmt.Errorf("removes %v, which is not there: %w", x, ErrFilterPatch)
		case pos+1 < len(cur) && cur[pos+1] == x:
			return nil, fmt.Errorf("removes %v, which is there twice: %w", x, ErrFilterPatch)
		default:
			i = pos + 1
			k++
		}
	}
	return append(out, cur[i:]...), nil
}
