package netmap

import (
	"encoding/json"
	"net/netip"
	"reflect"
	"testing"
)

// canonicalRules are rules in every shape the coordinator sends.
func canonicalRules() []FilterRule {
	pfx := netip.MustParsePrefix
	var tenant []netip.Prefix
	for i := range 100 {
		tenant = append(tenant, netip.PrefixFrom(netip.AddrFrom4([4]byte{100, 64, byte(i >> 8), byte(i)}), 32))
		tenant = append(tenant, netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfd, 0x5e, 0x5a, 0x1e, 0, 0xd, 14: byte(i >> 8), 15: byte(i)}), 128))
	}
	return []FilterRule{
		{},
		{SrcIPs: []netip.Prefix{}, DstPorts: []NetPortRange{}},
		{SrcIPs: tenant, DstPorts: []NetPortRange{{Net: pfx("100.64.0.9/32"), Ports: PortRange{First: 22, Last: 22}}, {Net: pfx("fd5e:5a1e:d::9/128"), Ports: AllPorts}}, Origin: "policy.hujson:12"},
		{SrcIPs: []netip.Prefix{pfx("0.0.0.0/0"), pfx("::/0")}, DstPorts: []NetPortRange{{Net: pfx("10.1.0.0/24"), Ports: PortRange{First: 0, Last: 65535}}}, IPProto: []uint8{ProtoTCP, ProtoUDP, 255, 0}},
		{SrcIPs: []netip.Prefix{{}}, DstPorts: []NetPortRange{{}}, IPProto: []uint8{}, Origin: "é"},
	}
}

// TestFilterRuleDecodeFast: what AppendJSON writes takes the fast path and
// decodes to the rule encoded; the reflective decoder agrees.
func TestFilterRuleDecodeFast(t *testing.T) {
	for i, r := range canonicalRules() {
		data, err := r.AppendJSON(nil)
		if err != nil {
			t.Fatal(err)
		}
		got, ok := decodeRuleFast(data, FilterRule{})
		if !ok {
			t.Fatalf("rule %d: fast path refused its own form:\n%s", i, data)
		}
		var ref filterRuleFields
		if err := json.Unmarshal(data, &ref); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, FilterRule(ref)) {
			t.Fatalf("rule %d: fast path decoded\n%+v\nencoding/json decoded\n%+v", i, got, ref)
		}
	}
}

// FuzzFilterRuleDecode: FilterRule's UnmarshalJSON (fast path or not)
// decodes any input exactly as encoding/json decodes the plain struct,
// and fails exactly when it fails.
func FuzzFilterRuleDecode(f *testing.F) {
	for _, r := range canonicalRules() {
		data, _ := AppendFilterJSON(nil, []FilterRule{r, r})
		f.Add(data)
	}
	for _, s := range []string{
		`[null]`, `[{"src_ips":null,"dst_ports":null}]`, `[{"SRC_IPS":["1.2.3.4/32"],"dst_ports":[]}]`,
		`[{"src_ips":["1.2.3.4/32"],"dst_ports":[{"net":"1.2.3.4/32","ports":{"first":1e2,"last":70000}}]}]`,
		`[{"src_ips":["1.2.3.4/32"],"dst_ports":[],"origin":"a","origin":"b"}]`,
		`[{"src_ips":["1.2.3.4/32"],"dst_ports":[],"ip_proto":"BhE="}]`,
		`[{"src_ips":["1.2.3.4/32"],"dst_ports":[],"ip_proto":"!!"}]`,
		`[{"src_ips":["\u0031.2.3.4/32"],"dst_ports":[]}]`,
		`[{"src_ips":["1.2.3.4/33"],"dst_ports":[]}]`,
		`[{"src_ips":[""],"dst_ports":[{"net":"","ports":{"first":0,"last":0}}],"cap_grants":[{"dsts":[],"caps":{}}]}]`,
		`[{"src_ips":["1.2.3.4/32"],"dst_ports":[],"origin":"\xff"}]`,
		`[{"src_ips": ["1.2.3.4/32"], "dst_ports": []}]`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var got []FilterRule
		errGot := json.Unmarshal(data, &got)
		var want []filterRuleFields
		errWant := json.Unmarshal(data, &want)
		if (errGot == nil) != (errWant == nil) {
			t.Fatalf("UnmarshalJSON error %v; encoding/json error %v", errGot, errWant)
		}
		if errGot != nil {
			return
		}
		if len(got) != len(want) || (got == nil) != (want == nil) {
			t.Fatalf("decoded %d rules (nil %v); encoding/json %d (nil %v)", len(got), got == nil, len(want), want == nil)
		}
		for i := range got {
			if !reflect.DeepEqual(got[i], FilterRule(want[i])) {
				t.Fatalf("rule %d decoded\n%#v\nencoding/json decoded\n%#v", i, got[i], want[i])
			}
		}
	})
}

