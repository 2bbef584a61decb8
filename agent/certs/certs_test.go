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
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"meshd.dev/meshd/netmap"
)

const (
	testSuffix = "meshd.internal"
	testName   = "gpu-1.meshd.internal"
	lifetime   = 14 * 24 * time.Hour
)

// testCA is a tailnet CA like the coordinator's (mod changes its
// template).
type testCA struct {
	key  *ecdsa.PrivateKey
	cert *x509.Certificate
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func caTemplate(suffix string) *x509.Certificate {
	now := time.Now()
	return &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test tailnet CA " + suffix},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true, MaxPathLenZero: true,
		PermittedDNSDomainsCritical: true, PermittedDNSDomains: []string{suffix},
		PermittedIPRanges:       []*net.IPNet{ipNet(netmap.TailnetIPv4), ipNet(netmap.TailnetIPv6)},
		PermittedEmailAddresses: []string{"invalid"}, PermittedURIDomains: []string{"invalid"},
	}
}

func newTestCA(t testing.TB, mod func(*x509.Certificate)) *testCA {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := caTemplate(testSuffix)
	if mod != nil {
		mod(tmpl)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{key: key, cert: cert}
}

// issuer signs requests with a CA as the coordinator would, counting
// them; err, if set, is its answer instead; tamper, if set, changes what
// it signs.
type issuer struct {
	ca     *testCA
	mu     sync.Mutex
	n      int
	err    error
	tamper func(tmpl *x509.Certificate, pub *any, resp *netmap.CertResponse)
	// expiry, if set, caps NotAfter, as the node key's expiry does.
	expiry time.Time
	// limit, if set, is how many requests it answers before it refuses
	// them all, as the coordinator's rate limit does.
	limit int
}

func (is *issuer) count() int {
	is.mu.Lock()
	defer is.mu.Unlock()
	return is.n
}

func (is *issuer) Cert(_ context.Context, req netmap.CertRequest) (*netmap.CertResponse, error) {
	is.mu.Lock()
	defer is.mu.Unlock()
	is.n++
	if is.err != nil {
		return nil, is.err
	}
	if is.limit > 0 && is.n > is.limit {
		return nil, errors.New("rate limited")
	}
	csr, err := x509.ParseCertificateRequest(req.CSR)
	if err != nil || csr.CheckSignature() != nil {
		return nil, fmt.Errorf("bad csr: %v", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(int64(is.n)), Subject: pkix.Name{CommonName: csr.DNSNames[0]},
		DNSNames: csr.DNSNames, IPAddresses: csr.IPAddresses,
		NotBefore: now.Add(-5 * time.Minute), NotAfter: now.Add(lifetime),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if !is.expiry.IsZero() && tmpl.NotAfter.After(is.expiry) {
		tmpl.NotAfter = is.expiry
	}
	pub := csr.PublicKey
	resp := &netmap.CertResponse{CA: is.ca.cert.Raw}
	if is.tamper != nil {
		is.tamper(tmpl, &pub, resp)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, is.ca.cert, pub, is.ca.key)
	if err != nil {
		return nil, err
	}
	resp.Cert = der
	return resp, nil
}

func selfWith(ca *testCA, name string) Self {
	return Self{Name: name, Suffix: testSuffix, CA: ca.cert.Raw,
		Addrs: []netip.Addr{netip.MustParseAddr("100.64.0.7"), netip.MustParseAddr("fd5e:5a1e:d::6440:7")}}
}

func TestCheckCA(t *testing.T) {
	for _, tt := range []struct {
		name string
		mod  func(*x509.Certificate)
		want string // "" accepts
	}{
		{"the coordinator's kind", nil, ""},
		{"no constraints", func(c *x509.Certificate) {
			c.PermittedDNSDomainsCritical, c.PermittedDNSDomains, c.PermittedIPRanges = false, nil, nil
		}, "missing or not critical"},
		{"not critical", func(c *x509.Certificate) { c.PermittedDNSDomainsCritical = false }, "missing or not critical"},
		{"another suffix", func(c *x509.Certificate) { c.PermittedDNSDomains = []string{"other.internal"} }, "want exactly"},
		{"a public domain too", func(c *x509.Certificate) { c.PermittedDNSDomains = append(c.PermittedDNSDomains, "example.com") }, "want exactly"},
		{"every address", func(c *x509.Certificate) { c.PermittedIPRanges = nil }, "every IP address"},
		{"a public range", func(c *x509.Certificate) {
			c.PermittedIPRanges = append(c.PermittedIPRanges, ipNet(netip.MustParsePrefix("8.8.8.0/24")))
		}, "outside the tailnet"},
		{"wider than the tailnet", func(c *x509.Certificate) {
			c.PermittedIPRanges = []*net.IPNet{ipNet(netip.MustParsePrefix("100.0.0.0/8"))}
		}, "outside the tailnet"},
		{"every e-mail address", func(c *x509.Certificate) { c.PermittedEmailAddresses = nil }, "e-mail"},
		{"a real mail domain", func(c *x509.Certificate) { c.PermittedEmailAddresses = []string{"example.com"} }, "e-mail"},
		{"may sign CAs", func(c *x509.Certificate) { c.MaxPathLenZero, c.MaxPathLen = false, -1 }, "path length 0"},
		{"not a CA", func(c *x509.Certificate) { c.IsCA = false; c.MaxPathLenZero = false }, "not a CA"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ca := newTestCA(t, tt.mod)
			_, err := CheckCA(ca.cert.Raw, testSuffix)
			switch {
			case tt.want == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Fatalf("error %v, want one saying %q", err, tt.want)
			}
		})
	}
}

// TestCertificateFetchedStoredReused: the first request fetches a
// certificate for a key made here, stores it (0600), and later requests,
// and a new manager on the same dir, use it without asking again; a new
// name or CA makes the manager ask again.
func TestCertificateFetchedStoredReused(t *testing.T) {
	dir := t.TempDir()
	ca := newTestCA(t, nil)
	is := &issuer{ca: ca}
	m := New(dir, nil)
	m.SetSelf(selfWith(ca, testName))
	if _, err := m.Certificate(t.Context()); err == nil || !strings.Contains(err.Error(), "not connected") {
		t.Fatalf("without an issuer: %v", err)
	}
	m.SetIssuer(is)
	c, err := m.Certificate(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if c.Leaf.DNSNames[0] != testName || len(c.Leaf.IPAddresses) != 2 {
		t.Errorf("names %q %v", c.Leaf.DNSNames, c.Leaf.IPAddresses)
	}
	if c2, _ := m.Certificate(t.Context()); c2 != c || is.count() != 1 {
		t.Fatalf("second request: fetched again (%d requests)", is.count())
	}
	fi, err := os.Stat(filepath.Join(dir, PairFile))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("stored pair: %v %v", fi, err)
	}
	if fi, err := os.Stat(filepath.Join(dir, CAFile)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("stored CA: %v", err)
	}

	m2 := New(dir, nil)
	m2.SetSelf(selfWith(ca, testName))
	m2.SetIssuer(is)
	c3, err := m2.Certificate(t.Context())
	if err != nil || !bytes.Equal(c3.Certificate[0], c.Certificate[0]) || is.count() != 1 {
		t.Fatalf("after a restart: %v, %d requests", err, is.count())
	}

	m2.SetSelf(selfWith(ca, "gpu-9."+testSuffix)) // renamed
	c4, err := m2.Certificate(t.Context())
	if err != nil || c4.Leaf.DNSNames[0] != "gpu-9."+testSuffix || is.count() != 2 {
		t.Fatalf("after a rename: %v, %d requests", err, is.count())
	}
	ca2 := newTestCA(t, nil)
	is.ca = ca2
	m2.SetSelf(selfWith(ca2, "gpu-9."+testSuffix)) // --new-ca
	if _, err := m2.Certificate(t.Context()); err != nil || is.count() != 3 {
		t.Fatalf("after a new CA: %v, %d requests", err, is.count())
	}
}

// TestGetCertificateNames: a TLS server is given the node's certificate
// for its own name (any case, with or without the trailing dot) or no
// name, and nothing for another name.
func TestGetCertificateNames(t *testing.T) {
	ca := newTestCA(t, nil)
	m := New(t.TempDir(), nil)
	m.SetSelf(selfWith(ca, testName))
	m.SetIssuer(&issuer{ca: ca})
	for _, tt := range []struct {
		sni string
		ok  bool
	}{
		{testName, true}, {"GPU-1.Meshd.Internal.", true}, {"", true},
		{"gpu-2." + testSuffix, false}, {"example.com", false}, {"gpu-1." + testSuffix + ".example.com", false},
	} {
		c, err := m.GetCertificate(&tls.ClientHelloInfo{ServerName: tt.sni})
		if (err == nil) != tt.ok || tt.ok && c == nil {
			t.Errorf("server name %q: %v", tt.sni, err)
		}
	}
}

// TestIssuedCertificateChecked: an answer that is not a certificate for
// the node's key and name under the map's CA is refused and not stored.
func TestIssuedCertificateChecked(t *testing.T) {
	ca, other := newTestCA(t, nil), newTestCA(t, nil)
	otherKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	for _, tt := range []struct {
		name   string
		tamper func(*x509.Certificate, *any, *netmap.CertResponse)
		want   string
	}{
		{"another key", func(_ *x509.Certificate, pub *any, _ *netmap.CertResponse) { *pub = otherKey.Public() }, "another key"},
		{"another name", func(c *x509.Certificate, _ *any, _ *netmap.CertResponse) {
			c.DNSNames = []string{"gpu-2." + testSuffix}
		}, "does not verify"},
		{"expired", func(c *x509.Certificate, _ *any, _ *netmap.CertResponse) { c.NotAfter = time.Now().Add(-time.Minute) }, "does not verify"},
		{"client certificate", func(c *x509.Certificate, _ *any, _ *netmap.CertResponse) {
			c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
		}, "does not verify"},
		{"another CA named", func(_ *x509.Certificate, _ *any, r *netmap.CertResponse) { r.CA = other.cert.Raw }, "other than the one in the network map"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			m := New(dir, nil)
			m.SetSelf(selfWith(ca, testName))
			m.SetIssuer(&issuer{ca: ca, tamper: tt.tamper})
			_, err := m.Certificate(t.Context())
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %v, want %q", err, tt.want)
			}
			if _, err := os.Stat(filepath.Join(dir, PairFile)); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("stored a refused certificate: %v", err)
			}
		})
	}
}

