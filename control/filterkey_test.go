package control

import (
	"bytes"
	"encoding/json"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"meshd.dev/meshd/netmap"
)

// randFilter builds a filter from a small alphabet, so that random pairs
// are often equal or differ in one place.
func randFilter(r *rand.Rand) []netmap.FilterRule {
	prefixes := []netip.Prefix{
		netip.MustParsePrefix("100.64.0.1/32"), netip.MustParsePrefix("100.64.0.0/10"),
		netip.MustParsePrefix("fd5e:5a1e:d::1/128"), netip.MustParsePrefix("::ffff:100.64.0.1/128"),
		netip.MustParsePrefix("0.0.0.0/0"), {},
	}
	pfx := func() []netip.Prefix {
		out := []netip.Prefix{}
		for range r.IntN(3) {
			out = append(out, prefixes[r.IntN(len(prefixes))])
		}
		return out
	}
	f := []netmap.FilterRule{}
	for range r.IntN(3) {
		rule := netmap.FilterRule{SrcIPs: pfx(), DstPorts: []netmap.NetPortRange{}, Origin: []string{"", "p.hujson:3:5", "p.hujson:30:5"}[r.IntN(3)]}
		for range r.IntN(3) {
			rule.DstPorts = append(rule.DstPorts, netmap.NetPortRange{Net: prefixes[r.IntN(len(prefixes))], Ports: netmap.PortRange{First: uint16(r.IntN(2) * 22), Last: uint16(22 + r.IntN(2))}})
		}
		if r.IntN(2) == 0 {
			rule.IPProto = []uint8{netmap.ProtoTCP, netmap.ProtoUDP}[:1+r.IntN(2)]
		}
		if r.IntN(3) == 0 {
			caps := map[string][]json.RawMessage{"example.com/cap/a": {json.RawMessage(`{"role":"admin"}`)}}
			if r.IntN(2) == 0 {
				caps["example.com/cap/b"] = []json.RawMessage{json.RawMessage(`1`)}
			}
			rule.CapGrants = []netmap.CapGrant{{Dsts: pfx(), Caps: caps}}
		}
		f = append(f, rule)
	}
	return f
}

// TestFilterKeyMatchesJSON: two filters have the same key exactly when
// they encode to the same JSON, which is what the key replaces.
func TestFilterKeyMatchesJSON(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	equal, differ := 0, 0
	for range 20000 {
		a, b := randFilter(r), randFilter(r)
		ja, _ := json.Marshal(a)
		jb, _ := json.Marshal(b)
		sameJSON := bytes.Equal(ja, jb)
		sameKey := bytes.Equal(filterKey(nil, a), filterKey(nil, b))
		if sameJSON != sameKey {
			t.Fatalf("JSON equal %v, key equal %v:\n%s\n%s", sameJSON, sameKey, ja, jb)
		}
		if sameJSON {
			equal++
		} else {
			differ++
		}
	}
	// The alphabet is small enough that both outcomes are exercised.
	if equal < 100 || differ < 100 {
		t.Fatalf("only %d equal and %d differing pairs: the generator does not exercise both", equal, differ)
	}
}

// TestFilterKeyBoundaries: parts that would run together without their
// length prefixes still give different keys.
func TestFilterKeyBoundaries(t *testing.T) {
	p1, p2 := netip.MustParsePrefix("100.64.0.1/32"), netip.MustParsePrefix("100.64.0.2/32")
	for _, tc := range []struct {
		name string
		a, b []netmap.FilterRule
	}{
		{"source moves to the next rule",
			[]netmap.FilterRule{{SrcIPs: []netip.Prefix{p1, p2}}, {}},
			[]netmap.FilterRule{{SrcIPs: []netip.Prefix{p1}}, {SrcIPs: []netip.Prefix{p2}}}},
		{"origin text split differently",
			[]netmap.FilterRule{{Origin: "ab"}, {Origin: "c"}},
			[]netmap.FilterRule{{Origin: "a"}, {Origin: "bc"}}},
		{"IPv4 and its IPv6 mapping",
			[]netmap.FilterRule{{SrcIPs: []netip.Prefix{netip.MustParsePrefix("1.2.3.4/32")}}},
			[]netmap.FilterRule{{SrcIPs: []netip.Prefix{netip.MustParsePrefix("::ffff:1.2.3.4/128")}}}},
		{"protocol", []netmap.FilterRule{{IPProto: []uint8{6}}}, []netmap.FilterRule{{IPProto: []uint8{17}}}},
		{"port range", []netmap.FilterRule{{DstPorts: []netmap.NetPortRange{{Net: p1, Ports: netmap.PortRange{First: 1, Last: 2}}}}},
			[]netmap.FilterRule{{DstPorts: []netmap.NetPortRange{{Net: p1, Ports: netmap.PortRange{First: 1, Last: 3}}}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if bytes.Equal(filterKey(nil, tc.a), filterKey(nil, tc.b)) {
				t.Fatal("different filters got the same key")
			}
		})
	}
}

// TestFilterKeyerMatchesFilterKey: the keyer's remembered source lists
// give byte for byte the keys filterKey writes, for lists shared between
// filters, reused after a change in place, and new.
func TestFilterKeyerMatchesFilterKey(t *testing.T) {
	tenant := make([]netip.Prefix, 0, 40)
	for i := range 20 {
		tenant = append(tenant, netip.PrefixFrom(netip.AddrFrom4([4]byte{100, 64, 0, byte(i)}), 32))
	}
	rule := func(srcs []netip.Prefix, dst byte) []netmap.FilterRule {
		return []netmap.FilterRule{{SrcIPs: srcs, DstPorts: []netmap.NetPortRange{{Net: netip.PrefixFrom(netip.AddrFrom4([4]byte{100, 64, 0, dst}), 32), Ports: netmap.PortRange{Last: 65535}}}}}
	}
	var k filterKeyer
	check := func(what string, f []netmap.FilterRule) {
		t.Helper()
		if got, want := k.append(nil, f), filterKey(nil, f); !bytes.Equal(got, want) {
			t.Fatalf("%s: keyer wrote %x, filterKey %x", what, got, want)
		}
	}
	for dst := range byte(5) {
		check("shared list", rule(tenant, dst))
	}
	tenant[3] = netip.MustParsePrefix("100.64.9.9/32") // changed in place
	check("list changed in place", rule(tenant, 1))
	tenant = append(tenant, netip.MustParsePrefix("100.64.9.10/32")) // same array, longer
	check("list grown in place", rule(tenant, 1))
	check("shorter view of the same array", rule(tenant[:10], 1))
	check("short list", rule(tenant[:3], 1))
	check("a copy", rule(slices.Clone(tenant), 2))
	if a, b := k.append(nil, rule(tenant, 1)), k.append(nil, rule(tenant[:len(tenant)-1], 1)); bytes.Equal(a, b) {
		t.Fatal("a list and its prefix got one key")
	}
}
