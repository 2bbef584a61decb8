package certs

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"

	"meshd.dev/meshd/internal/atomicfile"
	"meshd.dev/meshd/netmap"
)

// CheckCA parses the tailnet CA certificate a network map carries and
// checks that it can vouch for nothing outside the tailnet: a CA that may
// sign only leaf certificates (path length 0), with critical name
// constraints that permit exactly the DNS names under suffix, addresses
// only inside the tailnet's ranges, and no e-mail address or URI. A node
// never uses or installs a CA that fails this, so neither an old nor a
// hostile coordinator can get hosts to trust it for public names (with
// clients that enforce name constraints, which browsers, Go and OpenSSL
// do).
func CheckCA(der []byte, suffix string) (*x509.Certificate, error) {
	ca, err := netmap.ParseTLSCA(der)
	if err != nil {
		return nil, err
	}
	switch {
	case ca.MaxPathLen != 0 || !ca.MaxPathLenZero:
		return nil, errors.New("tls ca: it may sign other CAs (want path length 0)")
	case ca.KeyUsage&x509.KeyUsageCertSign == 0:
		return nil, errors.New("tls ca: its key usage does not include signing certificates")
	case !ca.PermittedDNSDomainsCritical:
		return nil, errors.New("tls ca: its name constraints are missing or not critical")
	case suffix == "" || !slices.Equal(ca.PermittedDNSDomains, []string{suffix}):
		return nil, fmt.Errorf("tls ca: it permits the DNS names %q, want exactly the tailnet's %q", ca.PermittedDNSDomains, suffix)
	case len(ca.PermittedIPRanges) == 0:
		return nil, errors.New("tls ca: it permits every IP address")
	case len(ca.PermittedEmailAddresses) == 0 || len(ca.PermittedURIDomains) == 0:
		return nil, errors.New("tls ca: it permits every e-mail address or URI")
	}
	for _, r := range ca.PermittedIPRanges {
		a, ok := netip.AddrFromSlice(r.IP)
		ones, bits := r.Mask.Size()
		p := netip.PrefixFrom(a, ones)
		if !ok || bits != a.BitLen() || !within(p, netmap.TailnetIPv4) && !within(p, netmap.TailnetIPv6) {
			return nil, fmt.Errorf("tls ca: it permits the addresses %v, outside the tailnet", r)
		}
	}
	for _, d := range slices.Concat(ca.PermittedEmailAddresses, ca.PermittedURIDomains) {
		if d != "invalid" && !strings.HasSuffix(d, ".invalid") {
			return nil, fmt.Errorf("tls ca: it permits e-mail addresses or URIs under %q", d)
		}
	}
	return ca, nil
}

// within reports whether p lies inside pool.
func within(p, pool netip.Prefix) bool {
	return p.Bits() >= pool.Bits() && pool.Contains(p.Addr())
}

// TrustStore is a Debian-style system trust store: CA certificates in
// /usr/local/share/ca-certificates, which update-ca-certificates merges
// into /etc/ssl/certs (what OpenSSL, curl, Go and most programs read;
// browsers with their own stores need the CA imported there too).
type TrustStore struct {
	// Root is the file system the store is in: "/" for this host, or the
	// root of a container image or chroot being prepared (and of tests).
	Root string
}

// Dir is where the store's local CA files go.
func (ts TrustStore) Dir() string { return filepath.Join(ts.root(), "usr/local/share/ca-certificates") }

func (ts TrustStore) root() string {
	if ts.Root == "" {
		return "/"
	}
	return ts.Root
}

// CAFileName is the file a tailnet's CA is installed as: one per DNS
// suffix, so a new CA for the same tailnet replaces the old one.
func CAFileName(suffix string) string { return "meshd-" + suffix + ".crt" }

// Install puts ca, the CA of the tailnet with DNS suffix suffix, into the
// store and runs update-ca-certificates. It reports whether anything
// changed (false: the same CA was installed already, and nothing ran) and
// the tool's output.
func (ts TrustStore) Install(ctx context.Context, ca *x509.Certificate, suffix string) (path string, changed bool, out string, err error) {
	if err := netmap.CheckDomain(suffix); err != nil {
		return "", false, "", fmt.Errorf("trust store: %w", err)
	}
	path = filepath.Join(ts.Dir(), CAFileName(suffix))
	want := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Raw})
	if have, err := os.ReadFile(path); err == nil && bytes.Equal(have, want) {
		return path, false, "", nil
	}
	tool, err := exec.LookPath("update-ca-certificates")
	if err != nil {
		return path, false, "", fmt.Errorf("trust store: update-ca-certificates not found (install the ca-certificates package; other systems: add %s to the system's trust store by hand): %w", CAFile, err)
	}
	if err := os.MkdirAll(ts.Dir(), 0o755); err != nil {
		return path, false, "", fmt.Errorf("trust store: %w", err)
	}
	// World-readable: every program on the host reads the trust store.
	if err := atomicfile.Write(path, want, 0o644); err != nil {
		return path, false, "", fmt.Errorf("trust store: %w", err)
	}
	var args []string
	if r := ts.root(); r != "/" {
		args = []string{
			"--certsconf", filepath.Join(r, "etc/ca-certificates.conf"),
			"--certsdir", filepath.Join(r, "usr/share/ca-certificates"),
			"--localcertsdir", ts.Dir(),
			"--etccertsdir", filepath.Join(r, "etc/ssl/certs"),
			"--hooksdir", filepath.Join(r, "etc/ca-certificates/update.d"),
		}
	}
	b, err := exec.CommandContext(ctx, tool, args...).CombinedOutput()
	if err != nil {
		return path, true, string(b), fmt.Errorf("trust store: %s was written, but update-ca-certificates failed: %w: %s", path, err, strings.TrimSpace(string(b)))
	}
	return path, true, string(b), nil
}
