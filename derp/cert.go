package derp

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"meshd.dev/meshd/internal/atomicfile"
	"meshd.dev/meshd/internal/tlspin"
	"meshd.dev/meshd/netmap"
)

// File names inside a relay's state directory.
const (
	certFile      = "derp-cert.pem"
	certKeyFile   = "derp-cert-key.pem"
	serverKeyFile = "derp-server.key"
)

// NewSelfSignedCert makes a certificate for hosts (IP literals or DNS
// names) with a fresh ECDSA P-256 key. Clients reach such a relay by pinning
// its tlspin.Fingerprint, not through a CA.
func NewSelfSignedCert(hosts []string) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("generate certificate key: %w", err)
	}
	return tlspin.SelfSigned(key, "meshd derp", hosts)
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
	if err := atomicfile.Write(kp, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return tls.Certificate{}, err
	}
	if err := atomicfile.Write(cp, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]}), 0o644); err != nil {
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
	if err := atomicfile.Write(p, append(text, '\n'), 0o600); err != nil {
		return k, err
	}
	return k, nil
}

// pinnedTLSConfig returns a client TLS config that accepts exactly the
// certificate key with fingerprint fp (tlspin). With an empty fp it
// verifies the chain against the system roots as usual.
func pinnedTLSConfig(serverName, fp string) (*tls.Config, error) {
	if fp == "" {
		return &tls.Config{ServerName: serverName, MinVersion: tlspin.MinVersion, NextProtos: []string{"http/1.1"}}, nil
	}
	if _, err := tlspin.Parse(fp); err != nil {
		return nil, fmt.Errorf("derp: certificate %w", err)
	}
	cfg := tlspin.ClientConfig(func() string { return fp })
	cfg.ServerName = serverName
	cfg.NextProtos = []string{"http/1.1"}
	return cfg, nil
}
