package control

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"time"

	"meshd.dev/meshd/control/store"
	"meshd.dev/meshd/internal/atomicfile"
	"meshd.dev/meshd/netmap"
)

// The tailnet CA's files in the state dir and its record in the database.
const (
	caKeyFile  = "ca.key"
	caCertFile = "ca.crt"
	// metaCA is the hex SHA-256 of the CA certificate the database's
	// tailnet was given: a start that finds no CA, or another one, is
	// refused, because hosts that trust the old CA would silently stop
	// trusting the tailnet's certificates.
	metaCA = "tls_ca_sha256"

	// caLifetime is how long the CA certificate is valid. Long, because
	// every host that trusts it must be told about a new one; its name
	// constraints, not its lifetime, are what limits a stolen key.
	caLifetime = 10 * 365 * 24 * time.Hour
	// DefaultCertLifetime is how long a node's TLS certificate is valid:
	// short, since there is no revocation, and nodes renew at a third
	// remaining.
	DefaultCertLifetime = 14 * 24 * time.Hour
	// certBackdate covers clocks a little behind the coordinator's.
	certBackdate = 5 * time.Minute
)

// certAuthority is the coordinator's CA for nodes' TLS certificates.
type certAuthority struct {
	key         *ecdsa.PrivateKey
	cert        *x509.Certificate
	fingerprint string // hex SHA-256 of cert.Raw
}

// newCertAuthority makes a CA whose certificate is name-constrained to
// suffix and the tailnet's address ranges (critical): a client that
// enforces name constraints (Go, OpenSSL, browsers) accepts nothing else
// it signs, even if its key is stolen. It may sign only leaf certificates
// (path length 0) for TLS servers.
func newCertAuthority(suffix string, now time.Time) (*certAuthority, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate CA key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	var id [4]byte
	rand.Read(id[:])
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject: pkix.Name{
			Organization: []string{"meshd"},
			// Distinct per CA, so that an old and a new one are told
			// apart in a trust store.
			CommonName: fmt.Sprintf("meshd tailnet CA %s %x", suffix, id),
		},
		NotBefore:             now.Add(-certBackdate),
		NotAfter:              now.Add(caLifetime),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            0,
		MaxPathLenZero:        true,

		PermittedDNSDomainsCritical: true,
		PermittedDNSDomains:         []string{suffix},
		PermittedIPRanges:           []*net.IPNet{ipNet(netmap.TailnetIPv4), ipNet(netmap.TailnetIPv6)},
		// No mailbox or URI is under ".invalid" (RFC 6761): the CA can
		// certify neither.
		PermittedEmailAddresses: []string{"invalid"},
		PermittedURIDomains:     []string{"invalid"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("create CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse new CA certificate: %w", err)
	}
	return &certAuthority{key: key, cert: cert, fingerprint: derFingerprint(der)}, nil
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func derFingerprint(der []byte) string {
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:])
}

func randomSerial() (*big.Int, error) {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("certificate serial: %w", err)
	}
	return n.Add(n, big.NewInt(1)), nil // positive, never zero
}

// parseCertAuthority reads the PEM files' contents and checks that the key
// is the certificate's.
func parseCertAuthority(keyPEM, certPEM []byte) (*certAuthority, error) {
	kb, _ := pem.Decode(keyPEM)
	if kb == nil || kb.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("%s: not a PEM private key", caKeyFile)
	}
	k, err := x509.ParsePKCS8PrivateKey(kb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", caKeyFile, err)
	}
	key, ok := k.(*ecdsa.PrivateKey)
	if !ok || key.Curve != elliptic.P256() {
		return nil, fmt.Errorf("%s: a %T, want an ECDSA P-256 key", caKeyFile, k)
	}
	cb, _ := pem.Decode(certPEM)
	if cb == nil || cb.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("%s: not a PEM certificate", caCertFile)
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", caCertFile, err)
	}
	if !cert.IsCA || !key.PublicKey.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("%s is not the CA certificate of %s", caCertFile, caKeyFile)
	}
	return &certAuthority{key: key, cert: cert, fingerprint: derFingerprint(cert.Raw)}, nil
}

