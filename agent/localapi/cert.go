package localapi

import (
	"context"
	"net/http"
	"net/url"
	"time"
)

// CertPair is the node's TLS certificate for its DNS name and its private
// key (PEM), from GET /v0/cert. The key is as secret as the node's other
// keys: the API serves it only to root and the daemon's user, like every
// other call (SO_PEERCRED).
type CertPair struct {
	// Name is the node's DNS name without the trailing dot.
	Name     string    `json:"name"`
	CertPEM  string    `json:"cert_pem"`
	KeyPEM   string    `json:"key_pem"`
	NotAfter time.Time `json:"not_after"`
}

// TailnetCA is the tailnet CA certificate the node trusts its peers'
// certificates by (GET /v0/tailnet-ca).
type TailnetCA struct {
	// Suffix is the DNS suffix the CA is constrained to.
	Suffix  string `json:"suffix"`
	CertPEM string `json:"cert_pem"`
}

// Certifier is implemented by backends that hold a TLS certificate for the
// node's DNS name; the API serves /v0/cert and /v0/tailnet-ca for them.
type Certifier interface {
	// CertPair returns the certificate and key for name, which must be
	// the node's own DNS name ("" means it).
	CertPair(ctx context.Context, name string) (*CertPair, error)
	TailnetCA(ctx context.Context) (*TailnetCA, error)
}

func certRoutes(mux *http.ServeMux, b Backend) {
	c, ok := b.(Certifier)
	if !ok {
		return
	}
	mux.HandleFunc("GET /v0/cert", func(w http.ResponseWriter, r *http.Request) {
		p, err := c.CertPair(r.Context(), r.URL.Query().Get("name"))
		if err != nil {
			writeJSON(w, http.StatusBadRequest, errorBody{err.Error()})
			return
		}
		w.Header().Set("Cache-Control", "no-store")
		writeJSON(w, http.StatusOK, p)
	})
	mux.HandleFunc("GET /v0/tailnet-ca", func(w http.ResponseWriter, r *http.Request) {
		ca, err := c.TailnetCA(r.Context())
		if err != nil {
			writeJSON(w, http.StatusBadRequest, errorBody{err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, ca)
	})
}

// CertPair returns the node's TLS certificate and key for name (the
// node's DNS name, or "" for it), fetching one from the tailnet CA if the
// daemon has none that is current.
func (c *Client) CertPair(ctx context.Context, name string) (*CertPair, error) {
	var p CertPair
	return &p, c.do(ctx, "GET", "/v0/cert?name="+url.QueryEscape(name), nil, &p)
}

// TailnetCA returns the tailnet CA certificate.
func (c *Client) TailnetCA(ctx context.Context) (*TailnetCA, error) {
	var ca TailnetCA
	return &ca, c.do(ctx, "GET", "/v0/tailnet-ca", nil, &ca)
}
