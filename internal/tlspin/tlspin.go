// Package tlspin authenticates TLS peers by the hash of their public key
// instead of a certificate authority, the trust model of the coordinator and
// of pinned DERP relays: the pin is the trust anchor, as an SSH host key is.
package tlspin

import (
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"errors"
	"fmt"
	"math/big"
	"net"
	"strings"
	"time"
)

// MinVersion is the only TLS version meshd's pinned connections speak.
const MinVersion = tls.VersionTLS13

// ErrMismatch is the error (wrapped) of a peer whose key is not the pinned
// one.
var ErrMismatch = errors.New("certificate key does not match the pinned fingerprint")

// Fingerprint returns a certificate's pin: the hex SHA-256 of its
// SubjectPublicKeyInfo. Pinning the key rather than the certificate lets a
// server re-issue its certificate (new names, new dates) without breaking
// its clients.
func Fingerprint(cert *x509.Certificate) string {
	sum := sha256.Sum256(cert.RawSubjectPublicKeyInfo)
	return hex.EncodeToString(sum[:])
}

// Parse checks that fp is a pin (64 hex digits, any case, surrounding space
// ignored) and returns its bytes.
func Parse(fp string) ([]byte, error) {
	b, err := hex.DecodeString(strings.ToLower(strings.TrimSpace(fp)))
	if err != nil || len(b) != sha256.Size {
		return nil, fmt.Errorf("fingerprint %q: want %d hex digits of SHA-256", fp, 2*sha256.Size)
	}
	return b, nil
}

// Verify checks the leaf certificate of cs against the pin want, in
// constant time. The error wraps ErrMismatch when the key differs.
func Verify(cs tls.ConnectionState, want string) error {
	wb, err := Parse(want)
	if err != nil {
		return err
	}
	if len(cs.PeerCertificates) == 0 {
		return fmt.Errorf("%w: the peer sent no certificate", ErrMismatch)
	}
	got := sha256.Sum256(cs.PeerCertificates[0].RawSubjectPublicKeyInfo)
	if subtle.ConstantTimeCompare(got[:], wb) != 1 {
		return &MismatchError{Got: hex.EncodeToString(got[:]), Want: hex.EncodeToString(wb)}
	}
	return nil
}

// MismatchError names the key a peer presented and the one pinned.
type MismatchError struct{ Got, Want string }

func (e *MismatchError) Error() string {
	return fmt.Sprintf("%v: peer presented %s, expected %s", ErrMismatch, e.Got, e.Want)
}

// Unwrap makes errors.Is(err, ErrMismatch) hold.
func (e *MismatchError) Unwrap() error { return ErrMismatch }

// ClientConfig returns a TLS 1.3 client configuration that accepts exactly
// the server key pinned by pin(), asked at each handshake so that a pin
// learnt later (from an auth key) applies to new connections. An empty pin
// refuses the connection. No CA chain or name is checked: the pin replaces
// both.
func ClientConfig(pin func() string) *tls.Config {
	return &tls.Config{
		MinVersion:         MinVersion,
		InsecureSkipVerify: true, // replaced by VerifyConnection's pin check
		VerifyConnection: func(cs tls.ConnectionState) error {
			want := pin()
			if want == "" {
				return errors.New("no fingerprint pinned to verify the server against")
			}
			return Verify(cs, want)
		},
	}
}

// SelfSigned makes a long-lived self-signed certificate for key, valid for
// hosts (IP literals or DNS names, may be empty). Pinned peers check only
// the key, so the dates need only satisfy TLS libraries that look at them.
func SelfSigned(key crypto.Signer, commonName string, hosts []string) (tls.Certificate, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("certificate serial: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: commonName},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(100, 0, 0),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else if h != "" {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("self-signed certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("parse new certificate: %w", err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, nil
}
