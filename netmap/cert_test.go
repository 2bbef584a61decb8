package netmap

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"math/big"
	"testing"
	"time"
)

// testCert is a self-signed certificate, a CA or not.
func testCert(t testing.TB, isCA bool) []byte {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		BasicConstraintsValid: true, IsCA: isCA,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// TestApplyTLSCA: a full map sets the tailnet CA (or clears it, from a
// coordinator without one), a delta replaces it only when it carries one,
// and a map whose CA is not a CA certificate changes nothing.
func TestApplyTLSCA(t *testing.T) {
	self := testNode(1, "100.64.0.1")
	ca1, ca2 := testCert(t, true), testCert(t, true)
	var m NetworkMap
	steps := []struct {
		name string
		resp MapResponse
		want []byte
		err  bool
	}{
		{"full", MapResponse{Epoch: "e", Version: 1, Full: true, Self: &self, TLSCA: ca1}, ca1, false},
		{"delta without", MapResponse{Epoch: "e", Version: 2, PeersRemoved: []NodeID{9}}, ca1, false},
		{"keep-alive", MapResponse{Epoch: "e", Version: 2, KeepAlive: true}, ca1, false},
		{"delta with", MapResponse{Epoch: "e", Version: 3, TLSCA: ca2}, ca2, false},
		{"not a CA", MapResponse{Epoch: "e", Version: 4, TLSCA: testCert(t, false)}, ca2, true},
		{"not a certificate", MapResponse{Epoch: "e", Version: 4, TLSCA: []byte("junk")}, ca2, true},
		{"too large", MapResponse{Epoch: "e", Version: 4, TLSCA: make([]byte, MaxCertSize+1)}, ca2, true},
		{"full without", MapResponse{Epoch: "f", Version: 1, Full: true, Self: &self}, nil, false},
	}
	for _, s := range steps {
		err := m.Apply(&s.resp)
		if (err != nil) != s.err {
			t.Fatalf("%s: err=%v", s.name, err)
		}
		if !bytes.Equal(m.TLSCA, s.want) {
			t.Fatalf("%s: tls ca %d bytes, want %d", s.name, len(m.TLSCA), len(s.want))
		}
	}
	// The wire form round-trips (base64 DER).
	b, _ := json.Marshal(MapResponse{Epoch: "e", Full: true, Self: &self, TLSCA: ca1})
	r, err := DecodeMapResponse(b)
	if err != nil || !bytes.Equal(r.TLSCA, ca1) {
		t.Fatalf("decode: %v", err)
	}
}
