package certs

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestTrustStoreInstall runs the real update-ca-certificates on a trust
// store under a temporary root (never the host's /etc): the CA lands in
// the bundle and the hashed directory OpenSSL reads, a certificate it
// signed verifies against them, and installing it again changes nothing.
func TestTrustStoreInstall(t *testing.T) {
	if _, err := exec.LookPath("update-ca-certificates"); err != nil {
		t.Fatalf("update-ca-certificates is needed (Debian package ca-certificates): %v", err)
	}
	root := t.TempDir()
	for _, d := range []string{"etc/ssl/certs", "usr/share/ca-certificates"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	ca := newTestCA(t, nil)
	ts := TrustStore{Root: root}
	path, changed, out, err := ts.Install(t.Context(), ca.cert, testSuffix)
	if err != nil || !changed {
		t.Fatalf("install: changed=%v %v\n%s", changed, err, out)
	}
	if want := filepath.Join(root, "usr/local/share/ca-certificates", "meshd-"+testSuffix+".crt"); path != want {
		t.Errorf("installed at %s, want %s", path, want)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o644 {
		t.Errorf("installed file: %v %v", fi, err)
	}
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.cert.Raw})
	bundle, err := os.ReadFile(filepath.Join(root, "etc/ssl/certs/ca-certificates.crt"))
	if err != nil || !bytes.Contains(bundle, caPEM) {
		t.Fatalf("bundle does not hold the CA: %v\n%s", err, out)
	}

	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leafDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: testName}, DNSNames: []string{testName},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, ca.cert, key.Public(), ca.key)
	if err != nil {
		t.Fatal(err)
	}
	leaf := filepath.Join(t.TempDir(), "leaf.pem")
	os.WriteFile(leaf, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leafDER}), 0o600)
	for _, args := range [][]string{
		{"-CAfile", filepath.Join(root, "etc/ssl/certs/ca-certificates.crt")},
		{"-CApath", filepath.Join(root, "etc/ssl/certs")},
	} {
		if b, err := exec.Command("openssl", append(append([]string{"verify"}, args...), leaf)...).CombinedOutput(); err != nil {
			t.Errorf("openssl verify %v: %v\n%s", args, err, b)
		}
	}

	if _, changed, _, err := ts.Install(t.Context(), ca.cert, testSuffix); err != nil || changed {
		t.Errorf("installing the same CA again: changed=%v %v", changed, err)
	}
	ca2 := newTestCA(t, nil) // --new-ca on the coordinator
	if _, changed, out, err := ts.Install(t.Context(), ca2.cert, testSuffix); err != nil || !changed {
		t.Fatalf("a new CA: changed=%v %v\n%s", changed, err, out)
	}
	bundle, _ = os.ReadFile(filepath.Join(root, "etc/ssl/certs/ca-certificates.crt"))
	if bytes.Contains(bundle, caPEM) || !bytes.Contains(bundle, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca2.cert.Raw})) {
		t.Error("the new CA did not replace the old one in the bundle")
	}
	if _, _, _, err := ts.Install(t.Context(), ca.cert, "../../etc"); err == nil || !strings.Contains(err.Error(), "domain") {
		t.Errorf("a suffix that is a path: %v", err)
	}
}
