package control

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/json"
	"encoding/pem"
	"errors"
	"maps"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
)

// csrFor is a certificate request for key (a new P-256 key if nil) with
// the DNS names, common name and addresses of tmpl.
func csrFor(t testing.TB, key crypto.Signer, tmpl x509.CertificateRequest) []byte {
	t.Helper()
	if key == nil {
		var err error
		if key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
			t.Fatal(err)
		}
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func ownName(n *testNode) string { return strings.TrimSuffix(n.self.DNSName, ".") }

func ownIPs(n *testNode) []net.IP {
	var ips []net.IP
	for _, a := range netmap.AddrsOf(n.self.Addresses) {
		ips = append(ips, a.AsSlice())
	}
	return ips
}

// TestCertForOwnName: a node learns the CA from its map, and a request for
// its own name and addresses gets a certificate that verifies against that
// CA for the name, for a server, for the default lifetime, with the key
// the node holds.
func TestCertForOwnName(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	k := ts.key(t, AuthKeyOptions{Tags: []string{"tag:web"}})
	n := newTestNode(t, ts.url, "")
	n.mustRegister(t, k, "web-1")
	n.follow(t, n.mapRequest())
	m := n.waitMap(t, "a map", func(*netmap.NetworkMap) bool { return true })
	if !bytes.Equal(m.TLSCA, ts.TLSCA().Raw) {
		t.Fatalf("map tls_ca is not the coordinator's CA (%d bytes)", len(m.TLSCA))
	}
	ca, err := netmap.ParseTLSCA(m.TLSCA)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	name := ownName(n)
	if name != "web-1."+netmap.DefaultDNSSuffix {
		t.Fatalf("node name %q", name)
	}
	resp, err := n.c.Cert(t.Context(), netmap.CertRequest{CSR: csrFor(t, key, x509.CertificateRequest{
		Subject: pkix.Name{CommonName: name}, DNSNames: []string{name}, IPAddresses: ownIPs(n),
	})})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(resp.CA, m.TLSCA) {
		t.Error("the answer's CA is not the map's")
	}
	leaf, err := x509.ParseCertificate(resp.Cert)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	for _, host := range append([]string{name, strings.ToUpper(name)}, netmap.AddrsOf(n.self.Addresses)[0].String()) {
		if _, err := leaf.Verify(x509.VerifyOptions{DNSName: host, Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
			t.Errorf("verify for %s: %v", host, err)
		}
	}
	if !key.PublicKey.Equal(leaf.PublicKey) {
		t.Error("the certificate is not for the node's key")
	}
	if !slices.Equal(leaf.DNSNames, []string{name}) || len(leaf.IPAddresses) != 2 || leaf.IsCA {
		t.Errorf("names %q ips %v ca %v", leaf.DNSNames, leaf.IPAddresses, leaf.IsCA)
	}
	if life := leaf.NotAfter.Sub(leaf.NotBefore); life != DefaultCertLifetime+certBackdate {
		t.Errorf("lifetime %v, want %v", life, DefaultCertLifetime+certBackdate)
	}
}

// TestCertNotPastNodeExpiry: a user node's certificate ends when its node
// key does, so it never outlives the node's membership.
func TestCertNotPastNodeExpiry(t *testing.T) {
	ts := startServer(t, ServerOptions{NodeKeyExpiry: 2 * time.Hour})
	n := newTestNode(t, ts.url, "")
	n.mustRegister(t, ts.key(t, AuthKeyOptions{User: "alice@example.com"}), "laptop")
	resp, err := n.c.Cert(t.Context(), netmap.CertRequest{CSR: csrFor(t, nil, x509.CertificateRequest{DNSNames: []string{ownName(n)}})})
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(resp.Cert)
	if !leaf.NotAfter.Equal(n.self.KeyExpiry.Truncate(time.Second)) {
		t.Errorf("not after %v, node key expiry %v", leaf.NotAfter, n.self.KeyExpiry)
	}
}

// TestCertRequestRefused: what a node with only its own machine key can
// ask for and must not get. Every refusal is a bad request naming the
// problem, and issues nothing.
func TestCertRequestRefused(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	k := ts.key(t, AuthKeyOptions{Tags: []string{"tag:x"}, Reusable: true})
	other := newTestNode(t, ts.url, "")
	other.mustRegister(t, k, "other")
	otherName := ownName(other)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	caExt, _ := asn1.Marshal(struct {
		IsCA bool `asn1:"optional"`
	}{true})
	tamper := func(der []byte) []byte {
		der = slices.Clone(der)
		der[len(der)-3] ^= 0x55 // inside the signature
		return der
	}
	tests := []struct {
		name string
		csr  func(n *testNode) []byte
		want string
	}{
		{"another node's name", func(n *testNode) []byte {
			return csrFor(t, nil, x509.CertificateRequest{DNSNames: []string{otherName}})
		}, "only for its own name"},
		{"wildcard", func(n *testNode) []byte {
			return csrFor(t, nil, x509.CertificateRequest{DNSNames: []string{"*." + netmap.DefaultDNSSuffix}})
		}, "only for its own name"},
		{"extra name", func(n *testNode) []byte {
			return csrFor(t, nil, x509.CertificateRequest{DNSNames: []string{ownName(n), otherName}})
		}, "only for its own name"},
		{"public name", func(n *testNode) []byte {
			return csrFor(t, nil, x509.CertificateRequest{DNSNames: []string{"www.example.com"}})
		}, "only for its own name"},
		{"no name", func(n *testNode) []byte {
			return csrFor(t, nil, x509.CertificateRequest{IPAddresses: ownIPs(n)})
		}, "only for its own name"},
		{"another node's address", func(n *testNode) []byte {
			return csrFor(t, nil, x509.CertificateRequest{DNSNames: []string{ownName(n)}, IPAddresses: ownIPs(other)})
		}, "not the node's"},
		{"public address", func(n *testNode) []byte {
			return csrFor(t, nil, x509.CertificateRequest{DNSNames: []string{ownName(n)}, IPAddresses: []net.IP{net.ParseIP("8.8.8.8")}})
		}, "not the node's"},
		{"common name of another", func(n *testNode) []byte {
			return csrFor(t, nil, x509.CertificateRequest{Subject: pkix.Name{CommonName: "example.com"}, DNSNames: []string{ownName(n)}})
		}, "common name"},
		{"organization", func(n *testNode) []byte {
			return csrFor(t, nil, x509.CertificateRequest{Subject: pkix.Name{CommonName: ownName(n), Organization: []string{"Google LLC"}}, DNSNames: []string{ownName(n)}})
		}, "only the common name"},
		{"e-mail address", func(n *testNode) []byte {
			return csrFor(t, nil, x509.CertificateRequest{DNSNames: []string{ownName(n)}, EmailAddresses: []string{"ceo@example.com"}})
		}, "e-mail"},
		{"uri", func(n *testNode) []byte {
			u, _ := url.Parse("spiffe://example.com/admin")
			return csrFor(t, nil, x509.CertificateRequest{DNSNames: []string{ownName(n)}, URIs: []*url.URL{u}})
		}, "URIs"},
		{"asks to be a CA", func(n *testNode) []byte {
			return csrFor(t, nil, x509.CertificateRequest{DNSNames: []string{ownName(n)},
				ExtraExtensions: []pkix.Extension{{Id: asn1.ObjectIdentifier{2, 5, 29, 19}, Critical: true, Value: caExt}}})
		}, "extension 2.5.29.19"},
		{"bad signature", func(n *testNode) []byte {
			return tamper(csrFor(t, nil, x509.CertificateRequest{DNSNames: []string{ownName(n)}}))
		}, "signature"},
		{"P-384 key", func(n *testNode) []byte {
			return csrFor(t, p384, x509.CertificateRequest{DNSNames: []string{ownName(n)}})
		}, "want ECDSA P-256"},
		{"Ed25519 key", func(n *testNode) []byte {
			_, ek, _ := ed25519.GenerateKey(rand.Reader)
			return csrFor(t, ek, x509.CertificateRequest{DNSNames: []string{ownName(n)}})
		}, "want ECDSA P-256"},
		{"not a request", func(*testNode) []byte { return []byte("certainly not DER") }, "certificate request"},
		{"empty", func(*testNode) []byte { return nil }, "csr is missing"},
		{"huge", func(*testNode) []byte { return make([]byte, netmap.MaxCertSize+1) }, "at most"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := newTestNode(t, ts.url, "")
			n.mustRegister(t, k, "n")
			_, err := n.c.Cert(t.Context(), netmap.CertRequest{CSR: tt.csr(n)})
			wantErr(t, err, controlclient.ErrBadRequest)
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not say %q", err, tt.want)
			}
		})
	}
}

