package localapi

import (
	"context"
	"net/http"

	// Aliased: the package tests have a helper named serve.
	servecfg "meshd.dev/meshd/agent/serve"
	"meshd.dev/meshd/netmap"
)

// ServeRequest names one serve entry: `meshd serve --PROTO PORT --to
// TARGET` (Target is unused when removing).
type ServeRequest struct {
	Proto  string `json:"proto"`
	Port   uint16 `json:"port"`
	Target string `json:"target,omitempty"`
}

// ServeStatus is what the node serves (`meshd serve status`).
type ServeStatus struct {
	// DNSName is the node's MagicDNS name with its trailing dot, for the
	// URLs callers use; empty before the first map.
	DNSName string                 `json:"dns_name,omitempty"`
	Entries []servecfg.EntryStatus `json:"entries"`
	// Message says why entries are not serving (the node is down, the
	// saved configuration was unusable).
	Message string `json:"message,omitempty"`
}

// ServeBackend is implemented by backends that run `meshd serve`; the API
// serves /v0/serve for them. Changing what is served is as privileged as
// up and down: like every endpoint, it is open only to root and the
// daemon's own user (SO_PEERCRED), since it decides which local services
// tailnet peers reach.
type ServeBackend interface {
	ServeStatus(ctx context.Context) (*ServeStatus, error)
	ServeAdd(ctx context.Context, req ServeRequest) (*ServeStatus, error)
	ServeRemove(ctx context.Context, req ServeRequest) (*ServeStatus, error)
	ServeReset(ctx context.Context) (*ServeStatus, error)
}

func handleServe(mux *http.ServeMux, b ServeBackend) {
	mux.HandleFunc("GET /v0/serve", func(w http.ResponseWriter, r *http.Request) {
		st, err := b.ServeStatus(r.Context())
		if err != nil {
			writeJSON(w, http.StatusInternalServerError, errorBody{err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, st)
	})
	edit := func(do func(context.Context, ServeRequest) (*ServeStatus, error)) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			var req ServeRequest
			if err := netmap.DecodeJSON(r.Body, maxRequest, &req); err != nil {
				writeJSON(w, http.StatusBadRequest, errorBody{"bad request: " + err.Error()})
				return
			}
			st, err := do(r.Context(), req)
			if err != nil {
				writeJSON(w, http.StatusBadRequest, errorBody{err.Error()})
				return
			}
			writeJSON(w, http.StatusOK, st)
		}
	}
	mux.HandleFunc("POST /v0/serve/add", edit(b.ServeAdd))
	mux.HandleFunc("POST /v0/serve/remove", edit(b.ServeRemove))
	mux.HandleFunc("POST /v0/serve/reset", edit(func(ctx context.Context, _ ServeRequest) (*ServeStatus, error) { return b.ServeReset(ctx) }))
}

// ServeStatus lists what the daemon serves.
func (c *Client) ServeStatus(ctx context.Context) (*ServeStatus, error) {
	var st ServeStatus
	return &st, c.do(ctx, "GET", "/v0/serve", nil, &st)
}

// ServeAdd serves a tailnet port.
func (c *Client) ServeAdd(ctx context.Context, req ServeRequest) (*ServeStatus, error) {
	var st ServeStatus
	return &st, c.do(ctx, "POST", "/v0/serve/add", req, &st)
}

// ServeRemove stops serving a tailnet port.
func (c *Client) ServeRemove(ctx context.Context, req ServeRequest) (*ServeStatus, error) {
	var st ServeStatus
	return &st, c.do(ctx, "POST", "/v0/serve/remove", req, &st)
}

// ServeReset stops serving everything.
func (c *Client) ServeReset(ctx context.Context) (*ServeStatus, error) {
	var st ServeStatus
	return &st, c.do(ctx, "POST", "/v0/serve/reset", struct{}{}, &st)
}
