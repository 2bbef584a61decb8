package netmap

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"slices"
	"testing"
)

func TestFilterRuleJSON(t *testing.T) {
	pfx := netip.MustParsePrefix
	tests := []struct {
		name string
		r    FilterRule
	}{
		{"zero", FilterRule{}},
		{"empty slices", FilterRule{SrcIPs: []netip.Prefix{}, DstPorts: []NetPortRange{}, IPProto: []uint8{}, CapGrants: []CapGrant{}}},
		{"tenant", FilterRule{
			SrcIPs:   []netip.Prefix{pfx("100.64.0.1/32"), pfx("fd7a:115c:a1e0::1/128"), pfx("10.0.0.0/8")},
			DstPorts: []NetPortRange{{Net: pfx("100.64.0.9/32"), Ports: AllPorts}, {Net: pfx("fd7a:115c:a1e0::9/128"), Ports: PortRange{First: 22, Last: 22}}},
			IPProto:  []uint8{ProtoTCP, ProtoUDP, 255, 0},
			Origin:   "policy.hujson:12",
		}},
		{"zero prefix", FilterRule{SrcIPs: []netip.Prefix{{}}, DstPorts: []NetPortRange{{}}}},
		{"origin needing escapes", FilterRule{Origin: "a\"b\\c<d>&e\x01\u2028é\xff"}},
		{"cap grants", FilterRule{CapGrants: []CapGrant{{
			Dsts: []netip.Prefix{pfx("100.64.0.9/32")},
			Caps: map[string][]json.RawMessage{"example.com/cap/x": {json.RawMessage(`{"a": 1}`)}, "b": nil},
		}}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, f := range [][]FilterRule{{tt.r}, {tt.r, tt.r}} {
				want, err := json.Marshal(f)
				if err != nil {
					t.Fatal(err)
				}
				got, err := AppendFilterJSON([]byte("x"), f)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got[1:], want) || got[0] != 'x' {
					t.Fatalf("encoded\n%s\nwant x + (encoding/json)\n%s", got, want)
				}
			}
		})
	}
}

// FuzzFilterRuleJSON holds MarshalJSON to encoding/json's encoding for
// arbitrary addresses, ports, protocols and origins.
func FuzzFilterRuleJSON(f *testing.F) {
	f.Add([]byte{100, 64, 0, 1}, uint8(32), uint16(22), uint16(80), []byte{6, 17}, "policy.hujson:3")
	f.Add([]byte{0xfd, 0x7a, 0x11, 0x5c, 0xa1, 0xe0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1}, uint8(128), uint16(0), uint16(65535), []byte(nil), "<&>\"\\\x00é")
	f.Fuzz(func(t *testing.T, addr []byte, bits uint8, first, last uint16, proto []byte, origin string) {
		a, ok := netip.AddrFromSlice(addr)
		var p netip.Prefix
		if ok {
			p = netip.PrefixFrom(a, int(bits)) // may be invalid: encoded as such
		}
		r := FilterRule{
			SrcIPs:   []netip.Prefix{p, p},
			DstPorts: []NetPortRange{{Net: p, Ports: PortRange{First: first, Last: last}}},
			IPProto:  proto,
			Origin:   origin,
		}
		f := []FilterRule{r}
		want, err := json.Marshal(f)
		if err != nil {
			t.Skip("not encodable by encoding/json either")
		}
		got, err := AppendFilterJSON(nil, f)
		if err != nil {
			t.Fatalf("AppendFilterJSON: %v (encoding/json: %s)", err, want)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("encoded\n%s\nwant\n%s", got, want)
		}
		// A list long enough for FilterEncoder to remember, encoded twice
		// (the second time from memory).
		long := []FilterRule{r}
		long[0].SrcIPs = slices.Repeat([]netip.Prefix{p}, minCachedList)
		if want, err = json.Marshal(long); err != nil {
			t.Skip("not encodable by encoding/json either")
		}
		var e FilterEncoder
		for range 2 {
			if got, err = e.Append(nil, long); err != nil || !bytes.Equal(got, want) {
				t.Fatalf("FilterEncoder: %v\n%s\nwant\n%s", err, got, want)
			}
		}
	})
}