// checkFor reports why ca cannot sign certificates for a tailnet with DNS
// suffix suffix at now, if it cannot.
func (ca *certAuthority) checkFor(suffix string, now time.Time) error {
	c := ca.cert
	if !slices.Equal(c.PermittedDNSDomains, []string{suffix}) || !c.PermittedDNSDomainsCritical {
		return fmt.Errorf("the tailnet CA is constrained to the DNS names %q, but the DNS suffix is %q", c.PermittedDNSDomains, suffix)
	}
	if !now.Before(c.NotAfter) {
		return fmt.Errorf("the tailnet CA expired at %s", c.NotAfter.UTC().Format(time.RFC3339))
	}
	return nil
}

// pemFiles returns the key and certificate PEM.
func (ca *certAuthority) pemFiles() (keyPEM, certPEM []byte, err error) {
	der, err := x509.MarshalPKCS8PrivateKey(ca.key)
	if err != nil {
		return nil, nil, fmt.Errorf("encode CA key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.cert.Raw}), nil
}

// sign issues a TLS server certificate for pub naming exactly name and
// ips, valid from notBefore to notAfter (both clipped to the CA's own
// validity).
func (ca *certAuthority) sign(pub *ecdsa.PublicKey, name string, ips []netip.Addr, notBefore, notAfter time.Time) ([]byte, error) {
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: name},
		DNSNames:              []string{name},
		NotBefore:             later(notBefore, ca.cert.NotBefore),
		NotAfter:              earlier(notAfter, ca.cert.NotAfter),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	for _, ip := range ips {
		tmpl.IPAddresses = append(tmpl.IPAddresses, ip.AsSlice())
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, pub, ca.key)
	if err != nil {
		return nil, fmt.Errorf("sign certificate for %s: %w", name, err)
	}
	return der, nil
}

func later(a, b time.Time) time.Time {
	if a.Before(b) {
		return b
	}
	return a
}

func earlier(a, b time.Time) time.Time {
	if a.After(b) {
		return b
	}
	return a
}

// errNewCA is what to do about a tailnet CA that cannot be used.
const errNewCA = "restore %s and %s from a backup of the state dir; or start once with --new-ca to create a new CA (it moves the old files aside; every host that trusted the old CA must then trust the new one: meshd cert --install-ca)"

// initCA loads the tailnet CA from the state dir, or creates it where the
// database records none (a first start, or the first start of a build
// with the CA). A CA the database records that is missing, damaged,
// replaced or made for another DNS suffix stops the start with what to
// do, like the coordinator's other state: quietly making a new one would
// leave every host that trusts the old one failing TLS to the tailnet.
// opts.NewCA moves the old files aside and makes a new CA.
func (s *Server) initCA(ctx context.Context) error {
	if s.repl != nil {
		return s.initSharedCA(ctx)
	}
	dir, suffix, now := s.opts.StateDir, s.opts.DNS.Suffix, s.now()
	keyPath, certPath := filepath.Join(dir, caKeyFile), filepath.Join(dir, caCertFile)
	recorded, err := s.store.Meta(ctx, metaCA)
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		return fmt.Errorf("coordinator: tailnet CA record: %w", err)
	}
	keyPEM, kerr := os.ReadFile(keyPath)
	certPEM, cerr := os.ReadFile(certPath)
	for _, e := range []error{kerr, cerr} {
		if e != nil && !errors.Is(e, os.ErrNotExist) {
			return fmt.Errorf("coordinator: tailnet CA: %w", e)
		}
	}
	refuse := func(why string) error {
		return &StateError{Msg: "coordinator: refusing to start: " + why + ": " + fmt.Sprintf(errNewCA, caKeyFile, caCertFile)}
	}
	none := kerr != nil && cerr != nil
	if s.opts.NewCA {
		if none && recorded == "" {
			return fmt.Errorf("coordinator: --new-ca: there is no tailnet CA to replace (%s and %s do not exist): start without --new-ca", keyPath, certPath)
		}
		for _, p := range []string{keyPath, certPath} {
			if moved, err := moveAside(p, "replaced", now); err != nil {
				return fmt.Errorf("coordinator: --new-ca: %w", err)
			} else if moved != "" {
				s.log.Warn("--new-ca: moved the old tailnet CA aside", "path", p, "moved_to", moved)
			}
		}
		return s.createCA(ctx, keyPath, certPath, suffix, now,
			"--new-ca: created a new tailnet CA: every host that trusted the old one must trust this one (meshd cert --install-ca on each node)")
	}
	switch {
	case none && recorded == "":
		return s.createCA(ctx, keyPath, certPath, suffix, now, "created the tailnet CA")
	case none:
		return refuse(fmt.Sprintf("the tailnet CA (%s, %s) is missing, but the database records one (sha256 %s)", keyPath, certPath, recorded))
	case kerr != nil || cerr != nil:
		return refuse(fmt.Sprintf("the tailnet CA is incomplete: only one of %s and %s exists", keyPath, certPath))
	}
	ca, err := parseCertAuthority(keyPEM, certPEM)
	if err != nil {
		return refuse(fmt.Sprintf("the tailnet CA in %s is unusable: %v", dir, err))
	}
	switch {
	case recorded != "" && recorded != ca.fingerprint:
		return refuse(fmt.Sprintf("%s is not the tailnet CA the database records (sha256 %s, the file's is %s)", certPath, recorded, ca.fingerprint))
	case ca.checkFor(suffix, now) != nil:
		return refuse(ca.checkFor(suffix, now).Error())
	case recorded == "":
		// The database was re-initialised (--init-state) or restored from
		// before the CA: the hosts trust these files, so keep them.
		if err := s.store.SetMeta(ctx, metaCA, ca.fingerprint); err != nil {
			return fmt.Errorf("coordinator: record the tailnet CA: %w", err)
		}
		s.log.Info("recorded the tailnet CA found in the state dir", "sha256", ca.fingerprint)
	}
	if left := ca.cert.NotAfter.Sub(now); left < 90*24*time.Hour {
		s.log.Warn("the tailnet CA expires soon: plan --new-ca and re-trusting it on every host", "not_after", ca.cert.NotAfter, "left", left.Round(time.Hour))
	}
	s.ca = ca
	return nil
}

// createCA makes a new CA, writes it (key first: a certificate without its
// key is useless) and records it.
func (s *Server) createCA(ctx context.Context, keyPath, certPath, suffix string, now time.Time, msg string) error {
	ca, err := newCertAuthority(suffix, now)
	if err != nil {
		return fmt.Errorf("coordinator: %w", err)
	}
	keyPEM, certPEM, err := ca.pemFiles()
	if err != nil {
		return fmt.Errorf("coordinator: %w", err)
	}
	if err := atomicfile.Write(keyPath, keyPEM, 0o600); err != nil {
		return fmt.Errorf("coordinator: write %s: %w", keyPath, err)
	}
	if err := atomicfile.Write(certPath, certPEM, 0o600); err != nil {
		return fmt.Errorf("coordinator: write %s: %w", certPath, err)
	}
	if err := s.store.SetMeta(ctx, metaCA, ca.fingerprint); err != nil {
		return fmt.Errorf("coordinator: record the tailnet CA: %w", err)
	}
	s.log.Info(msg, "sha256", ca.fingerprint, "dns_suffix", suffix, "not_after", ca.cert.NotAfter.UTC().Format(time.RFC3339))
	s.ca = ca
	return nil
}