// TestCertRefusedToNodesOutsideTheTailnet: an unknown machine key, a node
// waiting for approval, an expired node and a deleted one get nothing,
// even for what would be their own name.
func TestCertRefusedToNodesOutsideTheTailnet(t *testing.T) {
	ts := startServer(t, ServerOptions{RequireApproval: true})
	pre := ts.key(t, AuthKeyOptions{Tags: []string{"tag:x"}, Reusable: true, Preauthorized: true})
	csr := func(name string) netmap.CertRequest {
		return netmap.CertRequest{CSR: csrFor(t, nil, x509.CertificateRequest{DNSNames: []string{name + "." + netmap.DefaultDNSSuffix}})}
	}
	t.Run("unregistered machine", func(t *testing.T) {
		n := newTestNode(t, ts.url, ts.Fingerprint())
		_, err := n.c.Cert(t.Context(), csr("stranger"))
		wantErr(t, err, controlclient.ErrNotRegistered)
	})
	t.Run("waiting for approval", func(t *testing.T) {
		n := newTestNode(t, ts.url, "")
		n.mustRegister(t, ts.key(t, AuthKeyOptions{Tags: []string{"tag:x"}}), "pending")
		_, err := n.c.Cert(t.Context(), csr("pending"))
		wantErr(t, err, controlclient.ErrNotAuthorized)
	})
	t.Run("expired", func(t *testing.T) {
		n := newTestNode(t, ts.url, "")
		n.mustRegister(t, pre, "expired")
		if err := ts.ExpireNode(t.Context(), n.id); err != nil {
			t.Fatal(err)
		}
		_, err := n.c.Cert(t.Context(), csr("expired"))
		wantErr(t, err, controlclient.ErrNodeExpired)
	})
	t.Run("deleted", func(t *testing.T) {
		n := newTestNode(t, ts.url, "")
		n.mustRegister(t, pre, "deleted")
		if err := ts.DeleteNode(t.Context(), n.id); err != nil {
			t.Fatal(err)
		}
		_, err := n.c.Cert(t.Context(), csr("deleted"))
		wantErr(t, err, controlclient.ErrNotRegistered)
	})
	t.Run("no client certificate", func(t *testing.T) {
		body, _ := json.Marshal(netmap.CertRequest{Version: netmap.ProtocolVersion, CSR: csr("x").CSR})
		hc := &http.Client{Transport: controlclient.PinnedTransport(ts.Fingerprint())}
		defer hc.CloseIdleConnections()
		err := doRaw(t.Context(), hc, ts.url, controlclient.CertPath, body)
		wantErr(t, err, controlclient.ErrBadRequest)
	})
}

