package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/netmap"
)

// certDaemon is a daemon's local API holding a certificate for name under
// a tailnet CA, as the agent does.
type certDaemon struct {
	name    string
	caPEM   string
	certPEM string
	keyPEM  string
}

func (certDaemon) Up(context.Context, localapi.UpRequest) (*localapi.Status, error) {
	return nil, errors.New("not in this test")
}
func (certDaemon) Down(context.Context) error { return errors.New("not in this test") }
func (certDaemon) Status(context.Context) (*localapi.Status, error) {
	return &localapi.Status{BackendState: localapi.StateRunning}, nil
}
func (certDaemon) Drops(context.Context) (*localapi.Drops, error) { return &localapi.Drops{}, nil }

func (d certDaemon) CertPair(_ context.Context, name string) (*localapi.CertPair, error) {
	if name != "" && name != d.name {
		return nil, fmt.Errorf("cert: this node is %q: it can have a certificate only for its own name, not %q", d.name, name)
	}
	return &localapi.CertPair{Name: d.name, CertPEM: d.certPEM, KeyPEM: d.keyPEM, NotAfter: time.Now().Add(time.Hour)}, nil
}

func (d certDaemon) TailnetCA(context.Context) (*localapi.TailnetCA, error) {
	return &localapi.TailnetCA{Suffix: netmap.DefaultDNSSuffix, CertPEM: d.caPEM}, nil
}

// newCertDaemon serves a certDaemon on a socket until the test ends; the
// CA is constrained like the coordinator's unless unconstrained.
func newCertDaemon(t *testing.T, unconstrained bool) (string, certDaemon) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test tailnet CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true, MaxPathLenZero: true,
	}
	if !unconstrained {
		tmpl.PermittedDNSDomainsCritical, tmpl.PermittedDNSDomains = true, []string{netmap.DefaultDNSSuffix}
		tmpl.PermittedIPRanges = []*net.IPNet{{IP: net.ParseIP("100.64.0.0").To4(), Mask: net.CIDRMask(10, 32)}}
		tmpl.PermittedEmailAddresses, tmpl.PermittedURIDomains = []string{"invalid"}, []string{"invalid"}
	}
	caDER, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, caKey.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	d := certDaemon{
		name:    "web." + netmap.DefaultDNSSuffix,
		caPEM:   string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})),
		certPEM: "-----BEGIN CERTIFICATE-----\nbGVhZg==\n-----END CERTIFICATE-----\n",
		keyPEM:  "-----BEGIN PRIVATE KEY-----\na2V5\n-----END PRIVATE KEY-----\n",
	}
	sock := filepath.Join(t.TempDir(), "meshd.sock")
	ln, err := localapi.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- localapi.Serve(ctx, ln, d) }()
	t.Cleanup(func() { cancel(); <-done })
	return sock, d
}

func runCLI(args ...string) (int, string, string) {
	var stdout, stderr bytes.Buffer
	code := run(context.Background(), args, &stdout, &stderr)
	return code, stdout.String(), stderr.String()
}

func fileIs(t *testing.T, path, want string, perm os.FileMode) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	if string(b) != want || fi.Mode().Perm() != perm {
		t.Errorf("%s: mode %v, %d bytes; want %v and the daemon's %d bytes", path, fi.Mode().Perm(), len(b), perm, len(want))
	}
}

func TestCertCommand(t *testing.T) {
	sock, d := newCertDaemon(t, false)
	dir := t.TempDir()
	t.Chdir(dir)

	// Defaults: NAME.crt (0644) and NAME.key (0600) here.
	code, out, errOut := runCLI("cert", "--socket", sock)
	if code != 0 || !strings.Contains(out, "wrote the certificate for "+d.name) {
		t.Fatalf("meshd cert: exit %d\n%s%s", code, out, errOut)
	}
	fileIs(t, filepath.Join(dir, d.name+".crt"), d.certPEM, 0o644)
	fileIs(t, filepath.Join(dir, d.name+".key"), d.keyPEM, 0o600)
	// Again: nothing to write, says so, exits 1.
	code, out, errOut = runCLI("cert", "--socket", sock, d.name)
	if code != 1 || !strings.Contains(out, "are current") || !strings.Contains(errOut, "nothing changed") {
		t.Fatalf("meshd cert again: exit %d\n%s%s", code, out, errOut)
	}
	// A key file someone made world-readable is rewritten 0600.
	os.Chmod(filepath.Join(dir, d.name+".key"), 0o644)
	if code, out, errOut := runCLI("cert", "--socket", sock); code != 0 {
		t.Fatalf("meshd cert over a 0644 key: exit %d\n%s%s", code, out, errOut)
	}
	fileIs(t, filepath.Join(dir, d.name+".key"), d.keyPEM, 0o600)

	// Explicit paths; another node's name is refused by the daemon.
	cf, kf := filepath.Join(dir, "x", "tls.crt"), filepath.Join(dir, "tls.key")
	os.Mkdir(filepath.Dir(cf), 0o755)
	if code, out, errOut := runCLI("cert", "--socket", sock, "--cert-file", cf, "--key-file", kf); code != 0 {
		t.Fatalf("--cert-file --key-file: exit %d\n%s%s", code, out, errOut)
	}
	fileIs(t, cf, d.certPEM, 0o644)
	fileIs(t, kf, d.keyPEM, 0o600)
	if code, _, errOut := runCLI("cert", "--socket", sock, "other."+netmap.DefaultDNSSuffix); code != 1 || !strings.Contains(errOut, "only for its own name") {
		t.Errorf("another node's name: exit %d: %s", code, errOut)
	}

	// --ca-file alone writes only the CA.
	caf := filepath.Join(t.TempDir(), "ca.pem")
	code, out, errOut = runCLI("cert", "--socket", sock, "--ca-file", caf)
	if code != 0 || strings.Contains(out, "certificate for") {
		t.Fatalf("--ca-file: exit %d\n%s%s", code, out, errOut)
	}
	fileIs(t, caf, d.caPEM, 0o644)
	if code, _, _ := runCLI("cert", "--socket", sock, "--ca-file", caf); code != 1 {
		t.Errorf("--ca-file again: exit %d, want 1", code)
	}

	for _, args := range [][]string{
		{"--trust-root", dir},       // without --install-ca
		{"a.meshd.internal", "b.x"}, // two domains
	} {
		if code, _, errOut := runCLI(append([]string{"cert", "--socket", sock}, args...)...); code != 2 {
			t.Errorf("cert %q: exit %d, want 2: %s", args, code, errOut)
		}
	}
	if code, _, errOut := runCLI("cert", "--socket", filepath.Join(dir, "nobody.sock")); code != 1 || !strings.Contains(errOut, "no daemon") {
		t.Errorf("no daemon: exit %d: %s", code, errOut)
	}
}

