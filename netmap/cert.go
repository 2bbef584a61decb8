package netmap

import (
	"crypto/x509"
	"errors"
	"fmt"
	"net/netip"
)

// The tailnet's address ranges: every node address the coordinator hands
// out is inside one of them (control.IPv4Pool and control.IPv6Pool), and
// the tailnet CA's name constraints permit exactly these.
var (
	TailnetIPv4 = netip.MustParsePrefix("100.64.0.0/10")
	TailnetIPv6 = netip.MustParsePrefix("fd5e:5a1e:d::/48")
)

// MaxCertSize bounds a DER certificate or certificate request on the wire:
// ours are well under 1 KiB (ECDSA P-256, a few names).
const MaxCertSize = 8 << 10

// CertRequest asks the coordinator to sign a TLS server certificate for the
// calling node's own DNS name (POST /machine/cert, authenticated by the
// machine key like every machine request). The node generates the key pair
// and sends only a PKCS#10 request, so the private key never leaves it.
type CertRequest struct {
	Version int `json:"version"`
	// CSR is the DER PKCS#10 certificate request: an ECDSA P-256 key, the
	// node's DNS name (without the trailing dot) as its one DNS name, and
	// optionally some of the node's own tailnet addresses.
	CSR []byte `json:"csr"`
}

// CertResponse is the signed certificate.
type CertResponse struct {
	// Cert is the DER leaf certificate.
	Cert []byte `json:"cert"`
	// CA is the DER certificate of the tailnet CA that signed it (the one
	// the map's TLSCA carries).
	CA []byte `json:"ca"`
}

// ParseTLSCA parses the tailnet CA certificate a map carries and checks
// that it is a CA certificate. Whether it is constrained to the tailnet is
// for its user to check (agent/certs.CheckCA), against the suffix it
// expects.
func ParseTLSCA(der []byte) (*x509.Certificate, error) {
	if len(der) > MaxCertSize {
		return nil, fmt.Errorf("tls ca: %d bytes, at most %d", len(der), MaxCertSize)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("tls ca: %w", err)
	}
	if !c.BasicConstraintsValid || !c.IsCA {
		return nil, errors.New("tls ca: not a CA certificate")
	}
	return c, nil
}