// TestCertRateLimited: a node gets certBurst certificates at once and then
// one every certEvery; another node is not affected.
func TestCertRateLimited(t *testing.T) {
	clk := newClock()
	ts := startServer(t, ServerOptions{clock: clk})
	k := ts.key(t, AuthKeyOptions{Tags: []string{"tag:x"}, Reusable: true})
	a, b := newTestNode(t, ts.url, ""), newTestNode(t, ts.url, "")
	a.mustRegister(t, k, "a")
	b.mustRegister(t, k, "b")
	ask := func(n *testNode) error {
		_, err := n.c.Cert(t.Context(), netmap.CertRequest{CSR: csrFor(t, nil, x509.CertificateRequest{DNSNames: []string{ownName(n)}})})
		return err
	}
	for i := range certBurst {
		if err := ask(a); err != nil {
			t.Fatalf("request %d: %v", i+1, err)
		}
	}
	err := ask(a)
	wantErr(t, err, controlclient.ErrRateLimited)
	if err := ask(b); err != nil {
		t.Fatalf("another node limited too: %v", err)
	}
	clk.Advance(certEvery)
	if err := ask(a); err != nil {
		t.Fatalf("after %v: %v", certEvery, err)
	}
	wantErr(t, ask(a), controlclient.ErrRateLimited)
}

