// Package certs keeps a node's TLS certificate for its MagicDNS name. The
// node makes the key itself, asks the coordinator's tailnet CA to sign a
// request for its own name, stores the pair in the state dir, renews it
// when a third of its lifetime is left, and hands it to TLS servers
// (Manager.GetCertificate). The package also checks the tailnet CA that the
// network map carries (CheckCA) and installs it in a host trust store
// (TrustStore).
package certs

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"meshd.dev/meshd/internal/atomicfile"
	"meshd.dev/meshd/internal/backoff"
	"meshd.dev/meshd/netmap"
)

// Files in the state dir.
const (
	// PairFile holds the node's private key and its certificate (PEM).
	PairFile = "tls.pem"
	// CAFile is the tailnet CA certificate (PEM), for --cacert and trust
	// stores.
	CAFile = "tailnet-ca.crt"
)

const (
	// fetchTimeout bounds one certificate request to the coordinator.
	fetchTimeout = 30 * time.Second
	// failHold is how long a failed request is the answer to the next
	// ones, so that a burst of TLS handshakes does not become a burst of
	// requests to the coordinator (which rate-limits them anyway).
	failHold = 10 * time.Second
	// maxPairFile bounds the stored pair when it is read.
	maxPairFile = 64 << 10
)

// Issuer signs certificate requests: the node's control client
// (controlclient.Client.Cert).
type Issuer interface {
	Cert(ctx context.Context, req netmap.CertRequest) (*netmap.CertResponse, error)
}

// Self is what the current network map says about the node and its
// tailnet: what its certificate must name and chain to.
type Self struct {
	// Name is the node's DNS name without the trailing dot; empty when the
	// map has none.
	Name   string
	Suffix string
	Addrs  []netip.Addr
	// CA is the tailnet CA certificate (DER); nil from a coordinator
	// without one.
	CA []byte
	// KeyExpiry is when the node's key expires (zero: never). The
	// coordinator issues no certificate past it, so one that reaches it
	// is not renewed: a new one could not last longer.
	KeyExpiry time.Time
}

// SelfOf reads a Self from a network map.
func SelfOf(nm *netmap.NetworkMap) Self {
	return Self{
		Name:      strings.TrimSuffix(nm.Self.DNSName, "."),
		Suffix:    nm.DNS.Suffix,
		Addrs:     netmap.AddrsOf(nm.Self.Addresses),
		CA:        nm.TLSCA,
		KeyExpiry: nm.Self.KeyExpiry,
	}
}

// Manager holds the node's certificate. Its methods are safe for
// concurrent use.
type Manager struct {
	dir string
	log *slog.Logger

	fetchMu sync.Mutex // one request to the coordinator at a time
	wake    chan struct{}

	mu       sync.Mutex
	haveSelf bool // SetSelf was called
	self     Self
	// gen counts changes of what a certificate depends on (SetSelf,
	// SetIssuer), so that Run retries a failure early only after one.
	gen    uint64
	ca     *x509.Certificate // self.CA once CheckCA accepted it
	caErr  error             // why ca is nil
	issuer Issuer
	cur    *tls.Certificate // Leaf set; nil when there is none
	// verified is the certificate fitsLocked last verified, at
	// generation verifiedGen.
	verified    *tls.Certificate
	verifiedGen uint64
	// wanted: something asked for a certificate (or one was stored), so
	// Run keeps one current.
	wanted  bool
	failed  time.Time // when the last request failed
	failErr error
}

// New returns a manager for the state dir dir, with the certificate stored
// there (if any; one that cannot be read is moved aside and logged).
func New(dir string, log *slog.Logger) *Manager {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m := &Manager{dir: dir, log: log, wake: make(chan struct{}, 1),
		caErr: errors.New("no network map yet: run meshd up")}
	path := filepath.Join(dir, PairFile)
	data, err := readSmall(path, maxPairFile)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return m
	case err == nil:
		var c *tls.Certificate
		if c, err = parsePair(data); err == nil {
			m.cur, m.wanted = c, true
			return m
		}
	}
	to := fmt.Sprintf("%s.corrupt-%s", path, time.Now().UTC().Format("20060102T150405Z"))
	if rerr := os.Rename(path, to); rerr != nil {
		log.Error("TLS certificate file unusable, and moving it aside failed", "path", path, "err", err, "rename_err", rerr)
		return m
	}
	log.Warn("TLS certificate file unusable; moved it aside (a new certificate is fetched when one is needed)", "path", path, "moved_to", to, "err", err)
	return m
}

