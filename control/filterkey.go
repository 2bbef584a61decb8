package control

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"net/netip"
	"slices"

	"meshd.dev/meshd/netmap"
)

// filterKey appends to dst an exact binary form of a packet filter, used to
// tell whether a node's filter changed since it was last sent. It replaces
// comparing JSON encodings: on a policy change every connected node's filter
// is compared, and formatting thousands of addresses as text dominated that
// (see BenchmarkSetPolicy). Two filters get the same key exactly when their
// JSON encodings are equal, except that a nil list and an empty one are the
// same (they mean the same to every reader). Every variable-length part is
// length-prefixed, so distinct filters cannot run together into one key.
func filterKey(dst []byte, f []netmap.FilterRule) []byte {
	return (*filterKeyer)(nil).append(dst, f)
}

// filterKeyer writes what filterKey writes, remembering the key bytes of
// the source lists it wrote, as netmap.FilterEncoder does for their JSON
// (netmap.PrefixListCache): the members of a tenant share one source list,
// and writing it address by address for each of them was a tenth of the
// coordinator's CPU on joins into a busy tenant. The zero value is ready;
// it is safe for concurrent use (policy changes key filters in parallel).
// A nil *filterKeyer remembers nothing.
type filterKeyer struct {
	lists netmap.PrefixListCache
}

func (k *filterKeyer) appendSrcs(dst []byte, ps []netip.Prefix) []byte {
	if k == nil {
		return appendPrefixes(dst, ps)
	}
	return k.lists.Append(dst, ps, appendPrefixes)
}

// append appends f's key to dst, as filterKey.
func (k *filterKeyer) append(dst []byte, f []netmap.FilterRule) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(f)))
	for i := range f {
		r := &f[i]
		dst = k.appendSrcs(dst, r.SrcIPs)
		dst = binary.AppendUvarint(dst, uint64(len(r.DstPorts)))
		for _, np := range r.DstPorts {
			dst = appendPrefix(dst, np.Net)
			dst = binary.BigEndian.AppendUint16(dst, np.Ports.First)
			dst = binary.BigEndian.AppendUint16(dst, np.Ports.Last)
		}
		dst = appendBytes(dst, r.IPProto)
		dst = binary.AppendUvarint(dst, uint64(len(r.CapGrants)))
		for _, g := range r.CapGrants {
			dst = appendPrefixes(dst, g.Dsts)
			// Capabilities are rare and small; JSON sorts the map's keys
			// and compacts the values, as the encoding sent does.
			caps, _ := json.Marshal(g.Caps)
			dst = appendBytes(dst, caps)
		}
		dst = appendBytes(dst, []byte(r.Origin))
	}
	return dst
}

func appendBytes(dst, b []byte) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(b)))
	return append(dst, b...)
}

func appendPrefixes(dst []byte, ps []netip.Prefix) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(ps)))
	for _, p := range ps {
		dst = appendPrefix(dst, p)
	}
	return dst
}

// appendPrefix writes a prefix as a family tag, its address bytes and its
// bit count (a Prefix has no zone).
func appendPrefix(dst []byte, p netip.Prefix) []byte {
	a := p.Addr()
	switch {
	case !a.IsValid():
		return append(dst, 0)
	case a.Is4():
		b := a.As4()
		dst = append(dst, 4)
		dst = append(dst, b[:]...)
	default:
		b := a.As16()
		dst = append(dst, 6)
		dst = append(dst, b[:]...)
	}
	return append(dst, byte(p.Bits()))
}

// keyRule is one rule of a filter key: its sources' part and the rest.
type keyRule struct {
	srcs, rest []byte
}

// splitKey splits a filter key (filterKeyer.append) into its rules, or
// returns false for bytes that are no key.
func splitKey(key []byte, into []keyRule) ([]keyRule, bool) {
	r := keyReader{b: key, ok: true}
	n := r.uvarint()
	for i := uint64(0); i < n && r.ok; i++ {
		start := len(key) - len(r.b)
		r.prefixes()
		mid := len(key) - len(r.b)
		for range r.uvarint() {
			r.prefix()
			r.skip(4)
		}
		r.bytes()
		for range r.uvarint() {
			r.prefixes()
			r.bytes()
		}
		r.bytes()
		if r.ok {
			into = append(into, keyRule{srcs: key[start:mid], rest: key[mid : len(key)-len(r.b)]})
		}
	}
	return into, r.ok && len(r.b) == 0
}

