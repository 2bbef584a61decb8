package control

import (
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

// loadOrCreateKey reads an Ed25519 private key (PKCS#8 PEM) from path, or
// creates one with mode 0600 if the file does not exist.
func loadOrCreateKey(path string) (ed25519.PrivateKey, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		_, key, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return nil, err
		}
		der, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return nil, err
		}
		if err := atomicfile.Write(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
			return nil, err
		}
		return key, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read coordinator key: %w", err)
	}
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("coordinator key %s: not a PEM private key; move it aside to create a new one (nodes will then need the new fingerprint)", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("coordinator key %s: %w", path, err)
	}
	ek, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("coordinator key %s: want an Ed25519 key, got %T", path, k)
	}
	return ek, nil
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
