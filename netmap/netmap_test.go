package netmap

import (
	"encoding/json"
	"net/netip"
	"testing"
)

func testNode(id NodeID, ip string) Node {
	a := netip.MustParsePrefix(ip + "/32")
	return Node{ID: id, Hostname: "n", NodeKey: NewNodePrivate().Public(), Addresses: []netip.Prefix{a}, AllowedIPs: []netip.Prefix{a}}
}

func TestKeyTextRoundTrip(t *testing.T) {
	priv := NewNodePrivate()
	pub := priv.Public()
	b, _ := pub.MarshalText()
	got, err := ParseNodePublic(string(b))
	if err != nil || got != pub {
		t.Fatalf("round trip: %v %v", got, err)
	}
	if _, err := ParseDiscoPublic(string(b)); err == nil {
		t.Fatal("node key parsed as a disco key")
	}
	for _, bad := range []string{"", "nodekey:", "nodekey:zz", "nodekey:" + string(make([]byte, 64))} {
		if _, err := ParseNodePublic(bad); err == nil {
			t.Errorf("ParseNodePublic(%q) succeeded", bad)
		}
	}
}

func TestApply(t *testing.T) {
	self := testNode(1, "100.64.0.1")
	p2, p3 := testNode(2, "100.64.0.2"), testNode(3, "100.64.0.3")
	var m NetworkMap
	if err := m.Apply(&MapResponse{Epoch: "e", Version: 2, PeersChanged: []Node{p2}}); err != ErrNeedFullMap {
		t.Fatalf("delta without base: %v", err)
	}
	if err := m.Apply(&MapResponse{Epoch: "e", Version: 1, Full: true, Self: &self, Peers: []Node{p2}}); err != nil {
		t.Fatal(err)
	}
	eps := []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:41641")}
	on := true
	steps := []struct {
		name  string
		resp  MapResponse
		peers int
		err   bool
	}{
		{"add", MapResponse{Epoch: "e", Version: 2, PeersChanged: []Node{p3}}, 2, false},
		{"patch", MapResponse{Epoch: "e", Version: 3, PeersPatch: []PeerPatch{{ID: 3, Endpoints: &eps, Online: &on}}}, 2, false},
		{"patch unknown", MapResponse{Epoch: "e", Version: 4, PeersPatch: []PeerPatch{{ID: 9, Online: &on}}}, 2, true},
		{"other epoch", MapResponse{Epoch: "f", Version: 4, PeersRemoved: []NodeID{2}}, 2, true},
		{"remove", MapResponse{Epoch: "e", Version: 4, PeersRemoved: []NodeID{2}}, 1, false},
	}
	for _, s := range steps {
		err := m.Apply(&s.resp)
		if (err != nil) != s.err {
			t.Fatalf("%s: err=%v", s.name, err)
		}
		if len(m.Peers) != s.peers {
			t.Fatalf("%s: %d peers, want %d", s.name, len(m.Peers), s.peers)
		}
	}
	if p := m.Peers[3]; !p.Online || len(p.Endpoints) != 1 || m.Version != 4 {
		t.Fatalf("patch not applied: %+v v%d", p, m.Version)
	}
}

func TestNormalizeTags(t *testing.T) {
	got, err := NormalizeTags([]string{"tag:B", "tag:a", "tag:b", " "})
	if err != nil || len(got) != 2 || got[0] != "tag:a" || got[1] != "tag:b" {
		t.Fatalf("got %v %v", got, err)
	}
	for _, bad := range []string{"b", "tag:", "tag:1a", "tag:a b", "tag:é"} {
		if _, err := NormalizeTags([]string{bad}); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestDecodeMapResponseRejects(t *testing.T) {
	self := testNode(1, "100.64.0.1")
	good, _ := json.Marshal(MapResponse{Epoch: "e", Version: 1, Full: true, Self: &self})
	if _, err := DecodeMapResponse(good); err != nil {
		t.Fatalf("good message rejected: %v", err)
	}
	for name, data := range map[string]string{
		"trailing":     string(good) + "{}",
		"full no self": `{"epoch":"e","version":1,"full":true}`,
		"bad key":      `{"self":{"id":1,"node_key":"nodekey:00"}}`,
		"bad prefix":   `{"packet_filter":[{"src_ips":["1.2.3.4/99"]}]}`,
		"reversed":     `{"packet_filter":[{"src_ips":[],"dst_ports":[{"net":"0.0.0.0/0","ports":{"first":9,"last":1}}]}]}`,
	} {
		if _, err := DecodeMapResponse([]byte(data)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func FuzzDecodeMapResponse(f *testing.F) {
	self := testNode(1, "100.64.0.1")
	p := testNode(2, "100.64.0.2")
	good, _ := json.Marshal(MapResponse{Epoch: "e", Version: 1, Full: true, Self: &self, Peers: []Node{p}})
	f.Add(good)
	f.Add([]byte(`{"epoch":"e","version":2,"peers_patch":[{"id":2,"online":true}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := DecodeMapResponse(data)
		if err != nil {
			return
		}
		var m NetworkMap
		full := MapResponse{Epoch: "e", Full: true, Self: &self, Peers: []Node{p}}
		if err := m.Apply(&full); err != nil {
			t.Fatal(err)
		}
		_ = m.Apply(r) // must not panic
	})
}