// TestUnconstrainedCARefused: a map whose CA could vouch for public names
// gives no certificate and writes no CA file.
func TestUnconstrainedCARefused(t *testing.T) {
	ca := newTestCA(t, func(c *x509.Certificate) { c.PermittedDNSDomainsCritical, c.PermittedDNSDomains = false, nil })
	dir := t.TempDir()
	m := New(dir, nil)
	m.SetSelf(selfWith(ca, testName))
	m.SetIssuer(&issuer{ca: ca})
	if _, err := m.Certificate(t.Context()); err == nil || !strings.Contains(err.Error(), "refusing the coordinator's tailnet CA") {
		t.Fatalf("certificate: %v", err)
	}
	if _, _, err := m.CA(); err == nil {
		t.Error("CA() offers the refused CA")
	}
	if _, err := os.Stat(filepath.Join(dir, CAFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("wrote the refused CA: %v", err)
	}
}

// TestRenewal: Run renews when a third of the lifetime is left, not
// before, keeps serving the old certificate meanwhile, and retries a
// failed renewal after a backoff, not at every handshake.
func TestRenewal(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ca := newTestCA(t, nil)
		is := &issuer{ca: ca}
		m := New(t.TempDir(), nil)
		m.SetSelf(selfWith(ca, testName))
		m.SetIssuer(is)
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		go m.Run(ctx)
		synctest.Wait()
		if is.count() != 0 {
			t.Fatal("Run fetched a certificate nobody asked for")
		}
		first, err := m.Certificate(ctx)
		if err != nil {
			t.Fatal(err)
		}
		renew := renewAt(first.Leaf)
		time.Sleep(time.Until(renew) - time.Second)
		synctest.Wait()
		if is.count() != 1 {
			t.Fatalf("renewed early: %d requests", is.count())
		}
		is.mu.Lock()
		is.err = errors.New("coordinator unreachable")
		is.mu.Unlock()
		time.Sleep(2 * time.Second)
		synctest.Wait()
		if is.count() != 2 {
			t.Fatalf("at the renewal time: %d requests, want 2", is.count())
		}
		for range 20 { // handshakes while renewal fails
			if c, err := m.Certificate(ctx); err != nil || c != first {
				t.Fatalf("the old certificate is not served while renewal fails: %v", err)
			}
		}
		time.Sleep(20 * time.Second)
		synctest.Wait()
		if is.count() != 2 {
			t.Fatalf("retried within 20s of a failure: %d requests", is.count())
		}
		is.mu.Lock()
		is.err = nil
		is.mu.Unlock()
		time.Sleep(time.Minute)
		synctest.Wait()
		c, _ := m.Certificate(ctx)
		if is.count() != 3 || c == first {
			t.Fatalf("after the backoff: %d requests, renewed %v", is.count(), c != first)
		}
		if !c.Leaf.NotAfter.After(first.Leaf.NotAfter) {
			t.Error("the renewed certificate ends no later")
		}
	})
}

