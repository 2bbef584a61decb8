package certs

import (
	"crypto/tls"
	"testing"
)

// BenchmarkGetCertificate is the cost GetCertificate adds to each TLS
// handshake once the node holds a certificate.
func BenchmarkGetCertificate(b *testing.B) {
	ca := newTestCA(b, nil)
	m := New(b.TempDir(), nil)
	m.SetSelf(selfWith(ca, testName))
	m.SetIssuer(&issuer{ca: ca})
	hello := &tls.ClientHelloInfo{ServerName: testName}
	if _, err := m.GetCertificate(hello); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := m.GetCertificate(hello); err != nil {
			b.Fatal(err)
		}
	}
}
