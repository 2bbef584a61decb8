package netmap

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"slices"
	"strings"

	jsonv2 "github.com/go-json-experiment/json"
)

// MaxMessageSize bounds one decoded control message. A full map for 10,000
// peers is about 5 MB of JSON; anything far larger is an attack or a bug.
const MaxMessageSize = 64 << 20

// NetworkMap is a node's view of the tailnet, assembled on the client from a
// full map and the deltas after it.
type NetworkMap struct {
	Epoch           string
	Version         uint64
	Self            Node
	Peers           map[NodeID]*Node
	DERPMap         DERPMap
	DNS             DNSConfig
	PacketFilter    []FilterRule
	PolicyBootstrap bool
	// TLSCA is the tailnet CA certificate (DER), nil from a coordinator
	// without one (MapResponse.TLSCA).
	TLSCA []byte
}

// PeersDigest is the digest of the peers m holds, for
// MapRequest.PeersDigest: DigestPeerEntries of each peer's encoding/json
// encoding, in ascending ID order, which is how a coordinator writes a full
// map's peer entries. A peer the client decoded differently from how the
// coordinator would write it (a field this version does not know) only
// makes the digests differ, and the peers are sent. Empty for a map with
// no base.
func (m *NetworkMap) PeersDigest() string {
	if m.Peers == nil {
		return ""
	}
	// An Encoder writes what Marshal returns and a newline, which is
	// DigestPeerEntries' framing, straight into the hash: no copy of each
	// entry (that halved the cost).
	h := sha256.New()
	enc := json.NewEncoder(h)
	for _, id := range slices.Sorted(maps.Keys(m.Peers)) {
		if err := enc.Encode(m.Peers[id]); err != nil {
			return "" // no digest: the coordinator sends the peers
		}
	}
	return hex.EncodeToString(h.Sum(nil))
}

// DigestPeerEntries is the hex SHA-256 of the peer entries of a full map,
// in their order, each followed by a newline (an entry is one JSON object,
// which holds no raw newline, so entries cannot run together alike).
func DigestPeerEntries(entries [][]byte) string {
	h := sha256.New()
	for _, e := range entries {
		h.Write(e)
		h.Write([]byte{'\n'})
	}
	return hex.EncodeToString(h.Sum(nil))
}

// ErrNeedFullMap is returned by Apply when a delta arrives for a map that has
// no base (or a different epoch): the client must ask for a full map.
var ErrNeedFullMap = errors.New("delta without a base map: need a full map")

