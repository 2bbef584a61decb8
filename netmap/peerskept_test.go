package netmap

import (
	"errors"
	"fmt"
	"net/netip"
	"testing"
)

// TestPeersKept: a full map that keeps peers replaces everything but them,
// and only a full map without a peer list may say so.
func TestPeersKept(t *testing.T) {
	self, p := testNode(1, "100.64.0.1"), testNode(2, "100.64.0.2")
	var m NetworkMap
	if err := m.Apply(&MapResponse{Epoch: "a", Version: 1, Full: true, Self: &self, Peers: []Node{p}}); err != nil {
		t.Fatal(err)
	}
	digest := m.PeersDigest()
	self.Hostname = "renamed"
	f := []FilterRule{}
	if err := m.Apply(&MapResponse{Epoch: "b", Version: 7, Full: true, Self: &self, PeersKept: true, PacketFilter: &f}); err != nil {
		t.Fatal(err)
	}
	if m.Epoch != "b" || m.Version != 7 || m.Self.Hostname != "renamed" || m.PacketFilter == nil || len(m.Peers) != 1 || m.Peers[2] == nil {
		t.Fatalf("after a full map keeping peers: %+v", m)
	}
	if got := m.PeersDigest(); got != digest {
		t.Fatalf("peers digest %s after keeping them; was %s", got, digest)
	}
	for _, bad := range []*MapResponse{
		{Epoch: "b", Version: 8, PeersKept: true},
		{Epoch: "b", Version: 8, Full: true, Self: &self, PeersKept: true, Peers: []Node{p}},
	} {
		if err := bad.Validate(); err == nil {
			t.Errorf("accepted %+v", bad)
		}
	}
	var empty NetworkMap
	if empty.PeersDigest() != "" {
		t.Fatal("a map without a base has a peers digest")
	}
	if err := empty.Apply(&MapResponse{Epoch: "b", Full: true, Self: &self, PeersKept: true}); !errors.Is(err, ErrNeedFullMap) {
		t.Fatalf("keeping peers without any: %v", err)
	}
}

// BenchmarkPeersDigest: what a node of a tenant of 100 spends on the
// digest it sends when it reconnects.
func BenchmarkPeersDigest(b *testing.B) {
	m := NetworkMap{Peers: map[NodeID]*Node{}}
	for i := range 99 {
		n := testNode(NodeID(i+2), fmt.Sprintf("100.64.0.%d", i+2))
		n.Addresses = append(n.Addresses, netip.MustParsePrefix(fmt.Sprintf("fd7a:115c:a1e0::%x/128", i+2)))
		n.AllowedIPs = n.Addresses
		n.DiscoKey = NewDiscoPrivate().Public()
		n.Endpoints = []netip.AddrPort{netip.MustParseAddrPort("198.51.100.7:41641"), netip.MustParseAddrPort("[2001:db8::7]:41641")}
		n.Tags, n.Hostname, n.DNSName, n.Online, n.HomeDERP = []string{"tag:t1"}, "gpu-node", "gpu-node.ts.example.", true, 1
		m.Peers[n.ID] = &n
	}
	b.ReportAllocs()
	for b.Loop() {
		if m.PeersDigest() == "" {
			b.Fatal("no digest")
		}
	}
}