// TestNoRenewalPastNodeExpiry: a certificate that already lasts until the
// node key expires is not renewed (a new one could not last longer), so a
// node near its expiry does not ask again and again as the remaining
// lifetime shrinks; a renewed node key makes it renew as usual.
func TestNoRenewalPastNodeExpiry(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ca := newTestCA(t, nil)
		expiry := time.Now().Add(2 * time.Hour)
		is := &issuer{ca: ca, expiry: expiry, limit: 5}
		m := New(t.TempDir(), nil)
		self := selfWith(ca, testName)
		self.KeyExpiry = expiry
		m.SetSelf(self)
		m.SetIssuer(is)
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		go m.Run(ctx)
		c, err := m.Certificate(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if !c.Leaf.NotAfter.Equal(expiry.Truncate(time.Second)) {
			t.Fatalf("not after %v, want the node expiry %v", c.Leaf.NotAfter, expiry)
		}
		time.Sleep(time.Until(expiry) - time.Minute)
		synctest.Wait()
		if is.count() != 1 {
			t.Fatalf("%d requests before the node key expired, want 1", is.count())
		}
		// The node re-authenticated: its key lasts longer now.
		is.mu.Lock()
		is.expiry, is.limit = time.Time{}, 0
		is.mu.Unlock()
		self.KeyExpiry = time.Now().Add(180 * 24 * time.Hour)
		m.SetSelf(self)
		synctest.Wait()
		if c2, _ := m.Certificate(ctx); is.count() != 2 || c2 == c {
			t.Fatalf("after the key was renewed: %d requests", is.count())
		}
	})
}

