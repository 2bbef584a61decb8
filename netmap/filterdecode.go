package netmap

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"net/netip"
	"unicode/utf8"
)

// filterRuleFields is FilterRule without its UnmarshalJSON: what
// encoding/json decodes by reflection.
type filterRuleFields FilterRule

// UnmarshalJSON decodes a rule as encoding/json decodes the struct, and
// fast when data is in the form AppendJSON writes (keys in order, no
// spaces, no escapes): a node in a tenant of a hundred decodes a filter of
// two hundred sources on every join and leave in the tenant, and the
// reflective decoder spent most of a map update's time on it. Any other
// form, or anything the fast path does not know how to judge exactly as
// encoding/json does (a number that is not a plain uint16, cap_grants),
// takes encoding/json's own path, so the result is the same either way
// (FuzzFilterRuleDecode).
func (r *FilterRule) UnmarshalJSON(data []byte) error {
	if out, ok := decodeRuleFast(data, *r); ok {
		*r = out
		return nil
	}
	return json.Unmarshal(data, (*filterRuleFields)(r))
}

// ruleParser reads the canonical form; any surprise makes ok false.
type ruleParser struct {
	b  []byte
	ok bool
}

func (p *ruleParser) lit(s string) bool {
	if !p.ok || !bytes.HasPrefix(p.b, []byte(s)) {
		p.ok = false
		return false
	}
	p.b = p.b[len(s):]
	return true
}

func (p *ruleParser) peek(c byte) bool { return p.ok && len(p.b) > 0 && p.b[0] == c }

// str reads a string without escapes and returns its contents, which must
// be valid UTF-8 (encoding/json would replace invalid bytes).
func (p *ruleParser) str() []byte {
	if !p.lit(`"`) {
		return nil
	}
	i := bytes.IndexByte(p.b, '"')
	if i < 0 {
		p.ok = false
		return nil
	}
	s := p.b[:i]
	if bytes.IndexByte(s, '\\') >= 0 || !utf8.Valid(s) {
		p.ok = false
		return nil
	}
	p.b = p.b[i+1:]
	return s
}

func (p *ruleParser) prefix() netip.Prefix {
	s := p.str()
	if !p.ok {
		return netip.Prefix{}
	}
	if pfx, ok := parsePrefixFast(s); ok {
		return pfx
	}
	var pfx netip.Prefix
	if pfx.UnmarshalText(s) != nil {
		p.ok = false
	}
	return pfx
}

// port reads a number that is a plain uint16.
func (p *ruleParser) port() uint16 {
	n, i := 0, 0
	for ; i < len(p.b) && p.b[i] >= '0' && p.b[i] <= '9'; i++ {
		n = n*10 + int(p.b[i]-'0')
		if n > 65535 {
			p.ok = false
			return 0
		}
	}
	if i == 0 || i > 1 && p.b[0] == '0' || i < len(p.b) && (p.b[i] == '.' || p.b[i] == 'e' || p.b[i] == 'E') {
		p.ok = false
		return 0
	}
	p.b = p.b[i:]
	return uint16(n)
}

// list reads null or an array, calling elem for each element.
func (p *ruleParser) list(elem func()) (null bool) {
	if p.peek('n') {
		p.lit("null")
		return true
	}
	if !p.lit("[") {
		return false
	}
	if p.peek(']') {
		p.lit("]")
		return false
	}
	for p.ok {
		elem()
		if p.peek(',') {
			p.lit(",")
			continue
		}
		p.lit("]")
		break
	}
	return false
}

// decodeRuleFast decodes the canonical form onto r (a field the data does
// not name keeps r's value, as with encoding/json).
func decodeRuleFast(data []byte, r FilterRule) (FilterRule, bool) {
	p := &ruleParser{b: data, ok: true}
	p.rule(&r)
	return r, p.ok && len(p.b) == 0
}