func readSmall(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if fi.Size() > limit {
		return nil, fmt.Errorf("%d bytes, at most %d", fi.Size(), limit)
	}
	buf := make([]byte, fi.Size())
	_, err = f.ReadAt(buf, 0)
	return buf, err
}

// parsePair reads a stored pair: one ECDSA private key and one
// certificate for it.
func parsePair(data []byte) (*tls.Certificate, error) {
	c, err := tls.X509KeyPair(data, data)
	if err != nil {
		return nil, err
	}
	if len(c.Certificate) != 1 {
		return nil, fmt.Errorf("%d certificates, want 1", len(c.Certificate))
	}
	if _, ok := c.PrivateKey.(*ecdsa.PrivateKey); !ok {
		return nil, fmt.Errorf("a %T key, want ECDSA", c.PrivateKey)
	}
	return &c, nil
}

// SetSelf tells the manager what the current network map says. A new or
// changed tailnet CA is checked (CheckCA) and written to CAFile; a
// certificate that no longer fits (another name or CA) is replaced.
func (m *Manager) SetSelf(s Self) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.haveSelf && sameSelf(m.self, s) {
		return // most maps change peers, not us
	}
	m.haveSelf = true
	m.self = s
	m.ca, m.caErr = nil, nil
	switch ca, err := CheckCA(s.CA, s.Suffix); {
	case len(s.CA) == 0:
		m.caErr = errors.New("the coordinator sends no tailnet CA (it may be older than meshd's certificates: upgrade it)")
	case err != nil:
		m.caErr = fmt.Errorf("refusing the coordinator's tailnet CA: %w", err)
		m.log.Error("the coordinator's tailnet CA is not limited to the tailnet; it is not used or installed", "err", err)
	default:
		m.ca = ca
		m.writeCALocked(ca)
	}
	m.changedLocked()
}

func sameSelf(a, b Self) bool {
	return a.Name == b.Name && a.Suffix == b.Suffix && slices.Equal(a.Addrs, b.Addrs) && bytes.Equal(a.CA, b.CA) && a.KeyExpiry.Equal(b.KeyExpiry)
}

// changedLocked records that what a certificate depends on changed: a
// failed request is no longer the answer, and Run looks again. m.mu held.
func (m *Manager) changedLocked() {
	m.gen++
	m.failErr = nil
	m.kick()
}

// writeCALocked keeps CAFile equal to the tailnet CA. m.mu held.
func (m *Manager) writeCALocked(ca *x509.Certificate) {
	path := filepath.Join(m.dir, CAFile)
	want := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Raw})
	if have, err := os.ReadFile(path); err == nil && bytes.Equal(have, want) {
		return
	}
	if err := atomicfile.Write(path, want, 0o600); err != nil {
		m.log.Error("write the tailnet CA", "err", err)
		return
	}
	m.log.Info("tailnet CA saved", "path", path, "subject", ca.Subject.CommonName)
}

// SetIssuer sets the control client that signs requests; nil while the
// node has no connection to the coordinator.
func (m *Manager) SetIssuer(iss Issuer) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.issuer = iss
	m.changedLocked()
}

