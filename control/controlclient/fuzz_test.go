package controlclient

import (
	"bytes"
	"crypto/ecdh"
	"encoding/binary"
	"encoding/json"
	"errors"
	"testing"

	"golang.org/x/crypto/nacl/box"

	"meshd.dev/meshd/netmap"
)

func frameOf(body string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(body)))
	return append(b, body...)
}

// FuzzReadFrame feeds arbitrary bytes to the map stream reader: it must
// return messages or an error, never panic, and what it accepts must
// survive re-encoding.
func FuzzReadFrame(f *testing.F) {
	f.Add(frameOf(`{"epoch":"e","version":1,"keep_alive":true}`))
	f.Add(frameOf(`{"epoch":"e","version":2,"peers_removed":[3]}`))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, '{'})
	f.Add([]byte{0, 0, 0, 0})
	f.Add(append(frameOf(`{"epoch":"e","version":1}`), 0, 0, 0, 9, '{'))
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bytes.NewReader(data)
		var buf []byte
		for range 16 {
			resp, b, err := ReadMapResponse(r, buf)
			buf = b
			if err != nil {
				return
			}
			fr, err := EncodeFrame(resp)
			if err != nil {
				t.Fatalf("re-encode accepted message: %v", err)
			}
			if _, _, err := ReadMapResponse(bytes.NewReader(fr), nil); err != nil {
				t.Fatalf("re-read of re-encoded message: %v", err)
			}
		}
	})
}

// FuzzParseAuthKey checks the auth key and admin token parsers.
func FuzzParseAuthKey(f *testing.F) {
	fp := "b44fb823ee0f25e298dceb395ddb237c0caf777c7a10ffa1bafade7f0acaaba0"
	f.Add("mskey-4d050af5bb5e-5knzhhyp5rpzegas6tp23jmzhdmzpsca-" + fp)
	f.Add("msadm-5knzhhyp5rpzegas6tp23jmzhdmzpsca-" + fp)
	f.Add("mskey---")
	f.Add("mskey-\x00-\xff-" + fp)
	f.Fuzz(func(t *testing.T, s string) {
		if k, err := ParseAuthKey(s); err == nil {
			if len(k.Fingerprint) != FingerprintLen || len(k.ID) != KeyIDLen {
				t.Fatalf("accepted %q with parts %+v", s, k)
			}
			if again, err := ParseAuthKey(k.String()); err != nil || again != k {
				t.Fatalf("round trip of %q: %+v %v", s, again, err)
			}
		}
		if fp, err := AdminTokenFingerprint(s); err == nil && len(fp) != FingerprintLen {
			t.Fatalf("admin token %q gave fingerprint %q", s, fp)
		}
	})
}

// fuzzProofKeys are fixed keys for FuzzOpenNodeKeyProof, so that the
// committed seed under testdata holds a proof that opens.
func fuzzProofKeys(t testing.TB) (node netmap.NodePrivate, mk netmap.MachinePublic, server *ecdh.PrivateKey) {
	for i := range node {
		node[i] = byte(i + 1)
	}
	mk = netmap.MachinePublic{7, 7, 7}
	var sb [32]byte
	for i := range sb {
		sb[i] = byte(100 + i)
	}
	server, err := ecdh.X25519().NewPrivateKey(sb[:])
	if err != nil {
		t.Fatal(err)
	}
	return node, mk, server
}

// FuzzOpenNodeKeyProof decodes arbitrary JSON as a node key proof and
// checks it against a fixed node key: an error wrapping ErrKeyProof or
// acceptance, never a panic, and acceptance only of a box that opens with
// the node key to exactly the expected message.
func FuzzOpenNodeKeyProof(f *testing.F) {
	node, mk, server := fuzzProofKeys(f)
	var spub netmap.ChallengePublic
	copy(spub[:], server.PublicKey().Bytes())
	good, err := SealNodeKeyProof(node, mk, &netmap.Challenge{ServerKey: spub, Challenge: []byte("challenge-bytes")})
	if err != nil {
		f.Fatal(err)
	}
	b, _ := json.Marshal(good)
	f.Add(b)
	f.Add([]byte(`{"challenge":"AQ==","nonce":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA","box":"AAAAAAAAAAAAAAAAAAAAAA=="}`))
	f.Add([]byte(`{"challenge":"","nonce":"","box":""}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var p *netmap.NodeKeyProof
		if err := netmap.DecodeJSON(bytes.NewReader(data), 4096, &p); err != nil {
			return
		}
		err := OpenNodeKeyProof(p, node.Public(), mk, server)
		if err != nil {
			if !errors.Is(err, ErrKeyProof) {
				t.Fatalf("error %v does not wrap ErrKeyProof", err)
			}
			return
		}
		var priv [32]byte
		copy(priv[:], server.Bytes())
		nk := node.Public()
		plain, ok := box.Open(nil, p.Box, (*[24]byte)(p.Nonce), (*[32]byte)(&nk), &priv)
		if !ok || !bytes.Equal(plain, proofPlaintext(mk, p.Challenge)) {
			t.Fatalf("accepted a proof that does not open to the expected message: %+v", p)
		}
	})
}
