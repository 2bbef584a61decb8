package netmap

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strconv"
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
	if f == nil {
		return append(b, "null"...), nil
	}
	b = append(b, '[')
	for i := range f {
		if i > 0 {
			b = append(b, ',')
		}
		var err error
		if b, err = f[i].AppendJSON(b); err != nil {
			return nil, err
		}
	}
	return append(b, ']'), nil
}

// AppendJSON appends r's JSON encoding to b, as AppendFilterJSON.
func (r FilterRule) AppendJSON(b []byte) ([]byte, error) {
	b = append(b, `{"src_ips":`...)
	if r.SrcIPs == nil {
		b = append(b, "null"...)
	} else {
		b = append(b, '[')
		for i, p := range r.SrcIPs {
			if i > 0 {
				b = append(b, ',')
			}
			b = append(b, '"')
			b = p.AppendTo(b)
			b = append(b, '"')
		}
		b = append(b, ']')
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
