package netmap

import (
	"cmp"
	"slices"
)

// MergePortRanges sorts rs and merges overlapping and adjacent ranges, in
// place; it returns the merged ranges (a prefix of rs).
func MergePortRanges(rs []PortRange) []PortRange {
	if len(rs) < 2 {
		return rs
	}
	slices.SortFunc(rs, func(a, b PortRange) int { return cmp.Compare(a.First, b.First) })
	out := rs[:1]
	for _, r := range rs[1:] {
		last := &out[len(out)-1]
		if uint32(r.First) <= uint32(last.Last)+1 {
			last.Last = max(last.Last, r.Last)
			continue
		}
		out = append(out, r)
	}
	return out
}

// PortRangesCover reports whether outer (merged by MergePortRanges) holds
// every port of inner.
func PortRangesCover(outer, inner []PortRange) bool {
	for _, r := range inner {
		if !slices.ContainsFunc(outer, func(o PortRange) bool { return o.First <= r.First && r.Last <= o.Last }) {
			return false
		}
	}
	return true
}