// Apply folds resp into m. On error m is unchanged.
func (m *NetworkMap) Apply(resp *MapResponse) error {
	if resp.KeepAlive && !resp.Full && resp.Self == nil && len(resp.PeersChanged) == 0 &&
		len(resp.PeersRemoved) == 0 && len(resp.PeersPatch) == 0 && resp.DERPMap == nil && resp.DNS == nil && resp.PacketFilter == nil && resp.PacketFilterPatch == nil && resp.TLSCA == nil {
		return nil
	}
	if err := resp.Validate(); err != nil {
		return err
	}
	if !resp.Full && (m.Peers == nil || m.Epoch != resp.Epoch) {
		return ErrNeedFullMap
	}
	if resp.PeersKept && m.Peers == nil {
		return fmt.Errorf("full map keeps peers the client does not hold: %w", ErrNeedFullMap)
	}
	if resp.Full {
		next := NetworkMap{
			Epoch: resp.Epoch, Version: resp.Version, Self: *resp.Self,
			Peers: make(map[NodeID]*Node, len(resp.Peers)), PolicyBootstrap: resp.PolicyBootstrap,
		}
		if resp.PeersKept {
			// The entries are shared, as between any two maps: a peer
			// changes by replacement (copy on write), never in place.
			next.Peers = maps.Clone(m.Peers)
		}
		for i := range resp.Peers {
			p := resp.Peers[i]
			next.Peers[p.ID] = &p
		}
		if resp.DERPMap != nil {
			next.DERPMap = *resp.DERPMap
		}
		if resp.DNS != nil {
			next.DNS = *resp.DNS
		}
		if resp.PacketFilter != nil {
			next.PacketFilter = *resp.PacketFilter
		}
		next.TLSCA = resp.TLSCA
		*m = next
		return nil
	}
	var patched []FilterRule
	if resp.PacketFilterPatch != nil {
		f, err := ApplyFilterPatch(m.PacketFilter, resp.PacketFilterPatch)
		if err != nil {
			return err
		}
		patched = f
	}
	for _, p := range resp.PeersPatch {
		if _, ok := m.Peers[p.ID]; !ok && !slices.ContainsFunc(resp.PeersChanged, func(n Node) bool { return n.ID == p.ID }) {
			return fmt.Errorf("patch for unknown peer %d: %w", p.ID, ErrNeedFullMap)
		}
	}
	if resp.Self != nil {
		m.Self = *resp.Self
	}
	for _, id := range resp.PeersRemoved {
		delete(m.Peers, id)
	}
	for i := range resp.PeersChanged {
		p := resp.PeersChanged[i]
		m.Peers[p.ID] = &p
	}
	for _, pp := range resp.PeersPatch {
		// Copy on write: callers may hold the old *Node (a status snapshot).
		cp := *m.Peers[pp.ID]
		if pp.Endpoints != nil {
			cp.Endpoints = slices.Clone(*pp.Endpoints)
		}
		if pp.HomeDERP != nil {
			cp.HomeDERP = *pp.HomeDERP
		}
		if pp.Online != nil {
			cp.Online = *pp.Online
		}
		if pp.LastSeen != nil {
			cp.LastSeen = *pp.LastSeen
		}
		if pp.DiscoKey != nil {
			cp.DiscoKey = *pp.DiscoKey
		}
		if pp.NodeKey != nil {
			cp.NodeKey = *pp.NodeKey
		}
		m.Peers[pp.ID] = &cp
	}
	if resp.DERPMap != nil {
		m.DERPMap = *resp.DERPMap
	}
	if resp.DNS != nil {
		m.DNS = *resp.DNS
	}
	if resp.PacketFilter != nil {
		m.PacketFilter = *resp.PacketFilter
	}
	if patched != nil {
		m.PacketFilter = patched
	}
	if resp.TLSCA != nil {
		m.TLSCA = resp.TLSCA
	}
	m.PolicyBootstrap = resp.PolicyBootstrap
	m.Version = resp.Version
	return nil
}

// SortedPeers returns the peers ordered by id, for stable output.
func (m *NetworkMap) SortedPeers() []*Node {
	out := make([]*Node, 0, len(m.Peers))
	for _, p := range m.Peers {
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b *Node) int {
		switch {
		case a.ID < b.ID:
			return -1
		case a.ID > b.ID:
			return 1
		}
		return 0
	})
	return out
}

// Clone returns a deep enough copy of m that applying deltas to either does
// not affect the other (Node values are replaced, never mutated, by Apply).
func (m *NetworkMap) Clone() *NetworkMap {
	cp := *m
	cp.Peers = make(map[NodeID]*Node, len(m.Peers))
	for id, p := range m.Peers {
		cp.Peers[id] = p
	}
	return &cp
}

