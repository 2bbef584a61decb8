package control

import (
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"encoding/base32"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"os"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/internal/atomicfile"
)

// loadOrCreateKey reads the coordinator's Ed25519 private key from path,
// or creates it.
func loadOrCreateKey(path string) (ed25519.PrivateKey, error) {
	return loadOrCreatePEMKey(path, "coordinator key",
		"move it aside to create a new one (nodes will then need the new fingerprint)",
		newEd25519, asEd25519)
}

func newEd25519() (crypto.PrivateKey, error) {
	_, k, err := ed25519.GenerateKey(rand.Reader)
	return k, err
}

func asEd25519(k crypto.PrivateKey) (ed25519.PrivateKey, bool) {
	ek, ok := k.(ed25519.PrivateKey)
	return ek, ok
}

// loadOrCreatePEMKey reads a private key (PKCS#8 PEM) named what from
// path, or creates one with generate and writes it with mode 0600 if the
// file does not exist. as checks the key's type; badFile is what to do
// about a file that is not a key of that type.
func loadOrCreatePEMKey[K any](path, what, badFile string, generate func() (crypto.PrivateKey, error), as func(crypto.PrivateKey) (K, bool)) (K, error) {
	var zero K
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		data, err := newPEMKey(what, generate)
		if err != nil {
			return zero, err
		}
		if err := atomicfile.Write(path, data, 0o600); err != nil {
			return zero, fmt.Errorf("write %s: %w", what, err)
		}
		return parsePEMKey(data, what+" "+path, badFile, as)
	}
	if err != nil {
		return zero, fmt.Errorf("read %s: %w", what, err)
	}
	return parsePEMKey(data, what+" "+path, badFile, as)
}

// newPEMKey generates a private key and encodes it as PKCS#8 PEM.
func newPEMKey(what string, generate func() (crypto.PrivateKey, error)) ([]byte, error) {
	key, err := generate()
	if err != nil {
		return nil, fmt.Errorf("generate %s: %w", what, err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("encode %s: %w", what, err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// parsePEMKey decodes a PKCS#8 PEM private key named what; as checks its
// type and badFile says what to do about one that is not usable.
func parsePEMKey[K any](data []byte, what, badFile string, as func(crypto.PrivateKey) (K, bool)) (K, error) {
	var zero K
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "PRIVATE KEY" {
		return zero, fmt.Errorf("%s: not a PEM private key; %s", what, badFile)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return zero, fmt.Errorf("%s: %w; %s", what, err, badFile)
	}
	typed, ok := as(k)
	if !ok {
		return zero, fmt.Errorf("%s: a %T, not the expected kind of key; %s", what, k, badFile)
	}
	return typed, nil
}

// b32 is lowercase base32 without padding: no '-' (our separator), easy to
// paste.
var b32 = base32.NewEncoding("abcdefghijklmnopqrstuvwxyz234567").WithPadding(base32.NoPadding)

func randomSecret() string {
	var b [20]byte // 160 bits
	rand.Read(b[:])
	return b32.EncodeToString(b[:])
}

func randomKeyID() string {
	var b [controlclient.KeyIDLen / 2]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func hashSecret(s string) []byte {
	sum := sha256.Sum256([]byte(s))
	return sum[:]
}

func hashEqual(a, b []byte) bool { return subtle.ConstantTimeCompare(a, b) == 1 }
