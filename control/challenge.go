package control

import (
	"crypto"
	"crypto/ecdh"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"net/http"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
)

// Node key proofs: before the coordinator publishes a node key (at
// registration, or when a map request changes it) the node proves it holds
// the private half, for the machine key it authenticates with. It asks for
// a challenge (POST /machine/challenge), seals its machine key and the
// challenge in a NaCl box from the node key to the coordinator's X25519
// key, and sends that box along (controlclient.SealNodeKeyProof). Only the
// holder of the node key can seal a box that opens with it; the machine key
// inside binds the proof to the sender, and the challenge makes it fresh.
//
// Challenges are stateless: version, expiry and 16 random bytes, MACed
// with a key derived from the coordinator's X25519 key together with the
// asking machine's key. Nothing is stored per challenge, so asking for
// many costs the coordinator no memory, and a restarted coordinator still
// accepts the ones it issued. A challenge may be answered more than once
// within its minute, but only by the machine it was issued to, which
// proves nothing it could not prove again.

const (
	challengeKeyFile = "challenge.key"
	challengeTTL     = time.Minute
	challengeVersion = 1
	// challenge layout: version(1) expiry-unix-seconds(8) random(16) mac(32)
	challengeBodyLen = 1 + 8 + 16
	challengeLen     = challengeBodyLen + sha256.Size
)

// challenger issues and checks node key challenges.
type challenger struct {
	priv *ecdh.PrivateKey
	pub  netmap.ChallengePublic
	mac  []byte // HMAC key for challenges, derived from priv
}

// newChallenger loads the coordinator's X25519 key from path, creating it
// (0600) on first start.
func newChallenger(path string) (*challenger, error) {
	priv, err := loadOrCreateX25519(path)
	if err != nil {
		return nil, err
	}
	return challengerFor(priv)
}

// challengerFor makes the challenger of X25519 key priv.
func challengerFor(priv *ecdh.PrivateKey) (*challenger, error) {
	mac, err := hkdf.Key(sha256.New, priv.Bytes(), nil, "meshd node key challenge mac v1", 32)
	if err != nil {
		return nil, err
	}
	c := &challenger{priv: priv, mac: mac}
	copy(c.pub[:], priv.PublicKey().Bytes())
	return c, nil
}

// loadOrCreateX25519 reads the challenge key from path, or creates it.
// Replacing it only voids challenges issued in the last minute, so a bad
// file can be moved aside without other consequences.
func loadOrCreateX25519(path string) (*ecdh.PrivateKey, error) {
	return loadOrCreatePEMKey(path, "challenge key",
		"move it aside and restart to create a new one (harmless: nodes only need it for the next minute)",
		newX25519, asX25519)
}

func newX25519() (crypto.PrivateKey, error) { return ecdh.X25519().GenerateKey(rand.Reader) }

func asX25519(k crypto.PrivateKey) (*ecdh.PrivateKey, bool) {
	xk, ok := k.(*ecdh.PrivateKey)
	return xk, ok && xk.Curve() == ecdh.X25519()
}

func (c *challenger) sum(mk netmap.MachinePublic, body []byte) []byte {
	h := hmac.New(sha256.New, c.mac)
	h.Write(mk[:])
	h.Write(body)
	return h.Sum(nil)
}

// issue returns a fresh challenge for machine mk.
func (c *challenger) issue(mk netmap.MachinePublic, now time.Time) netmap.Challenge {
	exp := now.Add(challengeTTL).Truncate(time.Second)
	b := make([]byte, challengeBodyLen, challengeLen)
	b[0] = challengeVersion
	binary.BigEndian.PutUint64(b[1:9], uint64(exp.Unix()))
	rand.Read(b[9:challengeBodyLen])
	b = append(b, c.sum(mk, b)...)
	return netmap.Challenge{ServerKey: c.pub, Challenge: b, Expires: exp.UTC()}
}

// check verifies that p proves possession of node key nk by machine mk:
// the challenge is one this coordinator issued to mk, not expired, and the
// box opens with nk. Every failure wraps controlclient.ErrKeyProof.
func (c *challenger) check(mk netmap.MachinePublic, nk netmap.NodePublic, p *netmap.NodeKeyProof, now time.Time) error {
	if p != nil {
		ch := p.Challenge
		if len(ch) != challengeLen || ch[0] != challengeVersion || !hmac.Equal(ch[challengeBodyLen:], c.sum(mk, ch[:challengeBodyLen])) {
			return fmt.Errorf("%w: the proof's challenge was not issued to this machine by this coordinator", controlclient.ErrKeyProof)
		}
		if exp := time.Unix(int64(binary.BigEndian.Uint64(ch[1:9])), 0); !now.Before(exp) {
			return fmt.Errorf("%w: the proof's challenge expired at %s: ask for a new one", controlclient.ErrKeyProof, exp.UTC().Format(time.RFC3339))
		}
	}
	return controlclient.OpenNodeKeyProof(p, nk, mk, c.priv)
}

// checkNodeKeyProof is the gate before the coordinator publishes node key
// nk for machine mk: the client must speak a protocol with proofs, and
// prove it.
func (s *Server) checkNodeKeyProof(mk netmap.MachinePublic, version int, nk netmap.NodePublic, p *netmap.NodeKeyProof, now time.Time) error {
	if version < netmap.KeyProofVersion {
		return fmt.Errorf("%w: client speaks protocol %d; registering or changing a node key needs protocol %d, which proves the node holds its key: upgrade meshd on the node",
			controlclient.ErrTooOld, version, netmap.KeyProofVersion)
	}
	if err := s.chal.check(mk, nk, p, now); err != nil {
		s.log.Warn("refused a node key without a valid proof of possession", "machine", mk.String(), "node_key", nk.ShortString(), "err", err)
		return err
	}
	return nil
}

func (s *Server) handleChallenge(w http.ResponseWriter, r *http.Request) {
	mk, err := machineKey(r)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	var req netmap.ChallengeRequest
	if err := decodeBody(r, &req); err != nil {
		s.writeError(w, r, err)
		return
	}
	if err := checkVersion(req.Version); err != nil {
		s.writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, s.chal.issue(mk, s.now()))
}