// Validate checks the invariants a receiver relies on.
func (r *MapResponse) Validate() error {
	if r.Full && r.Self == nil {
		return errors.New("map response: full map without self")
	}
	if !r.Full && len(r.Peers) > 0 {
		return errors.New("map response: peers list in a delta (use peers_changed)")
	}
	if r.PeersKept && (!r.Full || len(r.Peers) > 0) {
		return errors.New("map response: peers kept outside a full map, or with a peers list")
	}
	if r.Self != nil {
		if err := r.Self.Validate(); err != nil {
			return fmt.Errorf("map response self: %w", err)
		}
	}
	seen := make(map[NodeID]bool, len(r.Peers)+len(r.PeersChanged))
	for _, list := range [][]Node{r.Peers, r.PeersChanged} {
		for i := range list {
			p := &list[i]
			if err := p.Validate(); err != nil {
				return fmt.Errorf("map response peer %d: %w", p.ID, err)
			}
			if seen[p.ID] {
				return fmt.Errorf("map response: peer %d listed twice", p.ID)
			}
			seen[p.ID] = true
		}
	}
	if r.DERPMap != nil {
		if err := r.DERPMap.Validate(); err != nil {
			return err
		}
	}
	if r.DNS != nil {
		if err := r.DNS.Validate(); err != nil {
			return fmt.Errorf("map response: %w", err)
		}
	}
	if r.TLSCA != nil {
		if _, err := ParseTLSCA(r.TLSCA); err != nil {
			return fmt.Errorf("map response: %w", err)
		}
	}
	if r.PacketFilterPatch != nil {
		if r.PacketFilter != nil || r.Full {
			return errors.New("map response: a packet filter patch with a whole filter or in a full map")
		}
		if err := validatePatch(r.PacketFilterPatch); err != nil {
			return fmt.Errorf("map response: %w", err)
		}
	}
	if r.PacketFilter != nil {
		for i, fr := range *r.PacketFilter {
			if err := fr.Validate(); err != nil {
				return fmt.Errorf("map response filter rule %d: %w", i, err)
			}
		}
	}
	return nil
}

// Validate checks a node's fields.
func (n *Node) Validate() error {
	if n.ID == 0 {
		return errors.New("node id is zero")
	}
	if n.NodeKey.IsZero() {
		return fmt.Errorf("node %d: %w (node key)", n.ID, ErrZeroKey)
	}
	if len(n.Addresses) == 0 {
		return fmt.Errorf("node %d: no addresses", n.ID)
	}
	for _, p := range n.Addresses {
		if !p.IsValid() || !p.IsSingleIP() {
			return fmt.Errorf("node %d: address %v is not a single IP", n.ID, p)
		}
	}
	for _, p := range n.AllowedIPs {
		if !p.IsValid() || p != p.Masked() {
			return fmt.Errorf("node %d: allowed ip %v is not a canonical prefix", n.ID, p)
		}
	}
	for _, ep := range n.Endpoints {
		if !ep.IsValid() || ep.Port() == 0 {
			return fmt.Errorf("node %d: endpoint %v is invalid", n.ID, ep)
		}
	}
	for _, t := range n.Tags {
		if err := CheckTag(t); err != nil {
			return fmt.Errorf("node %d: %w", n.ID, err)
		}
	}
	if len(n.Hostname) > 253 {
		return fmt.Errorf("node %d: hostname longer than 253 bytes", n.ID)
	}
	if n.DNSName != "" {
		name, ok := strings.CutSuffix(n.DNSName, ".")
		if !ok {
			return fmt.Errorf("node %d: dns name %q is not fully qualified (no trailing dot)", n.ID, n.DNSName)
		}
		if err := CheckDomain(name); err != nil {
			return fmt.Errorf("node %d: dns name: %w", n.ID, err)
		}
	}
	return nil
}

// Validate checks the DERP map.
func (d *DERPMap) Validate() error {
	ids := map[int]bool{}
	for _, r := range d.Regions {
		if r.ID <= 0 {
			return fmt.Errorf("derp map: region %q: id must be positive, got %d", r.Code, r.ID)
		}
		if ids[r.ID] {
			return fmt.Errorf("derp map: region id %d listed twice", r.ID)
		}
		ids[r.ID] = true
		if len(r.Nodes) == 0 {
			return fmt.Errorf("derp map: region %d (%s) has no nodes", r.ID, r.Code)
		}
		for _, n := range r.Nodes {
			if n.Host == "" {
				return fmt.Errorf("derp map: region %d node %q has no host", r.ID, n.Name)
			}
			if n.DERPPort < 0 || n.DERPPort > 65535 || n.STUNPort < -1 || n.STUNPort > 65535 {
				return fmt.Errorf("derp map: region %d node %q: port out of range", r.ID, n.Name)
			}
		}
	}
	return nil
}

