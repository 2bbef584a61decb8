package netmap

import (
	"slices"
	"testing"
)

func TestMergePortRanges(t *testing.T) {
	pr := func(f, l uint16) PortRange { return PortRange{First: f, Last: l} }
	tests := []struct {
		name string
		in   []PortRange
		want []PortRange
	}{
		{"empty", nil, nil},
		{"one", []PortRange{pr(22, 22)}, []PortRange{pr(22, 22)}},
		{"unsorted, overlapping", []PortRange{pr(80, 90), pr(22, 22), pr(85, 100)}, []PortRange{pr(22, 22), pr(80, 100)}},
		{"adjacent", []PortRange{pr(1, 10), pr(11, 20)}, []PortRange{pr(1, 20)}},
		{"contained", []PortRange{pr(0, 65535), pr(443, 443)}, []PortRange{pr(0, 65535)}},
		{"gap kept", []PortRange{pr(1, 10), pr(12, 20)}, []PortRange{pr(1, 10), pr(12, 20)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := MergePortRanges(slices.Clone(tt.in)); !slices.Equal(got, tt.want) {
				t.Fatalf("MergePortRanges(%v) = %v, want %v", tt.in, got, tt.want)
			}
		})
	}
}

func TestPortRangesCover(t *testing.T) {
	pr := func(f, l uint16) PortRange { return PortRange{First: f, Last: l} }
	outer := []PortRange{pr(22, 22), pr(80, 443)}
	for _, tc := range []struct {
		inner []PortRange
		want  bool
	}{
		{nil, true},
		{[]PortRange{pr(22, 22), pr(100, 200)}, true},
		{[]PortRange{pr(21, 22)}, false},
		{[]PortRange{pr(80, 444)}, false},
		{[]PortRange{AllPorts}, false},
	} {
		if got := PortRangesCover(outer, tc.inner); got != tc.want {
			t.Errorf("PortRangesCover(%v, %v) = %v, want %v", outer, tc.inner, got, tc.want)
		}
	}
}