// TestCANameConstraints: the CA's name constraints are critical and hold
// even against its own key: a certificate it signs for a public name, a
// public address or a name outside the suffix is refused by Go's verifier
// and by OpenSSL, while one for a node's name passes both.
func TestCANameConstraints(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	ca := ts.ca
	var nc *pkix.Extension
	for i, e := range ca.cert.Extensions {
		if e.Id.Equal(asn1.ObjectIdentifier{2, 5, 29, 30}) {
			nc = &ca.cert.Extensions[i]
		}
	}
	if nc == nil || !nc.Critical {
		t.Fatalf("name constraints extension %+v: want present and critical", nc)
	}
	if ca.cert.MaxPathLen != 0 || !ca.cert.MaxPathLenZero {
		t.Error("the CA may sign intermediate CAs")
	}
	dir := t.TempDir()
	caPEM := filepath.Join(dir, "ca.pem")
	os.WriteFile(caPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.cert.Raw}), 0o600)
	roots := x509.NewCertPool()
	roots.AddCert(ca.cert)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	now := time.Now()
	for _, tt := range []struct {
		name string
		dns  string
		ip   string
		ok   bool
		// more, if set, changes the leaf, which is signed again with the
		// CA's key, as a thief with the key would.
		more func(*x509.Certificate)
	}{
		{"node name", "gpu-1.meshd.internal", "100.64.0.7", true, nil},
		{"public name", "example.com", "", false, nil},
		{"public name with a node name", "gpu-1.meshd.internal", "", false, func(c *x509.Certificate) {
			c.DNSNames = append(c.DNSNames, "www.example.com")
		}},
		{"suffix look-alike", "evilmeshd.internal", "", false, nil},
		{"public address", "gpu-1.meshd.internal", "8.8.8.8", false, nil},
		{"address outside the IPv6 range", "gpu-1.meshd.internal", "2001:db8::1", false, nil},
		{"e-mail name", "gpu-1.meshd.internal", "", false, func(c *x509.Certificate) {
			c.EmailAddresses = []string{"ceo@example.com"}
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var ips []netip.Addr
			if tt.ip != "" {
				ips = append(ips, netip.MustParseAddr(tt.ip))
			}
			der, err := ca.sign(&key.PublicKey, tt.dns, ips, now.Add(-time.Minute), now.Add(time.Hour))
			if err != nil {
				t.Fatal(err)
			}
			if tt.more != nil {
				leaf, _ := x509.ParseCertificate(der)
				tt.more(leaf)
				if der, err = x509.CreateCertificate(rand.Reader, leaf, ca.cert, &key.PublicKey, ca.key); err != nil {
					t.Fatal(err)
				}
			}
			leaf, _ := x509.ParseCertificate(der)
			_, err = leaf.Verify(x509.VerifyOptions{DNSName: tt.dns, Roots: roots})
			var inv x509.CertificateInvalidError
			switch {
			case tt.ok && err != nil:
				t.Errorf("Go refuses: %v", err)
			case !tt.ok && (!errors.As(err, &inv) || inv.Reason != x509.CANotAuthorizedForThisName):
				t.Errorf("Go: %v, want CANotAuthorizedForThisName", err)
			}
			leafPEM := filepath.Join(dir, "leaf.pem")
			os.WriteFile(leafPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
			out, err := exec.Command("openssl", "verify", "-CAfile", caPEM, leafPEM).CombinedOutput()
			switch {
			case tt.ok && err != nil:
				t.Errorf("openssl refuses: %v\n%s", err, out)
			case !tt.ok && (err == nil || !strings.Contains(string(out), "subtree violation")):
				t.Errorf("openssl: %v, want a subtree violation:\n%s", err, out)
			}
		})
	}
}

// TestCACannotMakeSubCAs: an intermediate CA signed with the tailnet CA's
// key (as a thief could make, to escape the path length) is refused with
// whatever it signs, even for a node's name, by Go and by OpenSSL.
func TestCACannotMakeSubCAs(t *testing.T) {
	ca := startServer(t, ServerOptions{}).ca
	now := time.Now()
	subKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	subTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "sub"},
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(time.Hour),
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true,
	}
	subDER, err := x509.CreateCertificate(rand.Reader, subTmpl, ca.cert, &subKey.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	sub, _ := x509.ParseCertificate(subDER)
	leafKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leafDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(3), DNSNames: []string{"gpu-1.meshd.internal"},
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, sub, &leafKey.PublicKey, subKey)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(leafDER)
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(ca.cert)
	inter.AddCert(sub)
	if _, err := leaf.Verify(x509.VerifyOptions{DNSName: "gpu-1.meshd.internal", Roots: roots, Intermediates: inter}); err == nil {
		t.Error("Go accepts a leaf under a sub-CA")
	}
	dir := t.TempDir()
	write := func(name string, der []byte) string {
		p := filepath.Join(dir, name)
		os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
		return p
	}
	out, err := exec.Command("openssl", "verify", "-CAfile", write("ca.pem", ca.cert.Raw), "-untrusted", write("sub.pem", subDER), write("leaf.pem", leafDER)).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "path length") {
		t.Errorf("openssl: %v, want a path length error:\n%s", err, out)
	}
}

