package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"log/slog"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestK8sProxyFlags(t *testing.T) {
	dir := t.TempDir()
	sa := filepath.Join(dir, "sa")
	os.Mkdir(sa, 0o755)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "ca"}, NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	os.WriteFile(filepath.Join(sa, "ca.crt"), caPEM, 0o644)
	os.WriteFile(filepath.Join(sa, "token"), []byte("tok"), 0o600)
	os.WriteFile(filepath.Join(dir, "bad.crt"), []byte("not pem"), 0o644)
	os.WriteFile(filepath.Join(dir, "empty"), nil, 0o600)
	inCluster := map[string]string{"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
	tests := []struct {
		name string
		kf   k8sProxyFlags
		env  map[string]string
		err  string
	}{
		{"in cluster defaults", k8sProxyFlags{mode: "auth", saDir: sa, port: 443}, inCluster, ""},
		{"in cluster noauth", k8sProxyFlags{mode: "noauth", saDir: sa, port: 443}, inCluster, ""},
		{"explicit upstream", k8sProxyFlags{mode: "auth", upstream: "https://api.example:6443", caFile: filepath.Join(sa, "ca.crt"), tokenFile: filepath.Join(sa, "token"), port: 8443}, nil, ""},
		{"not in cluster", k8sProxyFlags{mode: "auth", saDir: sa, port: 443}, nil, "not in a cluster"},
		{"bad mode", k8sProxyFlags{mode: "none", saDir: sa, port: 443}, inCluster, "want auth or noauth"},
		{"http upstream", k8sProxyFlags{mode: "noauth", upstream: "http://api:80", port: 443}, nil, "want https://"},
		{"upstream with credentials", k8sProxyFlags{mode: "noauth", upstream: "https://u:p@api", port: 443}, nil, "want https://"},
		{"upstream with a path", k8sProxyFlags{mode: "noauth", upstream: "https://api/x", port: 443}, nil, "want https://"},
		{"auth without a token", k8sProxyFlags{mode: "auth", upstream: "https://api", port: 443}, nil, "--upstream-token-file"},
		{"token in noauth", k8sProxyFlags{mode: "noauth", upstream: "https://api", tokenFile: filepath.Join(sa, "token"), port: 443}, nil, "for auth mode"},
		{"missing token", k8sProxyFlags{mode: "auth", upstream: "https://api", tokenFile: filepath.Join(dir, "nope"), port: 443}, nil, "unreadable or empty"},
		{"empty token", k8sProxyFlags{mode: "auth", upstream: "https://api", tokenFile: filepath.Join(dir, "empty"), port: 443}, nil, "unreadable or empty"},
		{"bad CA", k8sProxyFlags{mode: "noauth", upstream: "https://api", caFile: filepath.Join(dir, "bad.crt"), port: 443}, nil, "no PEM certificate"},
		{"port 0", k8sProxyFlags{mode: "noauth", upstream: "https://api", port: 0}, nil, "--listen-port"},
		{"port too big", k8sProxyFlags{mode: "noauth", upstream: "https://api", port: 70000}, nil, "--listen-port"},
	}
	c := &cli{stdout: io.Discard, stderr: io.Discard, log: slog.New(slog.DiscardHandler)}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			svc, err := tt.kf.service(func(k string) string { return tt.env[k] }, c)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("err = %v, want %q", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if svc.Port != uint16(tt.kf.port) || svc.NewHandler == nil {
				t.Errorf("service %+v", svc)
			}
		})
	}
}

func TestK8sProxyCLIArgs(t *testing.T) {
	var out strings.Builder
	if code := run(t.Context(), []string{"k8s-proxy", "--mode", "bogus", "--upstream", "https://api"}, io.Discard, &out); code != 2 || !strings.Contains(out.String(), "want auth or noauth") {
		t.Errorf("exit %d, %q", code, out.String())
	}
}

func TestK8sProxyHostnameNeedsEnrolment(t *testing.T) {
	var out strings.Builder
	code := run(t.Context(), []string{"k8s-proxy", "--upstream", "https://api", "--mode", "noauth", "--hostname", "k8s"}, io.Discard, &out)
	if code != 2 || !strings.Contains(out.String(), "--authkey") {
		t.Errorf("exit %d, %q", code, out.String())
	}
}