// BenchmarkFilterJSON: a tenant node's filter (200 sources) by
// encoding/json and by AppendFilterJSON.
func BenchmarkFilterJSON(b *testing.B) {
	f := []FilterRule{{Origin: "policy.hujson:4", DstPorts: []NetPortRange{{Net: netip.MustParsePrefix("100.64.0.9/32"), Ports: AllPorts}}}}
	for i := range 100 {
		f[0].SrcIPs = append(f[0].SrcIPs, netip.PrefixFrom(netip.AddrFrom4([4]byte{100, 64, byte(i >> 8), byte(i)}), 32))
		f[0].SrcIPs = append(f[0].SrcIPs, netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfd, 0x7a, 0x11, 0x5c, 0xa1, 0xe0, 14: byte(i >> 8), 15: byte(i)}), 128))
	}
	b.Run("encoding/json", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := json.Marshal(f); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("AppendFilterJSON", func(b *testing.B) {
		var buf []byte
		b.ReportAllocs()
		for b.Loop() {
			buf, _ = AppendFilterJSON(buf[:0], f)
		}
	})
	b.Run("FilterEncoder", func(b *testing.B) {
		// The sources shared by every node of the tenant: what a policy
		// engine hands out.
		var e FilterEncoder
		var buf []byte
		b.ReportAllocs()
		for b.Loop() {
			buf, _ = e.Append(buf[:0], f)
		}
	})
}

// TestFilterEncoder: the encoder writes what encoding/json writes, reuses
// a shared source list's JSON, and encodes anew a list that was changed
// in place, shortened, or is another list with equal contents.
func TestFilterEncoder(t *testing.T) {
	srcs := func(n int, third byte) []netip.Prefix {
		var ps []netip.Prefix
		for i := range n {
			ps = append(ps, netip.PrefixFrom(netip.AddrFrom4([4]byte{100, 64, third, byte(i)}), 32))
		}
		return ps
	}
	shared := srcs(20, 0)
	rule := func(ps []netip.Prefix, dst byte) []FilterRule {
		return []FilterRule{
			{SrcIPs: ps, DstPorts: []NetPortRange{{Net: netip.PrefixFrom(netip.AddrFrom4([4]byte{100, 64, 9, dst}), 32), Ports: AllPorts}}, Origin: "p:1"},
			{SrcIPs: srcs(3, 7), DstPorts: []NetPortRange{}}, // short: not remembered
		}
	}
	var e FilterEncoder
	check := func(step string, f []FilterRule) {
		t.Helper()
		want, err := json.Marshal(f)
		if err != nil {
			t.Fatal(err)
		}
		got, err := e.Append([]byte("x"), f)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got[1:], want) || got[0] != 'x' {
			t.Fatalf("%s: encoded\n%s\nwant x + (encoding/json)\n%s", step, got, want)
		}
	}
	check("first node", rule(shared, 1))
	check("second node, same sources", rule(shared, 2))
	if len(e.srcs.lists) != 1 {
		t.Fatalf("%d source lists remembered; want the shared one only", len(e.srcs.lists))
	}
	shared[5] = netip.MustParsePrefix("10.9.9.9/32")
	check("sources changed in place", rule(shared, 3))
	check("sources shortened", rule(shared[:10], 4))
	check("equal copy", rule(slices.Clone(shared), 5))
	check("nil and empty", []FilterRule{{}, {SrcIPs: []netip.Prefix{}}})
	check("nil filter", nil)

	for i := range maxCachedLists + 10 {
		check("many lists", rule(srcs(10, byte(i)), 1))
	}
	if len(e.srcs.lists) > maxCachedLists {
		t.Fatalf("%d source lists remembered; the bound is %d", len(e.srcs.lists), maxCachedLists)
	}
}
