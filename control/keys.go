package control

import (
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base32"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Fingerprint returns the hex SHA-256 of a certificate's
// SubjectPublicKeyInfo. It is what auth keys, admin tokens and stored pins
// carry, and the same form as netmap.DERPNode.CertFingerprint.
func Fingerprint(cert *x509.Certificate) string {
	sum := sha256.Sum256(cert.RawSubjectPublicKeyInfo)
	return hex.EncodeToString(sum[:])
}

// selfSignedCert makes a long-lived self-signed certificate for key. Peers
// never check the certificate's validity, only its key, so the dates only
// need to satisfy TLS libraries that look at them.
func selfSignedCert(key ed25519.PrivateKey, cn string) (tls.Certificate, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().AddDate(100, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("self-signed certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: crypto.Signer(key), Leaf: leaf}, nil
}

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
		if err := writeFileAtomic(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})); err != nil {
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

// writeFileAtomic writes data to path with mode 0600 via a temporary file,
// so a crash never leaves a half-written key or token.
func writeFileAtomic(path string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// Auth key and admin token formats. Both carry the coordinator fingerprint,
// as kubeadm and k3s join tokens carry the CA hash, so that holding the
// string is enough to verify the coordinator.
const (
	authKeyPrefix    = "mskey"
	adminTokenPrefix = "msadm"
	keyIDLen         = 12 // hex characters
	fingerprintLen   = 64 // hex SHA-256
)

// b32 is lowercase base32 without padding: no '-' (our separator), easy to
// paste.
var b32 = base32.NewEncoding("abcdefghijklmnopqrstuvwxyz234567").WithPadding(base32.NoPadding)

func randomSecret() string {
	var b [20]byte // 160 bits
	rand.Read(b[:])
	return b32.EncodeToString(b[:])
}

func randomKeyID() string {
	var b [keyIDLen / 2]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// parsedAuthKey is an auth key split into its parts.
type parsedAuthKey struct {
	ID, Secret, Fingerprint string
}

// parseAuthKey splits "mskey-<id>-<secret>-<fingerprint>".
func parseAuthKey(s string) (parsedAuthKey, error) {
	parts := strings.Split(strings.TrimSpace(s), "-")
	if len(parts) != 4 || parts[0] != authKeyPrefix {
		return parsedAuthKey{}, errors.New("auth key is malformed: want mskey-ID-SECRET-FINGERPRINT as printed by `meshd admin keys create`")
	}
	k := parsedAuthKey{ID: parts[1], Secret: parts[2], Fingerprint: parts[3]}
	if len(k.ID) != keyIDLen || !isHex(k.ID) || len(k.Fingerprint) != fingerprintLen || !isHex(k.Fingerprint) || len(k.Secret) != 32 {
		return parsedAuthKey{}, errors.New("auth key is malformed: an id, secret or fingerprint part has the wrong length; copy the whole key")
	}
	return k, nil
}

func (k parsedAuthKey) String() string {
	return authKeyPrefix + "-" + k.ID + "-" + k.Secret + "-" + k.Fingerprint
}

// AuthKeyFingerprint returns the coordinator fingerprint an auth key
// carries, for callers that want to pin before registering.
func AuthKeyFingerprint(key string) (string, error) {
	k, err := parseAuthKey(key)
	if err != nil {
		return "", err
	}
	return k.Fingerprint, nil
}

// AdminTokenFingerprint returns the coordinator fingerprint carried by an
// admin token ("msadm-<secret>-<fingerprint>").
func AdminTokenFingerprint(token string) (string, error) {
	parts := strings.Split(strings.TrimSpace(token), "-")
	if len(parts) != 3 || parts[0] != adminTokenPrefix || len(parts[2]) != fingerprintLen || !isHex(parts[2]) {
		return "", errors.New("admin token is malformed: want msadm-SECRET-FINGERPRINT, the content of the coordinator's admin.token")
	}
	return parts[2], nil
}

func isHex(s string) bool {
	for _, c := range s {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

func hashSecret(s string) []byte {
	sum := sha256.Sum256([]byte(s))
	return sum[:]
}

func hashEqual(a, b []byte) bool { return subtle.ConstantTimeCompare(a, b) == 1 }