// TestCorruptPairMovedAside: a stored pair that cannot be read is moved
// aside, never used, and a new certificate replaces it.
func TestCorruptPairMovedAside(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, PairFile), []byte("-----BEGIN PRIVATE KEY-----\nxx\n"), 0o600)
	ca := newTestCA(t, nil)
	m := New(dir, nil)
	aside, _ := filepath.Glob(filepath.Join(dir, PairFile+".corrupt-*"))
	if len(aside) != 1 {
		t.Fatalf("moved aside: %v", aside)
	}
	m.SetSelf(selfWith(ca, testName))
	m.SetIssuer(&issuer{ca: ca})
	if _, err := m.Certificate(t.Context()); err != nil {
		t.Fatal(err)
	}
}

// FuzzParsePair reads arbitrary stored pairs: no panic, and whatever is
// accepted is one certificate with an ECDSA key.
func FuzzParsePair(f *testing.F) {
	ca := newTestCA(f, nil)
	m := New(f.TempDir(), nil)
	m.SetSelf(selfWith(ca, testName))
	m.SetIssuer(&issuer{ca: ca})
	p, err := m.Pair(context.Background())
	if err != nil {
		f.Fatal(err)
	}
	f.Add(append(p.KeyPEM, p.CertPEM...))
	f.Add(p.CertPEM)
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := parsePair(data)
		if err != nil {
			return
		}
		if len(c.Certificate) != 1 || c.Leaf == nil {
			t.Fatalf("accepted %d certificates", len(c.Certificate))
		}
		if _, ok := c.PrivateKey.(*ecdsa.PrivateKey); !ok {
			t.Fatalf("accepted a %T", c.PrivateKey)
		}
	})
}
