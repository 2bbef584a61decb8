package netmap

import "testing"

func TestIsCanonical(t *testing.T) {
	p := [32]byte{0: 0xed, 31: 0x7f} // 2^255-19, the field's modulus
	for i := 1; i < 31; i++ {
		p[i] = 0xff
	}
	below := p
	below[0] = 0xec
	top := [32]byte{0: 9, 31: 0x80}
	tests := []struct {
		name string
		k    [32]byte
		want bool
	}{
		{"base point 9", [32]byte{0: 9}, true},
		{"p-1", below, true},
		{"p (names 0)", p, false},
		{"top bit set (names 9)", top, false},
		{"all ones", [32]byte{0: 0xff, 31: 0xff}, false},
	}
	for _, tt := range tests {
		if got := NodePublic(tt.k).IsCanonical(); got != tt.want {
			t.Errorf("NodePublic %s: IsCanonical = %v, want %v", tt.name, got, tt.want)
		}
		if got := DiscoPublic(tt.k).IsCanonical(); got != tt.want {
			t.Errorf("DiscoPublic %s: IsCanonical = %v, want %v", tt.name, got, tt.want)
		}
	}
}
