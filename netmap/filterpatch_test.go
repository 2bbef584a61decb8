package netmap

import (
	"cmp"
	"encoding/json"
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func pfxs(s ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, x := range s {
		out = append(out, netip.MustParsePrefix(x))
	}
	return out
}

func TestApplyFilterPatch(t *testing.T) {
	dst := []NetPortRange{{Net: netip.MustParsePrefix("100.64.0.1/32"), Ports: AllPorts}}
	base := []FilterRule{
		{SrcIPs: pfxs("100.64.0.2/32", "100.64.0.4/32", "fd7a:115c:a1e0::2/128"), DstPorts: dst},
		{SrcIPs: pfxs("10.0.0.0/8"), DstPorts: dst, IPProto: []uint8{6}},
	}
	tests := []struct {
		name    string
		patch   []FilterRulePatch
		want    []netip.Prefix // rule 0's sources after
		want1   []netip.Prefix // rule 1's, when not base's
		wantErr string         // empty: applies
		full    bool           // the error asks for a full map
	}{
		{name: "add in the middle and at both ends",
			patch: []FilterRulePatch{{Rule: 0, Add: pfxs("100.64.0.1/32", "100.64.0.3/32", "fd7a:115c:a1e0::9/128")}},
			want:  pfxs("100.64.0.1/32", "100.64.0.2/32", "100.64.0.3/32", "100.64.0.4/32", "fd7a:115c:a1e0::2/128", "fd7a:115c:a1e0::9/128")},
		{name: "remove",
			patch: []FilterRulePatch{{Rule: 0, Remove: pfxs("100.64.0.2/32", "fd7a:115c:a1e0::2/128")}},
			want:  pfxs("100.64.0.4/32")},
		{name: "add and remove, two rules",
			patch: []FilterRulePatch{{Rule: 0, Add: pfxs("100.64.0.3/32"), Remove: pfxs("100.64.0.4/32")}, {Rule: 1, Add: pfxs("10.0.0.0/7")}},
			want:  pfxs("100.64.0.2/32", "100.64.0.3/32", "fd7a:115c:a1e0::2/128"),
			want1: pfxs("10.0.0.0/7", "10.0.0.0/8")},
		{name: "remove everything",
			patch: []FilterRulePatch{{Rule: 0, Remove: pfxs("100.64.0.2/32", "100.64.0.4/32", "fd7a:115c:a1e0::2/128")}},
			want:  pfxs()},
		{name: "rule past the end", patch: []FilterRulePatch{{Rule: 2, Add: pfxs("100.64.0.3/32")}}, wantErr: "rule 2 of 2", full: true},
		{name: "remove what is not there", patch: []FilterRulePatch{{Rule: 0, Remove: pfxs("100.64.0.3/32")}}, wantErr: "not there", full: true},
		{name: "remove past the end", patch: []FilterRulePatch{{Rule: 0, Remove: pfxs("fd7a:115c:a1e0::3/128")}}, wantErr: "not there", full: true},
		{name: "add what is there", patch: []FilterRulePatch{{Rule: 0, Add: pfxs("100.64.0.4/32")}}, wantErr: "which is there", full: true},
		{name: "negative rule", patch: []FilterRulePatch{{Rule: -1, Add: pfxs("100.64.0.3/32")}}, wantErr: "out of order or negative"},
		{name: "rules out of order", patch: []FilterRulePatch{{Rule: 1, Add: pfxs("10.0.0.0/7")}, {Rule: 0, Add: pfxs("100.64.0.3/32")}}, wantErr: "out of order"},
		{name: "rule twice", patch: []FilterRulePatch{{Rule: 0, Add: pfxs("100.64.0.3/32")}, {Rule: 0, Add: pfxs("100.64.0.5/32")}}, wantErr: "out of order"},
		{name: "empty", patch: []FilterRulePatch{{Rule: 0}}, wantErr: "changes nothing"},
		{name: "unsorted adds", patch: []FilterRulePatch{{Rule: 0, Add: pfxs("100.64.0.5/32", "100.64.0.3/32")}}, wantErr: "ascending"},
		{name: "repeated removes", patch: []FilterRulePatch{{Rule: 0, Remove: pfxs("100.64.0.2/32", "100.64.0.2/32")}}, wantErr: "ascending"},
		{name: "added and removed", patch: []FilterRulePatch{{Rule: 0, Add: pfxs("100.64.0.3/32"), Remove: pfxs("100.64.0.3/32")}}, wantErr: "both added and removed"},
		{name: "invalid prefix", patch: []FilterRulePatch{{Rule: 0, Add: []netip.Prefix{{}}}}, wantErr: "invalid prefix"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := cloneRules(base)
			got, err := ApplyFilterPatch(base, tt.patch)
			if !rulesEqual(base, before) {
				t.Fatalf("the filter patched was modified: %+v", base)
			}
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v; want one containing %q", err, tt.wantErr)
				}
				if errors.Is(err, ErrNeedFullMap) != tt.full {
					t.Fatalf("err %v: asks for a full map = %v; want %v", err, !tt.full, tt.full)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			want1 := base[1].SrcIPs
			if tt.want1 != nil {
				want1 = tt.want1
			}
			if !slices.Equal(got[0].SrcIPs, tt.want) || !slices.Equal(got[1].SrcIPs, want1) {
				t.Fatalf("got sources %v and %v; want %v and %v", got[0].SrcIPs, got[1].SrcIPs, tt.want, want1)
			}
			if !slices.Equal(got[0].DstPorts, base[0].DstPorts) || !slices.Equal(got[1].IPProto, base[1].IPProto) {
				t.Fatalf("a patch changed more than sources: %+v", got)
			}
		})
	}
}

