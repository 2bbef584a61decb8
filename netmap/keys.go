package netmap

import (
	"crypto/ecdh"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
)

// keyBytes is the raw form shared by every 32-byte key type. Each key type
// has its own text prefix so that a node key can never be parsed where a disco
// or machine key is expected, which catches wiring mistakes at the boundary.
type keyBytes = [32]byte

func marshalKey(prefix string, k keyBytes) []byte {
	out := make([]byte, 0, len(prefix)+64)
	out = append(out, prefix...)
	return hex.AppendEncode(out, k[:])
}

func unmarshalKey(prefix string, text []byte, k *keyBytes) error {
	s := string(text)
	if !strings.HasPrefix(s, prefix) {
		return fmt.Errorf("key %q: want prefix %q", truncate(s, 24), prefix)
	}
	s = s[len(prefix):]
	if len(s) != 64 {
		return fmt.Errorf("key %s...: want 64 hex digits, got %d characters", prefix, len(s))
	}
	var tmp keyBytes
	if _, err := hex.Decode(tmp[:], []byte(s)); err != nil {
		return fmt.Errorf("key %s...: %w", prefix, err)
	}
	*k = tmp
	return nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// NodePublic is a node's WireGuard (Curve25519) public key. It is the node's
// address on the data plane: WireGuard peers and DERP frames are keyed by it.
type NodePublic keyBytes

// NodePrivate is a node's WireGuard private key.
type NodePrivate keyBytes

// DiscoPublic is a per-process Curve25519 key that seals disco messages.
type DiscoPublic keyBytes

// DiscoPrivate is the private half of a DiscoPublic.
type DiscoPrivate keyBytes

// ChallengePublic is the coordinator's long-lived Curve25519 key that node
// key proofs are sealed to.
type ChallengePublic keyBytes

// MachinePublic is a machine's long-lived Ed25519 public key. The node proves
// it on the control channel (it is the key of the TLS client certificate).
type MachinePublic keyBytes

const (
	nodePublicPrefix    = "nodekey:"
	nodePrivatePrefix   = "privkey:"
	discoPublicPrefix   = "discokey:"
	discoPrivatePrefix  = "discopriv:"
	machinePublicPrefix = "mkey:"
	challengePrefix     = "challengekey:"
)

// ErrZeroKey is returned when validating a key that was never set.
var ErrZeroKey = errors.New("key is zero")

func newX25519() (priv, pub keyBytes) {
	k, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		// crypto/rand never fails on supported platforms (Go 1.24+ panics
		// internally instead), so this is unreachable in practice.
		panic(fmt.Sprintf("generate x25519 key: %v", err))
	}
	copy(priv[:], k.Bytes())
	copy(pub[:], k.PublicKey().Bytes())
	return priv, pub
}

func x25519Public(priv keyBytes) keyBytes {
	k, err := ecdh.X25519().NewPrivateKey(priv[:])
	if err != nil {
		panic(fmt.Sprintf("x25519 private key: %v", err)) // only fails on wrong length
	}
	var pub keyBytes
	copy(pub[:], k.PublicKey().Bytes())
	return pub
}

// NewNodePrivate generates a fresh WireGuard private key.
func NewNodePrivate() NodePrivate { priv, _ := newX25519(); return NodePrivate(priv) }

// Public returns the public half of k.
func (k NodePrivate) Public() NodePublic { return NodePublic(x25519Public(keyBytes(k))) }

// IsZero reports whether k was never set.
func (k NodePrivate) IsZero() bool { return k == NodePrivate{} }

