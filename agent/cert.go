package agent

import (
	"context"
	"crypto/tls"
	"encoding/pem"
	"fmt"
	"strings"

	"meshd.dev/meshd/agent/localapi"
)

// GetCertificate is a tls.Config.GetCertificate that serves the node's
// certificate for its MagicDNS name, signed by the tailnet CA, to clients
// asking for that name or for none (connecting by address). Any other name
// is refused. The first call fetches the certificate if the node has none
// (the key is made here; the coordinator sees only a request); it is then
// kept in the state dir and renewed while the node is up.
func (a *Agent) GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	return a.certs.GetCertificate(hello)
}

// CertPair returns the node's certificate and private key for name (its
// DNS name, with or without the trailing dot; "" means it), for `meshd
// cert`.
func (a *Agent) CertPair(ctx context.Context, name string) (*localapi.CertPair, error) {
	a.mu.Lock()
	own := ""
	if a.nm != nil {
		own = strings.TrimSuffix(a.nm.Self.DNSName, ".")
	}
	a.mu.Unlock()
	if name != "" && !strings.EqualFold(strings.TrimSuffix(name, "."), own) {
		return nil, fmt.Errorf("cert: this node is %q: it can have a certificate only for its own name, not %q", own, name)
	}
	p, err := a.certs.Pair(ctx)
	if err != nil {
		return nil, err
	}
	return &localapi.CertPair{Name: p.Name, CertPEM: string(p.CertPEM), KeyPEM: string(p.KeyPEM), NotAfter: p.NotAfter}, nil
}

// TailnetCA returns the tailnet CA the node uses, for --cacert and trust
// stores.
func (a *Agent) TailnetCA(context.Context) (*localapi.TailnetCA, error) {
	ca, suffix, err := a.certs.CA()
	if err != nil {
		return nil, fmt.Errorf("tailnet CA: %w", err)
	}
	return &localapi.TailnetCA{Suffix: suffix, CertPEM: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Raw}))}, nil
}
