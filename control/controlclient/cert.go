package controlclient

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	"meshd.dev/meshd/netmap"
)

// CertPath is the coordinator endpoint that signs a node's TLS certificate
// for its DNS name.
const CertPath = "/machine/cert"

// ErrNoCertAuthority is a coordinator that signs no certificates (a build
// from before the tailnet CA).
var ErrNoCertAuthority = errors.New("the coordinator runs no certificate authority")

// Cert asks the coordinator to sign req.CSR, a certificate request for
// this node's own DNS name. The coordinator refuses (ErrBadRequest) a
// request for any other name, and rate-limits each node (ErrRateLimited).
func (c *Client) Cert(ctx context.Context, req netmap.CertRequest) (*netmap.CertResponse, error) {
	if req.Version == 0 {
		req.Version = netmap.ProtocolVersion
	}
	var resp netmap.CertResponse
	err := c.do(ctx, CertPath, req, &resp)
	if ae, ok := errors.AsType[*APIError](err); ok && ae.Status == http.StatusNotFound && ae.Code == "" {
		// The route does not exist: ServeMux's plain-text 404.
		err = fmt.Errorf("%w: upgrade the coordinator", ErrNoCertAuthority)
	}
	if err != nil {
		return nil, fmt.Errorf("certificate from %s: %w", c.base().Host, err)
	}
	if len(resp.Cert) == 0 || len(resp.CA) == 0 {
		return nil, fmt.Errorf("certificate from %s: the answer holds no certificate", c.base().Host)
	}
	return &resp, nil
}