// rule reads one rule in the canonical form onto r.
func (p *ruleParser) rule(r *FilterRule) {
	p.lit(`{"src_ips":`)
	var srcs []netip.Prefix
	// Sized at once for the canonical list (two quotes per source, none
	// before its "]"): growing it by appends was a tenth of a node's
	// decoding time.
	if end := bytes.IndexByte(p.b, ']'); p.peek('[') && end > 0 {
		if n := bytes.Count(p.b[:end], []byte{'"'}) / 2; n > 0 {
			srcs = make([]netip.Prefix, 0, n)
		}
	}
	if !p.list(func() { srcs = append(srcs, p.prefix()) }) && srcs == nil {
		srcs = []netip.Prefix{}
	}
	p.lit(`,"dst_ports":`)
	var dsts []NetPortRange
	if !p.list(func() {
		var d NetPortRange
		p.lit(`{"net":`)
		d.Net = p.prefix()
		p.lit(`,"ports":{"first":`)
		d.Ports.First = p.port()
		p.lit(`,"last":`)
		d.Ports.Last = p.port()
		p.lit(`}}`)
		dsts = append(dsts, d)
	}) && dsts == nil {
		dsts = []NetPortRange{}
	}
	if !p.ok {
		return
	}
	r.SrcIPs, r.DstPorts = srcs, dsts
	if p.peek(',') && bytes.HasPrefix(p.b, []byte(`,"ip_proto":`)) {
		p.lit(`,"ip_proto":`)
		s := p.str()
		if !p.ok {
			return
		}
		proto := make([]byte, base64.StdEncoding.DecodedLen(len(s)))
		n, err := base64.StdEncoding.Decode(proto, s)
		if err != nil {
			p.ok = false
			return
		}
		r.IPProto = proto[:n]
	}
	if p.peek(',') && bytes.HasPrefix(p.b, []byte(`,"origin":`)) {
		p.lit(`,"origin":`)
		r.Origin = string(p.str())
	}
	p.lit("}")
}

// filterTail is how MarshalResponse ends a response that has a filter.
const filterTail = `,"packet_filter":[`

// decodeFilterTailFast decodes a map response that ends in a packet
// filter in the canonical form, as the coordinator writes every response
// with one: the filter by the fast path, the rest (a few fields, or a full
// map's peers) by encoding/json. ok is false for any other shape; the
// caller then decodes the whole by encoding/json, with the same result
// (FuzzDecodeMapResponseFast).
//
// Why the split is exact: if head+"}" is a JSON object whose last byte
// before that "}" ends a member's value, and the tail is a complete array
// followed by the final "}", the filter is a member of the
// top-level object, and the last of the object's members named
// packet_filter (in any case), the one encoding/json keeps.
func decodeFilterTailFast(data []byte) (*MapResponse, bool) {
	if !bytes.HasSuffix(data, []byte("]}")) {
		return nil, false
	}
	// The first occurrence, found fast where the coordinator puts it: a
	// filter update's head is a few dozen bytes, and scanning back from
	// the end over the whole filter cost a node 9% of its decoding. If it
	// is not the member that ends the object, the tail below is no
	// canonical list reaching the end (a later occurrence, or the rest of
	// a nested object, breaks it) or the head is no object, and
	// encoding/json decides.
	i := bytes.Index(data, []byte(filterTail))
	if i < 1 || data[i-1] == '{' || data[i-1] <= ' ' {
		// Not after a member's value: "{,..." is no JSON even though
		// "{}" is.
		return nil, false
	}
	p := &ruleParser{b: data[i+len(filterTail)-1 : len(data)-1], ok: true}
	rules := []FilterRule{}
	p.list(func() {
		rules = append(rules, FilterRule{})
		p.rule(&rules[len(rules)-1])
	})
	if !p.ok || len(p.b) != 0 {
		return nil, false
	}
	head := make([]byte, 0, i+1)
	head = append(append(head, data[:i]...), '}')
	var r MapResponse
	if decodeMap(head, &r) != nil || r.PacketFilter != nil {
		// A filter in the head too: the member is there twice, which
		// decodeMap refuses. Rare enough to leave to it.
		return nil, false
	}
	r.PacketFilter = &rules
	return &r, true
}