func (m *Manager) kick() {
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

// fitsLocked reports whether c is a certificate for the current name
// under the current CA, valid at now. The chain is verified once per
// certificate and generation (a signature check costs about as much as
// the TLS handshake it would be part of); after that only the validity
// period is compared. m.mu held.
func (m *Manager) fitsLocked(c *tls.Certificate, now time.Time) bool {
	if c == nil || m.ca == nil || m.self.Name == "" {
		return false
	}
	if c == m.verified && m.gen == m.verifiedGen {
		return !now.Before(c.Leaf.NotBefore) && !now.After(c.Leaf.NotAfter)
	}
	roots := x509.NewCertPool()
	roots.AddCert(m.ca)
	_, err := c.Leaf.Verify(x509.VerifyOptions{
		DNSName: m.self.Name, Roots: roots, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	if err != nil {
		return false
	}
	m.verified, m.verifiedGen = c, m.gen
	return true
}

// renewAt is when a certificate is renewed: a third of its lifetime
// before it ends.
func renewAt(leaf *x509.Certificate) time.Time {
	return leaf.NotAfter.Add(-leaf.NotAfter.Sub(leaf.NotBefore) / 3)
}

// renewDueLocked reports whether m.cur (which fits) should be renewed at
// now, or else when. m.mu held.
func (m *Manager) renewDueLocked(now time.Time) (bool, time.Duration) {
	leaf := m.cur.Leaf
	if exp := m.self.KeyExpiry; !exp.IsZero() && !leaf.NotAfter.Before(exp.Truncate(time.Second)) {
		// It lasts as long as the node may: renewing gains nothing,
		// and would repeat ever faster as the expiry nears.
		return false, 0
	}
	if at := renewAt(leaf); now.Before(at) {
		return false, at.Sub(now)
	}
	return true, 0
}

// current returns the certificate if it fits, and whether it is due for
// renewal.
func (m *Manager) current(now time.Time) (*tls.Certificate, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.wanted = true
	if !m.fitsLocked(m.cur, now) {
		return nil, false
	}
	due, _ := m.renewDueLocked(now)
	return m.cur, due
}

// Certificate returns a certificate for the node's name, fetching one if
// there is none that fits.
func (m *Manager) Certificate(ctx context.Context) (*tls.Certificate, error) {
	if c, renew := m.current(time.Now()); c != nil {
		if renew {
			m.kick() // Run renews it; this one is still good
		}
		return c, nil
	}
	m.fetchMu.Lock()
	defer m.fetchMu.Unlock()
	now := time.Now()
	if c, _ := m.current(now); c != nil {
		return c, nil // fetched while we waited
	}
	m.mu.Lock()
	failErr, failed := m.failErr, m.failed
	m.mu.Unlock()
	if failErr != nil && now.Sub(failed) < failHold {
		return nil, failErr
	}
	return m.fetch(ctx)
}

// GetCertificate is a tls.Config.GetCertificate for the node's name: it
// answers a ClientHello without a server name (a client connecting by
// address) or naming the node, and refuses any other name.
func (m *Manager) GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	m.mu.Lock()
	name := m.self.Name
	m.mu.Unlock()
	if sni := hello.ServerName; sni != "" && !strings.EqualFold(strings.TrimSuffix(sni, "."), name) {
		return nil, fmt.Errorf("no certificate for %q: this node is %q", sni, name)
	}
	ctx := hello.Context()
	if ctx == nil {
		ctx = context.Background()
	}
	return m.Certificate(ctx)
}

// fetch asks the coordinator for a certificate for a new key and stores
// the pair. m.fetchMu held.
func (m *Manager) fetch(ctx context.Context) (c *tls.Certificate, err error) {
	m.mu.Lock()
	self, ca, caErr, iss := m.self, m.ca, m.caErr, m.issuer
	m.mu.Unlock()
	defer func() {
		if err != nil {
			m.mu.Lock()
			m.failErr, m.failed = err, time.Now()
			m.mu.Unlock()
		}
	}()
	switch {
	case self.Name == "":
		return nil, errors.New("TLS certificate: the node has no DNS name yet (no network map, or a coordinator without MagicDNS names)")
	case ca == nil:
		return nil, fmt.Errorf("TLS certificate: %w", caErr)
	case iss == nil:
		return nil, errors.New("TLS certificate: not connected to the coordinator (run meshd up)")
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("TLS certificate: generate key: %w", err)
	}
	tmpl := &x509.CertificateRequest{Subject: pkix.Name{CommonName: self.Name}, DNSNames: []string{self.Name}}
	for _, a := range self.Addrs {
		tmpl.IPAddresses = append(tmpl.IPAddresses, net.IP(a.AsSlice()))
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		return nil, fmt.Errorf("TLS certificate: request: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, fetchTimeout)
	defer cancel()
	resp, err := iss.Cert(ctx, netmap.CertRequest{Version: netmap.ProtocolVersion, CSR: csr})
	if err != nil {
		return nil, fmt.Errorf("TLS certificate for %s: %w", self.Name, err)
	}
	c, err = checkIssued(resp, key, ca, self.Name, time.Now())
	if err != nil {
		return nil, fmt.Errorf("TLS certificate for %s: %w", self.Name, err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("TLS certificate: encode key: %w", err)
	}
	data := append(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}),
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: resp.Cert})...)
	if err := atomicfile.Write(filepath.Join(m.dir, PairFile), data, 0o600); err != nil {
		// Served from memory all the same; the next start fetches again.
		m.log.Error("store the TLS certificate", "err", err)
	}
	m.mu.Lock()
	m.cur, m.failErr = c, nil
	m.mu.Unlock()
	m.kick() // Run times the renewal of this one
	m.log.Info("TLS certificate issued", "name", self.Name, "not_after", c.Leaf.NotAfter.UTC().Format(time.RFC3339), "renew_at", renewAt(c.Leaf).UTC().Format(time.RFC3339))
	return c, nil
}

// checkIssued checks that the coordinator's answer is a certificate for
// key, naming name, signed by ca (the map's CA, which the answer must
// name too), valid at now and for a TLS server.
func checkIssued(resp *netmap.CertResponse, key *ecdsa.PrivateKey, ca *x509.Certificate, name string, now time.Time) (*tls.Certificate, error) {
	if !bytes.Equal(resp.CA, ca.Raw) {
		return nil, errors.New("the coordinator signed it with a CA other than the one in the network map")
	}
	leaf, err := x509.ParseCertificate(resp.Cert)
	if err != nil {
		return nil, fmt.Errorf("the coordinator sent an unreadable certificate: %w", err)
	}
	if !key.PublicKey.Equal(leaf.PublicKey) {
		return nil, errors.New("the coordinator sent a certificate for another key")
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	if _, err := leaf.Verify(x509.VerifyOptions{DNSName: name, Roots: roots, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		return nil, fmt.Errorf("the coordinator sent a certificate that does not verify: %w", err)
	}
	return &tls.Certificate{Certificate: [][]byte{resp.Cert}, PrivateKey: key, Leaf: leaf}, nil
}

// Pair is the node's certificate and key as PEM, for `meshd cert`.
type Pair struct {
	Name     string
	CertPEM  []byte
	KeyPEM   []byte
	NotAfter time.Time
}

// Pair returns the node's certificate and key, fetching a certificate if
// there is none that fits.
func (m *Manager) Pair(ctx context.Context) (*Pair, error) {
	c, err := m.Certificate(ctx)
	if err != nil {
		return nil, err
	}
	kder, err := x509.MarshalPKCS8PrivateKey(c.PrivateKey)
	if err != nil {
		return nil, fmt.Errorf("encode key: %w", err)
	}
	return &Pair{
		Name:     c.Leaf.DNSNames[0],
		CertPEM:  pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Certificate[0]}),
		KeyPEM:   pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}),
		NotAfter: c.Leaf.NotAfter,
	}, nil
}

