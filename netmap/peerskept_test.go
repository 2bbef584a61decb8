package netmap

import (
	"errors"
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
