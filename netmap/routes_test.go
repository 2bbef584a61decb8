package netmap

import (
	"net/netip"
	"slices"
	"testing"
)

func TestCheckRoutableIPs(t *testing.T) {
	for _, tc := range []struct {
		in   []string
		want []string // nil: error
	}{
		{[]string{"10.1.0.0/24", "fd00:1::/64", "10.1.0.0/24"}, []string{"10.1.0.0/24", "fd00:1::/64"}},
		{[]string{"0.0.0.0/0", "::/0"}, []string{"0.0.0.0/0", "::/0"}},
		{[]string{}, []string{}},
		{[]string{"10.1.0.1/24"}, nil},         // host bits
		{[]string{"100.64.0.5/32"}, nil},       // another node's tailnet address
		{[]string{"100.64.0.0/10"}, nil},       // the tailnet range
		{[]string{"100.0.0.0/8"}, nil},         // around it
		{[]string{"fd5e:5a1e:d::/64"}, nil},    // the tailnet's IPv6 range
		{[]string{"0.0.0.0/1"}, nil},           // covers the tailnet
		{[]string{"127.0.0.0/8"}, nil},         // loopback
		{[]string{"169.254.0.0/16"}, nil},      // link-local
		{[]string{"224.0.0.0/4"}, nil},         // multicast
		{[]string{"fe80::/64"}, nil},           // link-local
		{[]string{"::ffff:10.0.0.0/104"}, nil}, // IPv4-mapped
	} {
		var in []netip.Prefix
		for _, s := range tc.in {
			in = append(in, netip.MustParsePrefix(s))
		}
		got, err := CheckRoutableIPs(in)
		if tc.want == nil {
			if err == nil {
				t.Errorf("CheckRoutableIPs(%v) = %v, want an error", tc.in, got)
			}
			continue
		}
		var want []netip.Prefix
		for _, s := range tc.want {
			want = append(want, netip.MustParsePrefix(s))
		}
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("CheckRoutableIPs(%v) = %v, %v; want %v", tc.in, got, err, want)
		}
	}
	if _, err := CheckRoutableIPs(make([]netip.Prefix, MaxRoutableIPs+1)); err == nil {
		t.Error("too many routes accepted")
	}
	if _, err := CheckRoutableIPs([]netip.Prefix{{}}); err == nil {
		t.Error("the zero prefix accepted")
	}
}

// FuzzCheckRoutableIPs: any text that parses as prefixes is either refused
// or comes back sorted, unique, masked and outside the tailnet's ranges.
func FuzzCheckRoutableIPs(f *testing.F) {
	for _, s := range []string{"10.1.0.0/24", "100.64.0.5/32", "0.0.0.0/0", "fd5e:5a1e:d::/64", "::ffff:1.2.3.0/120", "10.1.0.1/24"} {
		f.Add(s, "fd00::/64")
	}
	f.Fuzz(func(t *testing.T, a, b string) {
		var in []netip.Prefix
		for _, s := range []string{a, b} {
			if p, err := netip.ParsePrefix(s); err == nil {
				in = append(in, p)
			}
		}
		out, err := CheckRoutableIPs(in)
		if err != nil {
			return
		}
		for i, p := range out {
			if p.Masked() != p || (!IsExitRoute(p) && (p.Overlaps(TailnetIPv4Range) || p.Overlaps(TailnetIPv6Range))) {
				t.Fatalf("accepted %v from %v", p, in)
			}
			if i > 0 && out[i-1] == p {
				t.Fatalf("duplicate %v", p)
			}
		}
	})
}
