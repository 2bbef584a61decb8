package controlclient

import (
	"crypto/ecdh"
	"crypto/rand"
	"crypto/subtle"
	"errors"
	"fmt"

	"golang.org/x/crypto/nacl/box"
	"golang.org/x/crypto/salsa20/salsa"

	"meshd.dev/meshd/netmap"
)

// ChallengePath is the coordinator endpoint that hands out node key
// challenges.
const ChallengePath = "/machine/challenge"

// proofContext starts every sealed proof, so that a box made for anything
// else (a disco message, a DERP client info) never reads as a proof.
const proofContext = "meshd node key proof v1\x00"

// maxChallengeLen bounds the challenge a proof may carry; the coordinator
// issues far shorter ones.
const maxChallengeLen = 256

func proofPlaintext(mk netmap.MachinePublic, challenge []byte) []byte {
	out := make([]byte, 0, len(proofContext)+len(mk)+len(challenge))
	out = append(out, proofContext...)
	out = append(out, mk[:]...)
	return append(out, challenge...)
}

// SealNodeKeyProof answers ch for machine mk with the node key nodeKey:
// only a holder of nodeKey can make a proof that OpenNodeKeyProof accepts
// for nodeKey.Public().
func SealNodeKeyProof(nodeKey netmap.NodePrivate, mk netmap.MachinePublic, ch *netmap.Challenge) (*netmap.NodeKeyProof, error) {
	if nodeKey.IsZero() {
		return nil, errors.New("node key proof: no node private key")
	}
	if ch.ServerKey.IsZero() || len(ch.Challenge) == 0 || len(ch.Challenge) > maxChallengeLen {
		return nil, fmt.Errorf("node key proof: the coordinator sent an unusable challenge (%d bytes, key %v)", len(ch.Challenge), !ch.ServerKey.IsZero())
	}
	var nonce [24]byte
	rand.Read(nonce[:])
	priv := nodeKey.Raw()
	sealed := box.Seal(nil, proofPlaintext(mk, ch.Challenge), &nonce, (*[32]byte)(&ch.ServerKey), &priv)
	return &netmap.NodeKeyProof{Challenge: append([]byte(nil), ch.Challenge...), Nonce: nonce[:], Box: sealed}, nil
}

// OpenNodeKeyProof checks that p was sealed by the holder of node key nk,
// for machine mk, to the coordinator key server. It checks the box only;
// the coordinator checks p.Challenge is one it issued to mk and still
// valid. Every failure wraps ErrKeyProof.
func OpenNodeKeyProof(p *netmap.NodeKeyProof, nk netmap.NodePublic, mk netmap.MachinePublic, server *ecdh.PrivateKey) error {
	if p == nil {
		return fmt.Errorf("%w: the request carries no proof that the node holds node key %s", ErrKeyProof, nk.ShortString())
	}
	if len(p.Nonce) != 24 || len(p.Challenge) == 0 || len(p.Challenge) > maxChallengeLen || len(p.Box) < box.Overhead {
		return fmt.Errorf("%w: malformed proof (nonce %d bytes, challenge %d, box %d)", ErrKeyProof, len(p.Nonce), len(p.Challenge), len(p.Box))
	}
	// A low-order point gives an all-zero shared secret that anyone can
	// seal with, and box.Open does not check for it; ECDH does. Its shared
	// secret then serves for the box too (box.Precompute is X25519 then
	// HSalsa20), so the check costs one scalar multiplication, not two.
	pub, err := ecdh.X25519().NewPublicKey(nk[:])
	if err != nil || !nk.IsCanonical() {
		return fmt.Errorf("%w: node key %s is not a valid Curve25519 public key", ErrKeyProof, nk.ShortString())
	}
	shared, err := server.ECDH(pub)
	if err != nil {
		return fmt.Errorf("%w: node key %s is not a valid Curve25519 public key", ErrKeyProof, nk.ShortString())
	}
	var key [32]byte
	salsa.HSalsa20(&key, &[16]byte{}, (*[32]byte)(shared), &salsa.Sigma)
	plain, ok := box.OpenAfterPrecomputation(nil, p.Box, (*[24]byte)(p.Nonce), &key)
	if !ok {
		return fmt.Errorf("%w: the proof does not open with node key %s: the sender does not hold that key", ErrKeyProof, nk.ShortString())
	}
	if want := proofPlaintext(mk, p.Challenge); subtle.ConstantTimeCompare(plain, want) != 1 {
		return fmt.Errorf("%w: the proof was made for another machine or challenge", ErrKeyProof)
	}
	return nil
}
