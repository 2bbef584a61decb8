package netmap

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func TestDropKeyConflicts(t *testing.T) {
	nk := func(b byte) NodePublic { return NodePublic{b} }
	dk := func(b byte) DiscoPublic { return DiscoPublic{b} }
	peer := func(id NodeID, n NodePublic, d DiscoPublic) *Node {
		a := netip.PrefixFrom(netip.AddrFrom4([4]byte{100, 64, 0, byte(id)}), 32)
		return &Node{ID: id, NodeKey: n, DiscoKey: d, Addresses: []netip.Prefix{a}, AllowedIPs: []netip.Prefix{a}}
	}
	self := Node{ID: 100, NodeKey: nk(100), DiscoKey: dk(100)}
	for _, tc := range []struct {
		name      string
		peers     []*Node
		wantKept  []NodeID
		wantTexts []string
	}{
		{"no conflict", []*Node{peer(1, nk(1), dk(1)), peer(2, nk(2), dk(2))}, []NodeID{1, 2}, nil},
		{"two peers share a node key: both go",
			[]*Node{peer(1, nk(1), dk(1)), peer(2, nk(1), dk(2)), peer(3, nk(3), dk(3))}, []NodeID{3},
			[]string{"node key [01000000] claimed by peers 1, 2"}},
		{"three peers share a node key",
			[]*Node{peer(1, nk(1), dk(1)), peer(2, nk(1), dk(2)), peer(3, nk(1), dk(3))}, nil,
			[]string{"claimed by peers 1, 2, 3"}},
		{"a peer claims our node key",
			[]*Node{peer(1, nk(100), dk(1)), peer(2, nk(2), dk(2))}, []NodeID{2},
			[]string{"node key [64000000] claimed by peers 1 and this node"}},
		{"two peers share a disco key: both go",
			[]*Node{peer(1, nk(1), dk(7)), peer(2, nk(2), dk(7)), peer(3, nk(3), dk(3))}, []NodeID{3},
			[]string{"disco key d:07000000 claimed by peers 1, 2"}},
		{"a peer claims our disco key",
			[]*Node{peer(1, nk(1), dk(100))}, nil,
			[]string{"disco key d:64000000 claimed by peers 1 and this node"}},
		{"peers without disco keys are not a conflict",
			[]*Node{peer(1, nk(1), DiscoPublic{}), peer(2, nk(2), DiscoPublic{})}, []NodeID{1, 2}, nil},
		{"one peer in two conflicts",
			[]*Node{peer(1, nk(1), dk(1)), peer(2, nk(1), dk(2)), peer(3, nk(3), dk(2))}, nil,
			[]string{"disco key d:02000000 claimed by peers 2, 3", "node key [01000000] claimed by peers 1, 2"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := &NetworkMap{Self: self, Peers: map[NodeID]*Node{}}
			for _, p := range tc.peers {
				m.Peers[p.ID] = p
			}
			got := m.DropKeyConflicts()
			var kept []NodeID
			for _, p := range m.SortedPeers() {
				kept = append(kept, p.ID)
			}
			if !slices.Equal(kept, tc.wantKept) {
				t.Errorf("kept %v, want %v", kept, tc.wantKept)
			}
			if len(got) != len(tc.wantTexts) {
				t.Fatalf("conflicts %v, want %d", got, len(tc.wantTexts))
			}
			for i, c := range got {
				if !strings.Contains(c.String(), tc.wantTexts[i]) {
					t.Errorf("conflict %d = %q, want it to contain %q", i, c, tc.wantTexts[i])
				}
			}
		})
	}
}
