package control

import (
	"encoding/binary"
	"encoding/json"
	"net/netip"

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