// BenchmarkFilterRuleDecode: a tenant node's filter (200 sources) by the
// reflective decoder and by UnmarshalJSON's fast path.
func BenchmarkFilterRuleDecode(b *testing.B) {
	data, _ := AppendFilterJSON(nil, canonicalRules()[2:3])
	b.Run("encoding/json", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			var f []filterRuleFields
			if err := json.Unmarshal(data, &f); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("UnmarshalJSON", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			var f []FilterRule
			if err := json.Unmarshal(data, &f); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// FuzzDecodeMapResponseFast: DecodeMapResponse (which takes the fast path
// for a response ending in a canonical filter) decodes any input as
// decodeMap decodes the whole, and fails exactly when it fails.
func FuzzDecodeMapResponseFast(f *testing.F) {
	self := testNode(1, "100.64.0.1")
	peer := testNode(2, "100.64.0.2")
	rules := canonicalRules()
	for _, r := range []MapResponse{
		{Epoch: "e", Version: 7, PacketFilter: &rules},
		{Epoch: "e", Version: 1, Full: true, Self: &self, Peers: []Node{peer}, PacketFilter: &rules},
		{Epoch: "e", Version: 2, PacketFilter: &[]FilterRule{}},
	} {
		data, err := json.Marshal(r)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
		// As the coordinator writes it: the filter last.
		head := r
		head.PacketFilter = nil
		h, _ := json.Marshal(head)
		data = append(h[:len(h)-1], filterTail[:len(filterTail)-1]...)
		data, _ = AppendFilterJSON(data, *r.PacketFilter)
		f.Add(append(data, '}'))
	}
	for _, s := range []string{
		`{"epoch":"e","version":1,"packet_filter":[{"src_ips":[],"dst_ports":[],"origin":"X"}],"packet_filter":[{"src_ips":[],"dst_ports":[]}]}`,
		`{"epoch":"e","version":1,"Packet_Filter":null,"packet_filter":[{"src_ips":[],"dst_ports":[]}]}`,
		`{"epoch":"e","self":{"packet_filter":[{"src_ips":[],"dst_ports":[]}]}}`,
		`{"epoch":"e","version":1,"packet_filter":[{"src_ips":[],"dst_ports":[]}]} `,
		`{"epoch":"e","version":-1,"packet_filter":[]}`,
		`{"epoch":"e","version":1,"x":",\"packet_filter\":[]}","packet_filter":[]}`,
		// The first occurrence nested in the head, the member last.
		`{"epoch":"e","self":{"id":1,"packet_filter":[]},"packet_filter":[{"src_ips":[],"dst_ports":[]}]}`,
		`{"epoch":"e","version":2,"peers_changed":[{"id":3,"packet_filter":[{"src_ips":[],"dst_ports":[]}]}]}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		got, errGot := DecodeMapResponse(data)
		var want MapResponse
		errWant := decodeMap(data, &want)
		if errWant == nil {
			errWant = want.Validate()
		}
		if (errGot == nil) != (errWant == nil) {
			t.Fatalf("DecodeMapResponse error %v; decodeMap (and Validate) error %v", errGot, errWant)
		}
		if errGot == nil && !reflect.DeepEqual(*got, want) {
			t.Fatalf("decoded\n%#v\ndecodeMap decoded\n%#v", *got, want)
		}
	})
}

// TestDecodeMapResponseFastTaken: a response as the coordinator writes it
// takes the fast path.
func TestDecodeMapResponseFastTaken(t *testing.T) {
	rules := canonicalRules()
	h, _ := json.Marshal(MapResponse{Epoch: "e", Version: 3})
	data := append(h[:len(h)-1], filterTail[:len(filterTail)-1]...)
	data, _ = AppendFilterJSON(data, rules)
	data = append(data, '}')
	r, ok := decodeFilterTailFast(data)
	if !ok {
		t.Fatalf("fast path refused\n%s", data)
	}
	var want MapResponse
	if err := decodeMap(data, &want); err != nil {
		t.Fatal(err)
	}
	if r.Version != 3 || len(*r.PacketFilter) != len(rules) || !reflect.DeepEqual(*r, want) {
		t.Fatalf("decoded %+v", r)
	}
}

// BenchmarkDecodeFilterUpdate: a tenant node's filter update (one rule of
// 200 sources), as the coordinator writes it, by encoding/json alone and
// by DecodeMapResponse.
func BenchmarkDecodeFilterUpdate(b *testing.B) {
	rules := canonicalRules()[2:3]
	h, _ := json.Marshal(MapResponse{Epoch: "e", Version: 3})
	data := append(h[:len(h)-1], filterTail[:len(filterTail)-1]...)
	data, _ = AppendFilterJSON(data, rules)
	data = append(data, '}')
	b.Run("encoding/json", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			var r MapResponse
			if err := decodeStrict(data, &r); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("DecodeMapResponse", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := DecodeMapResponse(data); err != nil {
				b.Fatal(err)
			}
		}
	})
}