// TestApplyFilterPatchRepeatedSource: a source listed twice is never left
// behind by its removal.
func TestApplyFilterPatchRepeatedSource(t *testing.T) {
	f := []FilterRule{{SrcIPs: pfxs("100.64.0.2/32", "100.64.0.4/32", "100.64.0.4/32")}}
	_, err := ApplyFilterPatch(f, []FilterRulePatch{{Rule: 0, Remove: pfxs("100.64.0.4/32")}})
	if !errors.Is(err, ErrNeedFullMap) {
		t.Fatalf("removing a repeated source: %v; want a request for a full map", err)
	}
}

func cloneRules(f []FilterRule) []FilterRule {
	out := slices.Clone(f)
	for i := range out {
		out[i].SrcIPs = slices.Clone(out[i].SrcIPs)
	}
	return out
}

func rulesEqual(a, b []FilterRule) bool {
	x, _ := json.Marshal(a)
	y, _ := json.Marshal(b)
	return string(x) == string(y)
}

// TestNetworkMapFilterPatch: a patch in a delta changes the map's filter;
// one that does not fit leaves the whole map as it was and asks for a full
// map; a patch next to a whole filter or in a full map is refused.
func TestNetworkMapFilterPatch(t *testing.T) {
	self := testNode(1, "100.64.0.1")
	p := testNode(2, "100.64.0.2")
	f := []FilterRule{{SrcIPs: pfxs("100.64.0.2/32"), DstPorts: []NetPortRange{{Net: netip.MustParsePrefix("100.64.0.1/32"), Ports: AllPorts}}}}
	var m NetworkMap
	if err := m.Apply(&MapResponse{Epoch: "e", Version: 1, Full: true, Self: &self, Peers: []Node{p}, PacketFilter: &f}); err != nil {
		t.Fatal(err)
	}
	decode := func(s string) *MapResponse {
		t.Helper()
		r, err := DecodeMapResponse([]byte(s))
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	if err := m.Apply(decode(`{"epoch":"e","version":2,"packet_filter_patch":[{"rule":0,"add":["100.64.0.3/32"]}]}`)); err != nil {
		t.Fatal(err)
	}
	if got := m.PacketFilter[0].SrcIPs; !slices.Equal(got, pfxs("100.64.0.2/32", "100.64.0.3/32")) || m.Version != 2 {
		t.Fatalf("after the patch: sources %v, version %d", got, m.Version)
	}
	if !slices.Equal(f[0].SrcIPs, pfxs("100.64.0.2/32")) {
		t.Fatalf("the full map's filter was modified in place: %v", f[0].SrcIPs)
	}
	before, _ := json.Marshal(m)
	err := m.Apply(decode(`{"epoch":"e","version":3,"peers_removed":[2],"packet_filter_patch":[{"rule":0,"remove":["100.64.0.9/32"]}]}`))
	if !errors.Is(err, ErrNeedFullMap) {
		t.Fatalf("a patch that does not fit: %v; want ErrNeedFullMap", err)
	}
	if after, _ := json.Marshal(m); string(after) != string(before) {
		t.Fatalf("a refused delta changed the map:\n%s\n%s", before, after)
	}
	for _, bad := range []string{
		`{"epoch":"e","version":3,"packet_filter":[],"packet_filter_patch":[{"rule":0,"add":["100.64.0.4/32"]}]}`,
		`{"epoch":"e","version":3,"full":true,"self":` + mustJSON(t, self) + `,"packet_filter_patch":[{"rule":0,"add":["100.64.0.4/32"]}]}`,
		`{"epoch":"e","version":3,"packet_filter_patch":[{"rule":0,"add":["100.64.0.4/32","100.64.0.4/32"]}]}`,
	} {
		if _, err := DecodeMapResponse([]byte(bad)); err == nil {
			if err := m.Apply(decode(bad)); err == nil {
				t.Errorf("accepted %s", bad)
			}
		}
	}
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// FuzzApplyFilterPatch: any patch either applies, leaving sources that
// are ascending and exactly the old ones minus Remove plus Add, or is
// refused; the filter patched is never modified.
func FuzzApplyFilterPatch(f *testing.F) {
	f.Add([]byte(`[{"rule":0,"add":["100.64.0.3/32"],"remove":["100.64.0.2/32"]}]`))
	f.Add([]byte(`[{"rule":1,"add":["::/0"]}]`))
	f.Add([]byte(`[{"rule":0,"remove":["fd7a:115c:a1e0::2/128"]},{"rule":1,"remove":["10.0.0.0/8"]}]`))
	f.Add([]byte(`[{"rule":1,"dst_ports":[{"net":"100.64.0.1/32","ports":{"first":80,"last":80}}],"ip_proto":"Bg==","origin":"p:2"}]`))
	f.Add([]byte(`[{"rule":0,"dst_ports":[{"net":"100.64.0.1/32","ports":{"first":90,"last":80}}]}]`))
	f.Add([]byte(`[{"rule":0,"dst_ports":[],"cap_grants":[]}]`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var ps []FilterRulePatch
		if json.Unmarshal(data, &ps) != nil {
			return
		}
		dst := []NetPortRange{{Net: netip.MustParsePrefix("100.64.0.1/32"), Ports: AllPorts}}
		base := []FilterRule{
			{SrcIPs: pfxs("100.64.0.2/32", "100.64.0.4/32", "fd7a:115c:a1e0::2/128"), DstPorts: dst, Origin: "p:1"},
			{SrcIPs: pfxs("10.0.0.0/8"), DstPorts: dst, IPProto: []uint8{6}},
		}
		before := cloneRules(base)
		got, err := ApplyFilterPatch(base, ps)
		if !rulesEqual(base, before) {
			t.Fatal("patched filter modified")
		}
		if err != nil {
			return
		}
		for _, p := range ps {
			want := map[netip.Prefix]bool{}
			for _, x := range base[p.Rule].SrcIPs {
				want[x] = true
			}
			for _, x := range p.Remove {
				if !want[x] {
					t.Fatalf("removed %v, which was not there", x)
				}
				delete(want, x)
			}
			for _, x := range p.Add {
				if want[x] {
					t.Fatalf("added %v, which was there", x)
				}
				want[x] = true
			}
			srcs := got[p.Rule].SrcIPs
			if !ascending(srcs) || len(srcs) != len(want) {
				t.Fatalf("rule %d: %v; want the %d sources %v, ascending", p.Rule, srcs, len(want), want)
			}
			for _, x := range srcs {
				if !want[x] {
					t.Fatalf("rule %d: %v has %v", p.Rule, srcs, x)
				}
			}
			r, b := got[p.Rule], base[p.Rule]
			if err := r.Validate(); err != nil {
				t.Fatalf("rule %d patched into an invalid one: %v", p.Rule, err)
			}
			for _, c := range []struct {
				name      string
				replaced  bool
				got, want any
			}{
				{"dst_ports", p.DstPorts != nil, r.DstPorts, b.DstPorts},
				{"ip_proto", p.IPProto != nil, r.IPProto, b.IPProto},
				{"cap_grants", p.CapGrants != nil, r.CapGrants, b.CapGrants},
				{"origin", p.Origin != nil, r.Origin, b.Origin},
			} {
				if c.replaced {
					continue
				}
				x, _ := json.Marshal(c.got)
				y, _ := json.Marshal(c.want)
				if string(x) != string(y) {
					t.Fatalf("rule %d: %s changed to %s by a patch that does not replace it", p.Rule, c.name, x)
				}
			}
			if p.DstPorts != nil && !slices.Equal(r.DstPorts, *p.DstPorts) {
				t.Fatalf("rule %d: dst_ports %v; the patch set %v", p.Rule, r.DstPorts, *p.DstPorts)
			}
		}
	})
}

// FuzzComparePrefix: ComparePrefix orders prefixes as netip.Addr.Compare
// then the length do, the order the policy engine sorted sources in before.
func FuzzComparePrefix(f *testing.F) {
	f.Add([]byte{100, 64, 0, 1}, uint8(32), []byte{100, 64, 0, 2}, uint8(32))
	f.Add([]byte{100, 64, 0, 1}, uint8(32), []byte{0xfd, 0x7a, 0x11, 0x5c, 0xa1, 0xe0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1}, uint8(128))
	f.Add([]byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 100, 64, 0, 1}, uint8(96), []byte{100, 64, 0, 1}, uint8(24))
	f.Fuzz(func(t *testing.T, a []byte, abits uint8, b []byte, bbits uint8) {
		pfx := func(x []byte, bits uint8) netip.Prefix {
			ip, ok := netip.AddrFromSlice(x)
			if !ok {
				return netip.Prefix{}
			}
			return netip.PrefixFrom(ip, int(bits))
		}
		p, q := pfx(a, abits), pfx(b, bbits)
		want := p.Addr().Compare(q.Addr())
		if want == 0 {
			want = cmp.Compare(p.Bits(), q.Bits())
		}
		if got := ComparePrefix(p, q); got != want {
			t.Fatalf("ComparePrefix(%v, %v) = %d; want %d", p, q, got, want)
		}
	})
}