// TestCAKeptAcrossRestarts: the CA is made once, 0600, and a restarted
// coordinator serves the same one.
func TestCAKeptAcrossRestarts(t *testing.T) {
	dir := t.TempDir()
	ts := startServer(t, ServerOptions{StateDir: dir})
	first := ts.TLSCA().Raw
	ts.stop(t)
	for _, f := range []string{caKeyFile, caCertFile} {
		fi, err := os.Stat(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s mode %v, want 0600", f, fi.Mode().Perm())
		}
	}
	ts = startServer(t, ServerOptions{StateDir: dir})
	if !bytes.Equal(ts.TLSCA().Raw, first) {
		t.Error("a restart made a new CA")
	}
	if err := ts.ca.checkFor(netmap.DefaultDNSSuffix, time.Now()); err != nil {
		t.Error(err)
	}
}

// TestCAStateRefusals: a CA the database records that is missing,
// incomplete, damaged, replaced or made for another DNS suffix stops the
// start with what to do, and writes nothing; --new-ca then makes a new
// one and keeps the old files.
func TestCAStateRefusals(t *testing.T) {
	otherDir := t.TempDir()
	startServer(t, ServerOptions{StateDir: otherDir}).stop(t)
	for _, tt := range []struct {
		name   string
		damage func(t *testing.T, dir string)
		dns    netmap.DNSConfig
		want   string
	}{
		{"both files missing", func(t *testing.T, dir string) { removeFiles(t, dir, caKeyFile, caCertFile) }, netmap.DNSConfig{}, "is missing, but the database records one"},
		{"key missing", func(t *testing.T, dir string) { removeFiles(t, dir, caKeyFile) }, netmap.DNSConfig{}, "incomplete"},
		{"certificate missing", func(t *testing.T, dir string) { removeFiles(t, dir, caCertFile) }, netmap.DNSConfig{}, "incomplete"},
		{"key damaged", func(t *testing.T, dir string) {
			os.WriteFile(filepath.Join(dir, caKeyFile), []byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"), 0o600)
		}, netmap.DNSConfig{}, "unusable"},
		{"key of another CA", func(t *testing.T, dir string) {
			copyFile(t, filepath.Join(otherDir, caKeyFile), filepath.Join(dir, caKeyFile))
		}, netmap.DNSConfig{}, "is not the CA certificate of"},
		{"both replaced", func(t *testing.T, dir string) {
			copyFile(t, filepath.Join(otherDir, caKeyFile), filepath.Join(dir, caKeyFile))
			copyFile(t, filepath.Join(otherDir, caCertFile), filepath.Join(dir, caCertFile))
		}, netmap.DNSConfig{}, "is not the tailnet CA the database records"},
		{"dns suffix changed", func(*testing.T, string) {}, netmap.DNSConfig{Suffix: "fleet.internal"}, `constrained to the DNS names ["meshd.internal"], but the DNS suffix is "fleet.internal"`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			startServer(t, ServerOptions{StateDir: dir}).stop(t)
			tt.damage(t, dir)
			before := dirContents(t, dir)
			_, err := NewServer(t.Context(), ServerOptions{StateDir: dir, DNS: tt.dns, Logger: testLogger(t)})
			var se *StateError
			if !errors.As(err, &se) || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), "--new-ca") {
				t.Fatalf("start: %v\nwant a refusal saying %q and --new-ca", err, tt.want)
			}
			if after := dirContents(t, dir); !maps.Equal(before, after) {
				t.Errorf("a refused start changed the state dir:\nbefore %v\nafter  %v", slices.Sorted(maps.Keys(before)), slices.Sorted(maps.Keys(after)))
			}
			ts := startServer(t, ServerOptions{StateDir: dir, DNS: tt.dns, NewCA: true})
			suffix := tt.dns.Suffix
			if suffix == "" {
				suffix = netmap.DefaultDNSSuffix
			}
			if err := ts.ca.checkFor(suffix, time.Now()); err != nil {
				t.Errorf("--new-ca: %v", err)
			}
			ts.stop(t)
			if aside, _ := filepath.Glob(filepath.Join(dir, "ca.*.replaced-*")); len(aside) == 0 && tt.name != "both files missing" {
				t.Error("--new-ca kept no copy of the old files")
			}
			// And the new CA is the recorded one from now on.
			startServer(t, ServerOptions{StateDir: dir, DNS: tt.dns}).stop(t)
		})
	}
}

