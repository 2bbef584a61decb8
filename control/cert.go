package control

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"encoding/asn1"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
)

// A node may ask for certBurst certificates at once and one more every
// certEvery: a node renews about every nine days and keeps its certificate
// across restarts, so only a node that lost its state dir or changed its
// name asks twice in a row.
const (
	certBurst = 8
	certEvery = 15 * time.Minute
)

// nodeLimiter rate-limits one kind of request per node: burst at once
// and one more every every.
type nodeLimiter struct {
	every time.Duration
	burst int

	mu sync.Mutex
	by map[netmap.NodeID]*rate.Limiter
}

func (l *nodeLimiter) allow(id netmap.NodeID, now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.by == nil {
		l.by = make(map[netmap.NodeID]*rate.Limiter)
	}
	lim := l.by[id]
	if lim == nil {
		lim = rate.NewLimiter(rate.Every(l.every), l.burst)
		l.by[id] = lim
	}
	return lim.AllowN(now, 1)
}

// oidSubjectAltName is the one extension a certificate request may ask for.
var oidSubjectAltName = asn1.ObjectIdentifier{2, 5, 29, 17}

// checkCSR parses a node's certificate request and checks that it asks for
// exactly what the node may have: an ECDSA P-256 key it holds (the
// request's signature), name (the node's DNS name without the trailing
// dot) as the only DNS name and, if a common name is given, as that, and
// only addresses from own. It returns the request and the addresses it
// names. Everything else in a request is refused rather than ignored, so
// that no node believes it got what it did not.
func checkCSR(der []byte, name string, own []netip.Addr) (*x509.CertificateRequest, []netip.Addr, error) {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: certificate request: %s", controlclient.ErrBadRequest, fmt.Sprintf(format, args...))
	}
	if len(der) == 0 {
		return nil, nil, bad("csr is missing")
	}
	if len(der) > netmap.MaxCertSize {
		return nil, nil, bad("%d bytes, at most %d", len(der), netmap.MaxCertSize)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, nil, bad("%v", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, nil, bad("signature: %v (the request must be signed with the key it certifies)", err)
	}
	pub, ok := csr.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		return nil, nil, bad("the key is a %T, want ECDSA P-256", csr.PublicKey)
	}
	if len(csr.DNSNames) != 1 || !sameName(csr.DNSNames[0], name) {
		return nil, nil, bad("asks for the DNS names %q: a node may have a certificate only for its own name %q", csr.DNSNames, name)
	}
	if cn := csr.Subject.CommonName; cn != "" && !sameName(cn, name) {
		return nil, nil, bad("common name %q is not the node's name %q", cn, name)
	}
	if len(csr.Subject.Names) > 1 || len(csr.Subject.Names) == 1 && csr.Subject.CommonName == "" {
		return nil, nil, bad("the subject may hold only the common name %q, not %q", name, csr.Subject.String())
	}
	if len(csr.EmailAddresses) > 0 || len(csr.URIs) > 0 {
		return nil, nil, bad("asks for e-mail addresses or URIs (%q, %q): only the node's DNS name and addresses", csr.EmailAddresses, csr.URIs)
	}
	for _, ext := range csr.Extensions {
		if !ext.Id.Equal(oidSubjectAltName) {
			return nil, nil, bad("asks for extension %v: the coordinator decides a certificate's extensions", ext.Id)
		}
	}
	var ips []netip.Addr
	for _, raw := range csr.IPAddresses {
		ip, ok := netip.AddrFromSlice(raw)
		ip = ip.Unmap()
		if !ok || !slices.Contains(own, ip) {
			return nil, nil, bad("asks for the address %v, which is not the node's (%v)", raw, own)
		}
		if slices.Contains(ips, ip) {
			return nil, nil, bad("names the address %v twice", ip)
		}
		ips = append(ips, ip)
	}
	return csr, ips, nil
}

// sameName compares DNS names as DNS does: without case and the trailing
// dot.
func sameName(got, want string) bool {
	return strings.EqualFold(strings.TrimSuffix(got, "."), want)
}

// issueCert signs a TLS certificate for the node of machine mk, for its
// current DNS name only, valid for the certificate lifetime but never
// past the node key's expiry.
func (s *Server) issueCert(ctx context.Context, mk netmap.MachinePublic, req netmap.CertRequest) (*netmap.CertResponse, error) {
	if err := checkVersion(req.Version); err != nil {
		return nil, err
	}
	n, err := s.nodeForMap(ctx, mk)
	if err != nil {
		return nil, err
	}
	now := s.now()
	if !s.visible(n, now) {
		return nil, fmt.Errorf("%w: node %d is not in the tailnet (it holds no proven node key): run meshd up", controlclient.ErrNotAuthorized, n.ID)
	}
	if !s.certLimit.allow(n.ID, now) {
		return nil, fmt.Errorf("%w: node %d asked for more than %d certificates recently (one more every %v): keep the certificate the daemon stores and renews",
			controlclient.ErrRateLimited, n.ID, certBurst, certEvery)
	}
	name := strings.TrimSuffix(netmap.DNSName(n.Hostname, s.opts.DNS.Suffix), ".")
	csr, ips, err := checkCSR(req.CSR, name, netmap.AddrsOf(n.Addresses))
	if err != nil {
		s.log.Warn("refused a certificate request", "node", n.ID, "name", name, "err", err)
		return nil, err
	}
	notAfter := now.Add(s.certLifetime)
	if !n.KeyExpiry.IsZero() {
		// A certificate must not outlive the node's membership.
		notAfter = earlier(notAfter, n.KeyExpiry)
	}
	der, err := s.ca.sign(csr.PublicKey.(*ecdsa.PublicKey), name, ips, now.Add(-certBackdate), notAfter)
	if err != nil {
		return nil, err
	}
	s.log.Info("issued a TLS certificate", "node", n.ID, "name", name, "ips", ips, "not_after", notAfter.UTC().Format(time.RFC3339))
	return &netmap.CertResponse{Cert: der, CA: s.ca.cert.Raw}, nil
}

// TLSCA returns the tailnet CA certificate: nodes' TLS certificates chain
// to it, and it is constrained to the DNS suffix and the tailnet's
// addresses.
func (s *Server) TLSCA() *x509.Certificate { return s.ca.cert }

// TLSCAPath is where the tailnet CA certificate is (PEM).
func (s *Server) TLSCAPath() string { return filepath.Join(s.opts.StateDir, caCertFile) }
