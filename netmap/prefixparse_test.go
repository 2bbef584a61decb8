package netmap

import (
	"net/netip"
	"testing"
)

func TestParsePrefixFast(t *testing.T) {
	tests := []struct {
		in     string
		fastOK bool // the fast path decides (else netip does)
	}{
		{"100.64.0.1/32", true},
		{"0.0.0.0/0", true},
		{"255.255.255.255/32", true},
		{"10.1.0.0/24", true},
		{"fd5e:5a1e:d::1/128", true},
		{"::/0", true},
		{"::1/128", true},
		{"1::/16", true},
		{"1:2:3:4:5:6:7:8/128", true},
		{"1:2:3:4:5:6::8/128", true},
		{"FD5E::ABCD/64", true},
		{"", false},
		{"1.2.3.4", false},
		{"1.2.3.4/33", false},
		{"1.2.3.4/032", false},
		{"01.2.3.4/32", false},
		{"1.2.3/24", false},
		{"1.2.3.4.5/32", false},
		{"1.2.3.256/32", false},
		{"1.2.3./32", false},
		{"::ffff:1.2.3.4/128", false},
		{"fe80::1%eth0/64", false},
		{"1:2:3:4:5:6:7:8::/128", false},
		{"1:2:3:4:5:6:7::8/128", false},
		{"1::2::3/128", false},
		{"12345::/16", false},
		{"1:2:3:4:5:6:7/128", false},
		{"::/129", false},
		{"1:/16", false},
		{"/0", false},
		{"1.2.3.4/-1", false},
		{"1.2.3.4/+1", false},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, ok := parsePrefixFast([]byte(tt.in))
			if ok != tt.fastOK {
				t.Errorf("fast path took %q: %v, want %v", tt.in, ok, tt.fastOK)
			}
			want, err := netip.ParsePrefix(tt.in)
			if ok && (err != nil || got != want) {
				t.Errorf("parsePrefixFast(%q) = %v; netip: %v, %v", tt.in, got, want, err)
			}
		})
	}
}

// FuzzParsePrefixFast checks that whatever the fast path decides, netip
// decides the same.
func FuzzParsePrefixFast(f *testing.F) {
	for _, s := range []string{"100.64.0.1/32", "fd5e:5a1e:d::1/128", "::/0", "1:2:3:4:5:6:7:8/128", "1.2.3.4/33", "::ffff:1.2.3.4/96", "fe80::1%x/64"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		got, ok := parsePrefixFast([]byte(s))
		if !ok {
			return
		}
		want, err := netip.ParsePrefix(s)
		if err != nil || got != want {
			t.Fatalf("parsePrefixFast(%q) = %v; netip.ParsePrefix: %v, %v", s, got, want, err)
		}
	})
}