// CA returns the tailnet CA certificate and the DNS suffix it is for, or
// why there is none the node uses.
func (m *Manager) CA() (*x509.Certificate, string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.ca == nil {
		return nil, "", m.caErr
	}
	return m.ca, m.self.Suffix, nil
}

// Run keeps the certificate current while ctx lasts, once one was asked
// for: it renews when a third of its lifetime is left (or at once when the
// node's name or CA changed). A failure is retried after a backoff of one
// minute up to an hour, or sooner if the node's name, CA or connection
// changes meanwhile.
func (m *Manager) Run(ctx context.Context) {
	bo := backoff.Backoff{Min: time.Minute, Max: time.Hour}
	var retryAt time.Time
	var failedGen uint64
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		now := time.Now()
		wait, due, gen := m.next(now)
		if due && gen == failedGen && now.Before(retryAt) {
			due, wait = false, retryAt.Sub(now)
		}
		if due {
			err := m.renew(ctx)
			if ctx.Err() != nil {
				return
			}
			if err == nil {
				bo = backoff.Backoff{Min: time.Minute, Max: time.Hour}
				retryAt = time.Time{}
				continue
			}
			wait = bo.Delay(0)
			retryAt, failedGen = time.Now().Add(wait), gen
			m.log.Warn("TLS certificate renewal failed; retrying", "in", wait.Round(time.Second), "err", err)
		}
		t.Stop()
		var tc <-chan time.Time
		if wait > 0 {
			t.Reset(wait)
			tc = t.C
		}
		select {
		case <-ctx.Done():
			return
		case <-m.wake:
		case <-tc:
		}
	}
}

// next says whether a renewal is due now, or else how long until it is (0:
// until something changes), and the generation of what it depends on.
func (m *Manager) next(now time.Time) (wait time.Duration, due bool, gen uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.wanted || m.self.Name == "" || m.ca == nil || m.issuer == nil {
		return 0, false, m.gen
	}
	if !m.fitsLocked(m.cur, now) {
		return 0, true, m.gen
	}
	due, wait = m.renewDueLocked(now)
	return wait, due, m.gen
}

func (m *Manager) renew(ctx context.Context) error {
	m.fetchMu.Lock()
	defer m.fetchMu.Unlock()
	if _, due, _ := m.next(time.Now()); !due {
		return nil // someone else renewed it meanwhile
	}
	_, err := m.fetch(ctx)
	return err
}