// TestCertInstallCA runs --install-ca against a trust store under a
// temporary root with the real update-ca-certificates; a daemon offering
// a CA that is not constrained to the tailnet gets nothing installed.
func TestCertInstallCA(t *testing.T) {
	sock, d := newCertDaemon(t, false)
	root := t.TempDir()
	for _, p := range []string{"etc/ssl/certs", "usr/share/ca-certificates"} {
		os.MkdirAll(filepath.Join(root, p), 0o755)
	}
	code, out, errOut := runCLI("cert", "--socket", sock, "--install-ca", "--trust-root", root)
	if code != 0 || !strings.Contains(out, "installed the tailnet CA") {
		t.Fatalf("--install-ca: exit %d\n%s%s", code, out, errOut)
	}
	bundle, _ := os.ReadFile(filepath.Join(root, "etc/ssl/certs/ca-certificates.crt"))
	if !bytes.Contains(bundle, []byte(d.caPEM)) {
		t.Fatal("the CA is not in the trust store's bundle")
	}
	code, out, _ = runCLI("cert", "--socket", sock, "--install-ca", "--trust-root", root)
	if code != 1 || !strings.Contains(out, "already installed") {
		t.Errorf("--install-ca again: exit %d: %s", code, out)
	}

	bad, _ := newCertDaemon(t, true)
	root2 := t.TempDir()
	code, _, errOut = runCLI("cert", "--socket", bad, "--install-ca", "--trust-root", root2)
	if code != 1 || !strings.Contains(errOut, "refusing to install") {
		t.Errorf("unconstrained CA: exit %d: %s", code, errOut)
	}
	if ents, _ := os.ReadDir(filepath.Join(root2, "usr/local/share/ca-certificates")); len(ents) != 0 {
		t.Errorf("installed an unconstrained CA: %v", ents)
	}
}

// TestCoordinatorNewCA: a coordinator whose tailnet CA vanished refuses to
// start and names --new-ca; --new-ca makes a new CA (printed at start),
// which later starts keep; --new-ca with no CA to replace is refused.
func TestCoordinatorNewCA(t *testing.T) {
	dir := t.TempDir()
	coordinator := func(args ...string) (code int, caLine, errOut string) {
		return coordinatorUntil(dir, "tailnet CA: ", args...)
	}
	code, first, errOut := coordinator()
	if code != 0 || !strings.HasPrefix(first, filepath.Join(dir, "ca.crt")+" (sha256 ") {
		t.Fatalf("first start: exit %d, tailnet CA line %q: %s", code, first, errOut)
	}
	for _, f := range []string{"ca.key", "ca.crt"} {
		if err := os.Remove(filepath.Join(dir, f)); err != nil {
			t.Fatal(err)
		}
	}
	if code, _, errOut := coordinator(); code != 1 || !strings.Contains(errOut, "refusing to start") || !strings.Contains(errOut, "--new-ca") {
		t.Fatalf("start without the CA: exit %d: %s", code, errOut)
	}
	code, second, errOut := coordinator("--new-ca")
	if code != 0 || second == first || second == "" {
		t.Fatalf("--new-ca: exit %d, CA %q (was %q): %s", code, second, first, errOut)
	}
	if code, third, errOut := coordinator(); code != 0 || third != second {
		t.Fatalf("start after --new-ca: exit %d, CA %q, want %q: %s", code, third, second, errOut)
	}
	dir = t.TempDir()
	if code, _, errOut := coordinator("--new-ca"); code != 1 || !strings.Contains(errOut, "no tailnet CA to replace") {
		t.Fatalf("--new-ca on a first start: exit %d: %s", code, errOut)
	}
}