// Validate checks a filter rule.
func (fr *FilterRule) Validate() error {
	for _, p := range fr.SrcIPs {
		if !p.IsValid() {
			return errors.New("invalid source prefix")
		}
	}
	for _, d := range fr.DstPorts {
		if !d.Net.IsValid() {
			return errors.New("invalid destination prefix")
		}
		if d.Ports.First > d.Ports.Last {
			return fmt.Errorf("port range %d-%d is reversed", d.Ports.First, d.Ports.Last)
		}
	}
	return nil
}

// CheckTag reports whether t is a well-formed tag: "tag:" then lowercase
// letters, digits and dashes, starting with a letter.
func CheckTag(t string) error {
	name, ok := strings.CutPrefix(t, "tag:")
	if !ok || name == "" {
		return fmt.Errorf("tag %q: must look like tag:name", t)
	}
	if len(name) > 63 {
		return fmt.Errorf("tag %q: name longer than 63 characters", t)
	}
	for i, c := range name {
		switch {
		case c >= 'a' && c <= 'z':
		case (c >= '0' && c <= '9') || c == '-' || c == '_':
			if i == 0 {
				return fmt.Errorf("tag %q: name must start with a letter", t)
			}
		default:
			return fmt.Errorf("tag %q: only lowercase letters, digits, '-' and '_' are allowed", t)
		}
	}
	return nil
}

// NormalizeTags lowercases, validates, sorts and de-duplicates tags.
func NormalizeTags(tags []string) ([]string, error) {
	out := make([]string, 0, len(tags))
	for _, t := range tags {
		t = strings.ToLower(strings.TrimSpace(t))
		if t == "" {
			continue
		}
		if err := CheckTag(t); err != nil {
			return nil, err
		}
		out = append(out, t)
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}

// DecodeMapResponse decodes and validates one map stream message.
func DecodeMapResponse(data []byte) (*MapResponse, error) {
	if len(data) > MaxMessageSize {
		return nil, fmt.Errorf("map response: %d bytes exceeds the %d byte limit", len(data), MaxMessageSize)
	}
	r, ok := decodeFilterTailFast(data)
	if !ok {
		r = new(MapResponse)
		if err := decodeMap(data, r); err != nil {
			return nil, fmt.Errorf("map response: %w", err)
		}
	}
	if err := r.Validate(); err != nil {
		return nil, err
	}
	return r, nil
}

// decodeMap decodes a map response with encoding/json/v2's semantics (the
// module that is the standard library's from Go 1.27): a third less time
// per join or leave a member of a tenant of 100 decodes and applies
// (BenchmarkChurnFrames). It is stricter than encoding/json, and only
// where meshd's encoder never goes: member names match exactly, a name
// given twice or invalid UTF-8 is an error. Unknown members are ignored,
// as before, so that newer coordinators can add fields. Only the map
// stream, where both ends are meshd, uses it; the other control and
// admin messages keep encoding/json's rules.
func decodeMap(data []byte, r *MapResponse) error {
	return jsonv2.Unmarshal(data, r)
}

// decodeStrict decodes exactly one JSON value, refusing trailing data. Unknown
// fields are allowed so that newer peers can add fields.
//
// json.Unmarshal refuses trailing data itself; a json.Decoder would first
// copy data into a buffer of its own, which was a tenth of a node's time
// decoding map updates.
func decodeStrict(data []byte, v any) error {
	return json.Unmarshal(data, v)
}

// DecodeJSON decodes one JSON control message of at most limit bytes from r.
func DecodeJSON(r io.Reader, limit int64, v any) error {
	data, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return fmt.Errorf("read message: %w", err)
	}
	if int64(len(data)) > limit {
		return fmt.Errorf("message larger than %d bytes", limit)
	}
	return decodeStrict(data, v)
}

// AddrsOf returns the addresses of the prefixes (for single-IP prefixes).
func AddrsOf(ps []netip.Prefix) []netip.Addr {
	out := make([]netip.Addr, 0, len(ps))
	for _, p := range ps {
		out = append(out, p.Addr())
	}
	return out
}
