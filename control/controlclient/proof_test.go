package controlclient

import (
	"crypto/ecdh"
	"crypto/rand"
	"errors"
	"testing"

	"meshd.dev/meshd/netmap"
)

func TestNodeKeyProofSealOpen(t *testing.T) {
	node, mk, server := fuzzProofKeys(t)
	var spub netmap.ChallengePublic
	copy(spub[:], server.PublicKey().Bytes())
	ch := &netmap.Challenge{ServerKey: spub, Challenge: []byte("fresh")}
	good, err := SealNodeKeyProof(node, mk, ch)
	if err != nil {
		t.Fatal(err)
	}
	otherServer, _ := ecdh.X25519().GenerateKey(rand.Reader)
	for _, tc := range []struct {
		name   string
		p      *netmap.NodeKeyProof
		nk     netmap.NodePublic
		mk     netmap.MachinePublic
		server *ecdh.PrivateKey
		ok     bool
	}{
		{"valid", good, node.Public(), mk, server, true},
		{"no proof", nil, node.Public(), mk, server, false},
		{"claimed for another node key", good, netmap.NewNodePrivate().Public(), mk, server, false},
		{"presented by another machine", good, node.Public(), netmap.MachinePublic{9}, server, false},
		{"sealed to another coordinator", good, node.Public(), mk, otherServer, false},
		{"challenge swapped", &netmap.NodeKeyProof{Challenge: []byte("other"), Nonce: good.Nonce, Box: good.Box}, node.Public(), mk, server, false},
		{"nonce swapped", &netmap.NodeKeyProof{Challenge: good.Challenge, Nonce: make([]byte, 24), Box: good.Box}, node.Public(), mk, server, false},
		{"truncated box", &netmap.NodeKeyProof{Challenge: good.Challenge, Nonce: good.Nonce, Box: good.Box[:10]}, node.Public(), mk, server, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := OpenNodeKeyProof(tc.p, tc.nk, tc.mk, tc.server)
			if tc.ok != (err == nil) || (err != nil && !errors.Is(err, ErrKeyProof)) {
				t.Fatalf("OpenNodeKeyProof = %v, want ok=%v (or ErrKeyProof)", err, tc.ok)
			}
		})
	}
	if _, err := SealNodeKeyProof(netmap.NodePrivate{}, mk, ch); err == nil {
		t.Error("sealed with a zero node key")
	}
	if _, err := SealNodeKeyProof(node, mk, &netmap.Challenge{Challenge: []byte("x")}); err == nil {
		t.Error("sealed to a zero coordinator key")
	}
}