// keyReader reads what filterKeyer writes; any surprise makes ok false.
type keyReader struct {
	b  []byte
	ok bool
}

func (r *keyReader) uvarint() uint64 {
	v, n := binary.Uvarint(r.b)
	if n <= 0 || v > uint64(len(r.b)) {
		// No list or string in a key is longer than the key.
		r.ok = false
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *keyReader) skip(n int) {
	if !r.ok || len(r.b) < n {
		r.ok, r.b = false, nil
		return
	}
	r.b = r.b[n:]
}

func (r *keyReader) bytes() { r.skip(int(r.uvarint())) }

// prefixes skips a list of prefixes without building them.
func (r *keyReader) prefixes() {
	for range r.uvarint() {
		if !r.ok || len(r.b) == 0 {
			r.ok = false
			return
		}
		switch r.b[0] {
		case 0:
			r.skip(1)
		case 4:
			r.skip(1 + 4 + 1)
		case 6:
			r.skip(1 + 16 + 1)
		default:
			r.ok = false
		}
	}
}

func (r *keyReader) prefix() netip.Prefix {
	if !r.ok || len(r.b) == 0 {
		r.ok = false
		return netip.Prefix{}
	}
	var a netip.Addr
	switch tag := r.b[0]; tag {
	case 0:
		r.skip(1)
		return netip.Prefix{}
	case 4:
		if len(r.b) < 6 {
			r.ok = false
			return netip.Prefix{}
		}
		a = netip.AddrFrom4([4]byte(r.b[1:5]))
		r.b = r.b[5:]
	case 6:
		if len(r.b) < 18 {
			r.ok = false
			return netip.Prefix{}
		}
		a = netip.AddrFrom16([16]byte(r.b[1:17]))
		r.b = r.b[17:]
	default:
		r.ok = false
		return netip.Prefix{}
	}
	p := netip.PrefixFrom(a, int(r.b[0]))
	r.b = r.b[1:]
	return p
}

// filterPatch returns the patch that turns the filter keyed oldKey into f,
// keyed newKey, or false when f must go whole: the rule count differs, a
// field other than the sources differs and rules is false (the client
// predates netmap.FilterRulePatchVersion), a source list is not ascending,
// or the patch would not be much smaller than the filter. It reads the old
// sources back from the key, which holds them exactly, so sessions keep no
// filter. A field other than the sources that changed goes whole in the
// patch, as f has it.
//
// c, when not nil, remembers the last source lists diffed: a join into a
// tenant changes its k members' filters by the same sources, and each
// member's key holds the same old list, so diffing it once serves all k.
func filterPatch(c *srcDiffCache, oldKey, newKey []byte, f []netmap.FilterRule, rules bool) ([]netmap.FilterRulePatch, bool) {
	var buf [16]keyRule
	or, ok1 := splitKey(oldKey, buf[:0:8])
	nr, ok2 := splitKey(newKey, buf[8:8])
	if !ok1 || !ok2 || len(or) != len(nr) || len(nr) != len(f) {
		return nil, false
	}
	var out []netmap.FilterRulePatch
	changed, total := 0, 0
	for i := range nr {
		var p netmap.FilterRulePatch
		if !bytes.Equal(or[i].rest, nr[i].rest) {
			if !rules || !replaceRest(&p, or[i].rest, nr[i].rest, &f[i]) {
				return nil, false
			}
		}
		total += len(f[i].SrcIPs)
		if !bytes.Equal(or[i].srcs, nr[i].srcs) {
			add, remove, ok := c.diff(or[i].srcs, f[i].SrcIPs)
			if !ok {
				return nil, false
			}
			changed += len(add) + len(remove)
			p.Add, p.Remove = add, remove
		}
		if p.Changes() {
			p.Rule = i
			out = append(out, p)
		}
	}
	if len(out) == 0 || 2*changed > total {
		return nil, false
	}
	return out, true
}

// replaceRest sets in p, from r, each field but the sources whose part of
// the old and new keys' rests differ. It returns false if either rest is
// not one a key holds.
func replaceRest(p *netmap.FilterRulePatch, oldRest, newRest []byte, r *netmap.FilterRule) bool {
	o, ok1 := splitRest(oldRest)
	n, ok2 := splitRest(newRest)
	if !ok1 || !ok2 {
		return false
	}
	// The patch refers to r's own lists (it is only encoded, never
	// changed), but a nil list must go as an empty one, or the field would
	// be left out of the patch's JSON.
	if !bytes.Equal(o[0], n[0]) {
		p.DstPorts = ptrTo(nonNil(r.DstPorts))
	}
	if !bytes.Equal(o[1], n[1]) {
		p.IPProto = ptrTo(nonNil(r.IPProto))
	}
	if !bytes.Equal(o[2], n[2]) {
		p.CapGrants = ptrTo(nonNil(r.CapGrants))
	}
	if !bytes.Equal(o[3], n[3]) {
		p.Origin = ptrTo(r.Origin)
	}
	return true
}

// nonNil returns s, or an empty list for nil: JSON writes it as [].
func nonNil[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}

func ptrTo[T any](v T) *T { return &v }

// splitRest splits the part of a rule's key after its sources
// (keyRule.rest) into its destinations, protocols, capability grants and
// origin, as filterKeyer.append writes them.
func splitRest(rest []byte) (parts [4][]byte, ok bool) {
	r := keyReader{b: rest, ok: true}
	at := func() int { return len(rest) - len(r.b) }
	start := 0
	mark := func(i int) {
		parts[i] = rest[start:at()]
		start = at()
	}
	for range r.uvarint() {
		r.prefix()
		r.skip(4)
	}
	mark(0)
	r.bytes()
	mark(1)
	for range r.uvarint() {
		r.prefixes()
		r.bytes()
	}
	mark(2)
	r.bytes()
	mark(3)
	return parts, r.ok && len(r.b) == 0
}

// srcDiffCache holds the last diffSources result. The added and removed
// lists it returns are shared by the patches built from it, which are only
// encoded. Not safe for concurrent use: the hub uses it under its lock.
type srcDiffCache struct {
	from         []byte
	to           []netip.Prefix // a copy: callers' lists may be reused
	add, remove  []netip.Prefix
	ok, hasValue bool
}

func (c *srcDiffCache) diff(from []byte, to []netip.Prefix) (add, remove []netip.Prefix, ok bool) {
	if c == nil {
		return diffSources(from, to)
	}
	if c.hasValue && bytes.Equal(c.from, from) && slices.Equal(c.to, to) {
		return c.add, c.remove, c.ok
	}
	add, remove, ok = diffSources(from, to)
	c.from, c.to = append(c.from[:0], from...), append(c.to[:0], to...)
	c.add, c.remove, c.ok, c.hasValue = add, remove, ok, true
	return add, remove, ok
}

// diffSources returns what to add to and remove from the sources keyed
// from to make them to, both ascending, or false if either is not
// ascending. It merges the key's prefixes as it reads them.
func diffSources(from []byte, to []netip.Prefix) (add, remove []netip.Prefix, ok bool) {
	r := keyReader{b: from, ok: true}
	n := r.uvarint()
	var prev netip.Prefix
	j := 0
	for i := uint64(0); i < n; i++ {
		p := r.prefix()
		if !r.ok || i > 0 && netmap.ComparePrefix(prev, p) >= 0 {
			return nil, nil, false
		}
		prev = p
		for ; j < len(to); j++ {
			if j > 0 && netmap.ComparePrefix(to[j-1], to[j]) >= 0 {
				return nil, nil, false
			}
			if netmap.ComparePrefix(to[j], p) >= 0 {
				break
			}
			add = append(add, to[j])
		}
		if j < len(to) && to[j] == p {
			j++
			continue
		}
		remove = append(remove, p)
	}
	for ; j < len(to); j++ {
		if j > 0 && netmap.ComparePrefix(to[j-1], to[j]) >= 0 {
			return nil, nil, false
		}
		add = append(add, to[j])
	}
	return add, remove, r.ok && len(r.b) == 0
}
