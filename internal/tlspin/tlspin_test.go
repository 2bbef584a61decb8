package tlspin

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"net"
	"strings"
	"testing"
)

func newCert(t *testing.T) tls.Certificate {
	t.Helper()
	_, k, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	c, err := SelfSigned(k, "test", []string{"127.0.0.1", "relay.example"})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// handshake runs a TLS handshake between a server with cert and a client
// with cfg over an in-memory pipe and returns the client's error.
func handshake(t *testing.T, cert tls.Certificate, cfg *tls.Config, maxVersion uint16) error {
	t.Helper()
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	srv := tls.Server(b, &tls.Config{Certificates: []tls.Certificate{cert}, MaxVersion: maxVersion})
	go srv.Handshake()
	return tls.Client(a, cfg).Handshake()
}

func TestClientConfig(t *testing.T) {
	cert, other := newCert(t), newCert(t)
	fp := Fingerprint(cert.Leaf)
	tests := []struct {
		name    string
		pin     string
		server  tls.Certificate
		maxVer  uint16
		wantErr string
		mismatc bool
	}{
		{"pinned key", fp, cert, 0, "", false},
		{"pin in upper case", strings.ToUpper(fp), cert, 0, "", false},
		{"other key", fp, other, 0, "does not match", true},
		{"no pin", "", cert, 0, "no fingerprint pinned", false},
		{"malformed pin", "abc", cert, 0, "hex digits", false},
		{"TLS 1.2 server refused", fp, cert, tls.VersionTLS12, "protocol version", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := handshake(t, tt.server, ClientConfig(func() string { return tt.pin }), tt.maxVer)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("handshake: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("handshake error %v, want one containing %q", err, tt.wantErr)
			}
			if errors.Is(err, ErrMismatch) != tt.mismatc {
				t.Errorf("errors.Is(err, ErrMismatch) = %v, want %v", !tt.mismatc, tt.mismatc)
			}
		})
	}
}

func TestSelfSignedECDSA(t *testing.T) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	c, err := SelfSigned(k, "relay", []string{"10.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Leaf.IPAddresses) != 1 || Fingerprint(c.Leaf) == "" {
		t.Fatalf("leaf %+v", c.Leaf)
	}
	if err := handshake(t, c, ClientConfig(func() string { return Fingerprint(c.Leaf) }), 0); err != nil {
		t.Fatal(err)
	}
}