// MarshalText implements encoding.TextMarshaler.
func (k NodePrivate) MarshalText() ([]byte, error) { return marshalKey(nodePrivatePrefix, k), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (k *NodePrivate) UnmarshalText(b []byte) error {
	return unmarshalKey(nodePrivatePrefix, b, (*keyBytes)(k))
}

// Raw returns the key bytes, as wireguard-go's UAPI wants them (hex encoded).
func (k NodePrivate) Raw() [32]byte { return k }

// NewDiscoPrivate generates a fresh disco key.
func NewDiscoPrivate() DiscoPrivate { priv, _ := newX25519(); return DiscoPrivate(priv) }

// Public returns the public half of k.
func (k DiscoPrivate) Public() DiscoPublic { return DiscoPublic(x25519Public(keyBytes(k))) }

// IsZero reports whether k was never set.
func (k DiscoPrivate) IsZero() bool { return k == DiscoPrivate{} }

// MarshalText implements encoding.TextMarshaler.
func (k DiscoPrivate) MarshalText() ([]byte, error) { return marshalKey(discoPrivatePrefix, k), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (k *DiscoPrivate) UnmarshalText(b []byte) error {
	return unmarshalKey(discoPrivatePrefix, b, (*keyBytes)(k))
}

// IsZero reports whether k was never set.
func (k NodePublic) IsZero() bool { return k == NodePublic{} }

// String returns the key in its text form.
func (k NodePublic) String() string { return string(marshalKey(nodePublicPrefix, k)) }

// ShortString returns an abbreviated form for logs and tables.
func (k NodePublic) ShortString() string { return "[" + hex.EncodeToString(k[:4]) + "]" }

// MarshalText implements encoding.TextMarshaler.
func (k NodePublic) MarshalText() ([]byte, error) { return marshalKey(nodePublicPrefix, k), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (k *NodePublic) UnmarshalText(b []byte) error {
	return unmarshalKey(nodePublicPrefix, b, (*keyBytes)(k))
}

// IsZero reports whether k was never set.
func (k DiscoPublic) IsZero() bool { return k == DiscoPublic{} }

// String returns the key in its text form.
func (k DiscoPublic) String() string { return string(marshalKey(discoPublicPrefix, k)) }

// ShortString returns an abbreviated form for logs.
func (k DiscoPublic) ShortString() string { return "d:" + hex.EncodeToString(k[:4]) }

// MarshalText implements encoding.TextMarshaler.
func (k DiscoPublic) MarshalText() ([]byte, error) { return marshalKey(discoPublicPrefix, k), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (k *DiscoPublic) UnmarshalText(b []byte) error {
	return unmarshalKey(discoPublicPrefix, b, (*keyBytes)(k))
}

// MachinePublicFromEd25519 converts an Ed25519 public key.
func MachinePublicFromEd25519(pub ed25519.PublicKey) (MachinePublic, error) {
	var k MachinePublic
	if len(pub) != ed25519.PublicKeySize {
		return k, fmt.Errorf("machine key: want %d bytes, got %d", ed25519.PublicKeySize, len(pub))
	}
	copy(k[:], pub)
	return k, nil
}

// IsZero reports whether k was never set.
func (k MachinePublic) IsZero() bool { return k == MachinePublic{} }

// Equal compares in constant time; machine keys authenticate requests.
func (k MachinePublic) Equal(o MachinePublic) bool {
	return subtle.ConstantTimeCompare(k[:], o[:]) == 1
}

// String returns the key in its text form.
func (k MachinePublic) String() string { return string(marshalKey(machinePublicPrefix, k)) }

// MarshalText implements encoding.TextMarshaler.
func (k MachinePublic) MarshalText() ([]byte, error) { return marshalKey(machinePublicPrefix, k), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (k *MachinePublic) UnmarshalText(b []byte) error {
	return unmarshalKey(machinePublicPrefix, b, (*keyBytes)(k))
}

// ParseNodePublic parses the text form of a node key.
func ParseNodePublic(s string) (NodePublic, error) {
	var k NodePublic
	err := k.UnmarshalText([]byte(s))
	return k, err
}

// ParseDiscoPublic parses the text form of a disco key.
func ParseDiscoPublic(s string) (DiscoPublic, error) {
	var k DiscoPublic
	err := k.UnmarshalText([]byte(s))
	return k, err
}

// IsZero reports whether k was never set.
func (k ChallengePublic) IsZero() bool { return k == ChallengePublic{} }

// String returns the key in its text form.
func (k ChallengePublic) String() string { return string(marshalKey(challengePrefix, k)) }

// MarshalText implements encoding.TextMarshaler.
func (k ChallengePublic) MarshalText() ([]byte, error) { return marshalKey(challengePrefix, k), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (k *ChallengePublic) UnmarshalText(b []byte) error {
	return unmarshalKey(challengePrefix, b, (*keyBytes)(k))
}

// IsCanonical reports whether k is the canonical encoding of a Curve25519
// point. Every check of a peer's node key uses it (the relay handshake, node
// key proofs).
func (k NodePublic) IsCanonical() bool { return canonical25519(k) }

// IsCanonical reports whether k is the canonical encoding of a Curve25519
// point. Disco uses it on every sender key.
func (k DiscoPublic) IsCanonical() bool { return canonical25519(k) }

// canonical25519 reports whether k is the canonical little-endian encoding
// of a Curve25519 u-coordinate: below 2^255-19, top bit clear. X25519
// ignores the top bit and reduces modulo p, so a non-canonical encoding
// names the same point as a canonical one; accepting them would let one key
// be registered (or appear) under several byte strings.
func canonical25519(k [32]byte) bool {
	if k[31]&0x80 != 0 {
		return false
	}
	if k[31] != 0x7f {
		return true
	}
	for i := 30; i >= 1; i-- {
		if k[i] != 0xff {
			return true
		}
	}
	return k[0] < 0xed
}
