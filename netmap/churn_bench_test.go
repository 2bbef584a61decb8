package netmap

import (
	"encoding/json"
	"net/netip"
	"testing"
	"time"
)

// churnNode is a peer as the coordinator describes a joining node.
func churnNode(i int) Node {
	v4 := netip.PrefixFrom(netip.AddrFrom4([4]byte{100, 64, byte(i >> 8), byte(i)}), 32)
	v6 := netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfd, 0x7a, 0x11, 0x5c, 0xa1, 0xe0, 14: byte(i >> 8), 15: byte(i)}), 128)
	return Node{
		ID: NodeID(i), Hostname: "eph-123456", DNSName: "eph-123456.meshd.internal.", OS: "linux",
		Tags:       []string{"tag:tenant-17"},
		MachineKey: MachinePublic{1, byte(i)}, NodeKey: NodePublic{2, byte(i)}, DiscoKey: DiscoPublic{3, byte(i)},
		Addresses: []netip.Prefix{v4, v6}, AllowedIPs: []netip.Prefix{v4, v6},
		Endpoints: []netip.AddrPort{netip.MustParseAddrPort("192.0.2.7:41641"), netip.MustParseAddrPort("[2001:db8::7]:41641")},
		HomeDERP:  1, Online: true, Created: time.Date(2026, 12, 4, 10, 0, 0, 0, time.UTC), Ephemeral: true,
	}
}

// BenchmarkChurnFrames: what a member of a tenant of 100 does per join and
// leave of another member: decode and apply the join (the node and its
// filter patch in one frame) and the leave (its removal and patch).
func BenchmarkChurnFrames(b *testing.B) {
	var srcs []netip.Prefix
	peers := map[NodeID]*Node{}
	for i := 1; i <= 99; i++ {
		n := churnNode(i)
		peers[n.ID] = &n
		srcs = append(srcs, n.Addresses...)
	}
	srcs = append(srcs, churnNode(100).Addresses...)
	SortPrefixes(srcs)
	self := churnNode(100)
	nm := NetworkMap{Epoch: "e", Version: 1, Self: self, Peers: peers,
		PacketFilter: []FilterRule{{SrcIPs: srcs, DstPorts: []NetPortRange{{Net: self.Addresses[0], Ports: AllPorts}, {Net: self.Addresses[1], Ports: AllPorts}}}}}
	joiner := churnNode(300)
	join, err := json.Marshal(&MapResponse{Epoch: "e", Version: 2, PeersChanged: []Node{joiner},
		PacketFilterPatch: []FilterRulePatch{{Rule: 0, Add: joiner.Addresses}}})
	if err != nil {
		b.Fatal(err)
	}
	leave, err := json.Marshal(&MapResponse{Epoch: "e", Version: 3, PeersRemoved: []NodeID{joiner.ID},
		PacketFilterPatch: []FilterRulePatch{{Rule: 0, Remove: joiner.Addresses}}})
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		for _, f := range [][]byte{join, leave} {
			r, err := DecodeMapResponse(f)
			if err != nil {
				b.Fatal(err)
			}
			if err := nm.Apply(r); err != nil {
				b.Fatal(err)
			}
		}
	}
}