// TestCAAdoptedOrCreated: a database that records no CA (a build from
// before the CA, or re-initialised with --init-state) adopts the CA files
// the hosts trust, or gets a new CA if there are none; --new-ca with no CA
// at all changes nothing and says so.
func TestCAAdoptedOrCreated(t *testing.T) {
	dir := t.TempDir()
	ts := startServer(t, ServerOptions{StateDir: dir})
	first := ts.TLSCA().Raw
	if err := ts.store.SetMeta(t.Context(), metaCA, ""); err != nil { // as before the CA
		t.Fatal(err)
	}
	ts.stop(t)
	ts = startServer(t, ServerOptions{StateDir: dir})
	if !bytes.Equal(ts.TLSCA().Raw, first) {
		t.Fatal("the CA files were not adopted")
	}
	if err := ts.store.SetMeta(t.Context(), metaCA, ""); err != nil {
		t.Fatal(err)
	}
	ts.stop(t)
	removeFiles(t, dir, caKeyFile, caCertFile)
	ts = startServer(t, ServerOptions{StateDir: dir})
	if bytes.Equal(ts.TLSCA().Raw, first) {
		t.Fatal("no new CA")
	}
	ts.stop(t)

	_, err := NewServer(t.Context(), ServerOptions{StateDir: t.TempDir(), NewCA: true, Logger: testLogger(t)})
	if err == nil || !strings.Contains(err.Error(), "no tailnet CA to replace") {
		t.Errorf("--new-ca on a first start: %v", err)
	}
}

func removeFiles(t *testing.T, dir string, names ...string) {
	t.Helper()
	for _, n := range names {
		if err := os.Remove(filepath.Join(dir, n)); err != nil {
			t.Fatal(err)
		}
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// dirContents maps each file of dir to its contents.
func dirContents(t *testing.T, dir string) map[string]string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, e := range ents {
		b, _ := os.ReadFile(filepath.Join(dir, e.Name()))
		m[e.Name()] = string(b)
	}
	return m
}

// FuzzCheckCSR feeds arbitrary bytes to the certificate request check:
// nothing panics, and whatever it accepts asks for exactly the node's name
// and some of its addresses, with a P-256 key that signed the request.
func FuzzCheckCSR(f *testing.F) {
	const name = "gpu-1.meshd.internal"
	own := []netip.Addr{netip.MustParseAddr("100.64.0.7"), netip.MustParseAddr("fd5e:5a1e:d::6440:7")}
	f.Add(csrFor(f, nil, x509.CertificateRequest{DNSNames: []string{name}}))
	f.Add(csrFor(f, nil, x509.CertificateRequest{DNSNames: []string{name}, IPAddresses: []net.IP{net.ParseIP("100.64.0.7")}}))
	f.Add(csrFor(f, nil, x509.CertificateRequest{DNSNames: []string{"gpu-2.meshd.internal"}}))
	f.Add([]byte{0x30, 0x03, 0x02, 0x01, 0x00})
	f.Fuzz(func(t *testing.T, der []byte) {
		csr, ips, err := checkCSR(der, name, own)
		if err != nil {
			if !errors.Is(err, controlclient.ErrBadRequest) {
				t.Fatalf("refusal %v is not a bad request", err)
			}
			return
		}
		if len(csr.DNSNames) != 1 || !sameName(csr.DNSNames[0], name) || csr.CheckSignature() != nil {
			t.Fatalf("accepted names %q", csr.DNSNames)
		}
		if pub, ok := csr.PublicKey.(*ecdsa.PublicKey); !ok || pub.Curve != elliptic.P256() {
			t.Fatalf("accepted a %T key", csr.PublicKey)
		}
		for _, ip := range ips {
			if !slices.Contains(own, ip) {
				t.Fatalf("accepted address %v", ip)
			}
		}
	})
}
