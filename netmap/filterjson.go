package netmap

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"unicode/utf8"
)

// AppendFilterJSON appends f's JSON encoding to b: byte for byte what
// encoding/json writes for a []FilterRule (same names, order, omitempty and
// nil-slice rules, []uint8 as base64), without reflection or an allocation
// per prefix. The coordinator encodes every affected node's whole filter on
// each join, leave and policy change; with tenants of a hundred nodes that
// is thousands of prefixes per change, and the reflective encoder, which
// allocates each netip.Prefix's text, was most of a join's cost (4x
// slower, BenchmarkFilterJSON). TestFilterRuleJSON and FuzzFilterRuleJSON
// hold it to encoding/json.
func AppendFilterJSON(b []byte, f []FilterRule) ([]byte, error) {
	return appendFilter(b, f, nil)
}

// appendFilter writes f, its source lists through e when e is not nil.
func appendFilter(b []byte, f []FilterRule, e *FilterEncoder) ([]byte, error) {
	if f == nil {
		return append(b, "null"...), nil
	}
	b = append(b, '[')
	for i := range f {
		if i > 0 {
			b = append(b, ',')
		}
		var err error
		if b, err = f[i].appendJSON(b, e); err != nil {
			return nil, err
		}
	}
	return append(b, ']'), nil
}

// AppendJSON appends r's JSON encoding to b, as AppendFilterJSON.
func (r FilterRule) AppendJSON(b []byte) ([]byte, error) {
	return r.appendJSON(b, nil)
}

func (r FilterRule) appendJSON(b []byte, e *FilterEncoder) ([]byte, error) {
	b = append(b, `{"src_ips":`...)
	switch {
	case r.SrcIPs == nil:
		b = append(b, "null"...)
	case e != nil:
		b = e.appendSrcs(b, r.SrcIPs)
	default:
		b = appendPrefixList(b, r.SrcIPs)
	}
	b = append(b, `,"dst_ports":`...)
	if r.DstPorts == nil {
		b = append(b, "null"...)
	} else {
		b = append(b, '[')
		for i, d := range r.DstPorts {
			if i > 0 {
				b = append(b, ',')
			}
			b = append(b, `{"net":"`...)
			b = d.Net.AppendTo(b)
			b = append(b, `","ports":{"first":`...)
			b = strconv.AppendUint(b, uint64(d.Ports.First), 10)
			b = append(b, `,"last":`...)
			b = strconv.AppendUint(b, uint64(d.Ports.Last), 10)
			b = append(b, "}}"...)
		}
		b = append(b, ']')
	}
	if len(r.IPProto) > 0 {
		// encoding/json writes a []uint8 as a base64 string.
		b = append(b, `,"ip_proto":"`...)
		b = base64.StdEncoding.AppendEncode(b, r.IPProto)
		b = append(b, '"')
	}
	if len(r.CapGrants) > 0 {
		// Rare (app grants only) and holds raw JSON: the reflective
		// encoder, which validates it, is the right tool.
		g, err := json.Marshal(r.CapGrants)
		if err != nil {
			return nil, fmt.Errorf("encode cap_grants: %w", err)
		}
		b = append(b, `,"cap_grants":`...)
		b = append(b, g...)
	}
	if r.Origin != "" {
		b = append(b, `,"origin":`...)
		b = appendJSONString(b, r.Origin)
	}
	return append(b, '}'), nil
}

// appendJSONString appends s as encoding/json quotes it. Origins are
// FILE:LINE, plain ASCII: those are copied; anything else (escapes, HTML
// characters, non-ASCII, invalid UTF-8) takes encoding/json's own path.
func appendJSONString(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < 0x20 || c >= utf8.RuneSelf || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			q, _ := json.Marshal(s) // a string always encodes
			return append(b, q...)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}

func appendPrefixList(b []byte, ps []netip.Prefix) []byte {
	b = append(b, '[')
	for i, p := range ps {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, '"')
		b = p.AppendTo(b)
		b = append(b, '"')
	}
	return append(b, ']')
}

// FilterEncoder writes what AppendFilterJSON writes, remembering the JSON
// of the source lists it wrote. A policy engine hands every node a rule
// applies to the same source slice (a tenant's hundred members' addresses,
// say), and only the destinations (the node's own addresses) differ; so on
// a join, a leave or a policy change, when the filters of a whole tenant
// are encoded, the sources are formatted once, not once per node. The
// zero value is ready; it is safe for concurrent use.
type FilterEncoder struct {
	srcs PrefixListCache
}

// Append appends f's JSON encoding to b, as AppendFilterJSON.
// A nil e writes as AppendFilterJSON does.
func (e *FilterEncoder) Append(b []byte, f []FilterRule) ([]byte, error) {
	return appendFilter(b, f, e)
}

func (e *FilterEncoder) appendSrcs(b []byte, ps []netip.Prefix) []byte {
	return e.srcs.Append(b, ps, appendPrefixList)
}

// PrefixListCache remembers what a function wrote for a prefix list, for
// lists that many callers share (a tenant's sources, in every member's
// filter). Lists are known by their backing array and checked against a
// copy before the bytes are reused, so a list changed in place is written
// anew: reuse never depends on the caller's discipline. The zero value is
// ready; it is safe for concurrent use. One cache serves one write
// function.
type PrefixListCache struct {
	mu    sync.Mutex
	lists map[*netip.Prefix]*cachedList
}

type cachedList struct {
	ps []netip.Prefix // a copy of the list written
	b  []byte
}

const (
	// minCachedList: shorter lists are written each time, as cheap as the
	// lookup.
	minCachedList = 8
	// maxCachedLists bounds the lists remembered; past it the memory
	// starts over. Joins and leaves replace a rule's list, so old ones
	// pile up until then.
	maxCachedLists = 1024
)

// Append appends write(dst, ps) to dst, from memory when ps (the same
// backing array, the same contents) was written before.
func (c *PrefixListCache) Append(dst []byte, ps []netip.Prefix, write func([]byte, []netip.Prefix) []byte) []byte {
	if c == nil || len(ps) < minCachedList {
		return write(dst, ps)
	}
	key := &ps[0]
	c.mu.Lock()
	l := c.lists[key]
	c.mu.Unlock()
	if l != nil && slices.Equal(l.ps, ps) {
		return append(dst, l.b...)
	}
	start := len(dst)
	dst = write(dst, ps)
	l = &cachedList{ps: slices.Clone(ps), b: bytes.Clone(dst[start:])}
	c.mu.Lock()
	if c.lists == nil || len(c.lists) >= maxCachedLists {
		c.lists = make(map[*netip.Prefix]*cachedList)
	}
	c.lists[key] = l
	c.mu.Unlock()
	return dst
}
