package derp

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"meshd.dev/meshd/netmap"
)

// File names inside a relay's state directory.
const (
	certFile      = "derp-cert.pem"
	certKeyFile   = "derp-cert-key.pem"
	serverKeyFile = "derp-server.key"
)

// Fingerprint is the pin of a certificate as netmap.DERPNode.CertFingerprint
// carries it: the hex SHA-256 of its SubjectPublicKeyInfo. Pinning the key
// rather than the certificate lets a relay re-issue its certificate (new
// names, new expiry) without breaking nodes.
func Fingerprint(cert *x509.Certificate) string {
	sum := sha256.Sum256(cert.RawSubjectPublicKeyInfo)
	return hex.EncodeToString(sum[:])
}

// NewSelfSignedCert makes a certificate for hosts (IP literals or DNS
// names) with a fresh ECDSA P-256 key. Clients reach such a relay by pinning
// its Fingerprint, not through a CA.
func NewSelfSignedCert(hosts []string) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("generate certificate key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("certificate serial: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "meshd derp"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(10, 0, 0),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else if h != "" {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("create certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("parse new certificate: %w", err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, nil
}

// LoadOrCreateCert loads the relay certificate kept in dir, creating a
// self-signed one for hosts on first start so the fingerprint stays stable
// across restarts.
func LoadOrCreateCert(dir string, hosts []string) (tls.Certificate, error) {
	cp, kp := filepath.Join(dir, certFile), filepath.Join(dir, certKeyFile)
	cert, err := tls.LoadX509KeyPair(cp, kp)
	if err == nil {
		return cert, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return tls.Certificate{}, fmt.Errorf("load relay certificate from %s (delete %s and %s to make a new one, which changes the fingerprint): %w", dir, cp, kp, err)
	}
	cert, err = NewSelfSignedCert(hosts)
	if err != nil {
		return tls.Certificate{}, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("encode certificate key: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return tls.Certificate{}, fmt.Errorf("create state dir: %w", err)
	}
	// Key first: a certificate without its key would be unusable.
	if err := writeFileAtomic(kp, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return tls.Certificate{}, err
	}
	if err := writeFileAtomic(cp, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]}), 0o644); err != nil {
		return tls.Certificate{}, err
	}
	return cert, nil
}

// LoadOrCreateServerKey loads the relay's Curve25519 key (the key clients
// seal their handshake to) from dir, creating it on first start.
func LoadOrCreateServerKey(dir string) (netmap.NodePrivate, error) {
	p := filepath.Join(dir, serverKeyFile)
	b, err := os.ReadFile(p)
	if err == nil {
		var k netmap.NodePrivate
		if err := k.UnmarshalText([]byte(strings.TrimSpace(string(b)))); err != nil {
			return k, fmt.Errorf("relay key %s: %w", p, err)
		}
		return k, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return netmap.NodePrivate{}, fmt.Errorf("read relay key: %w", err)
	}
	k := netmap.NewNodePrivate()
	text, _ := k.MarshalText()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return k, fmt.Errorf("create state dir: %w", err)
	}
	if err := writeFileAtomic(p, append(text, '\n'), 0o600); err != nil {
		return k, err
	}
	return k, nil
}

func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, mode); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// pinnedTLSConfig returns a client TLS config that accepts exactly the
// certificate key with fingerprint fp (hex SHA-256 of the SPKI). With an
// empty fp it verifies the chain against the system roots as usual.
func pinnedTLSConfig(serverName, fp string) (*tls.Config, error) {
	cfg := &tls.Config{ServerName: serverName, MinVersion: tls.VersionTLS12, NextProtos: []string{"http/1.1"}}
	if fp == "" {
		return cfg, nil
	}
	want, err := hex.DecodeString(strings.ToLower(strings.TrimSpace(fp)))
	if err != nil || len(want) != sha256.Size {
		return nil, fmt.Errorf("derp: certificate fingerprint %q: want %d hex digits of SHA-256", fp, 2*sha256.Size)
	}
	// The chain is not checked against any CA: the pin is the trust anchor,
	// as for an SSH host key.
	cfg.InsecureSkipVerify = true
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return errors.New("derp: relay presented no certificate")
		}
		got := sha256.Sum256(cs.PeerCertificates[0].RawSubjectPublicKeyInfo)
		if subtle.ConstantTimeCompare(got[:], want) != 1 {
			return fmt.Errorf("derp: relay certificate fingerprint %x does not match the pinned %x", got, want)
		}
		return nil
	}
	return cfg, nil
}
