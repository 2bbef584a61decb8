package control

import (
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"net/http"
	"path/filepath"
	"sync"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/internal/atomicfile"
)

// Rotating the admin and relay tokens (`meshd admin token rotate`). A
// single coordinator could always rotate one by deleting its file and
// restarting; replicas on PostgreSQL cannot (a replica adopts the
// tailnet's token and never makes a new one), and a restart is a poor way
// to retire a leaked secret. Rotation through the admin API works on both:
// the new token's hash replaces the old one in the database (every
// replica applies it from the change feed within a second), the replica
// that rotated writes the new token to its state dir, and the token goes
// back to the caller once. The old token stops working at once; relays'
// revocation streams opened with it are closed.

// Token kinds RotateToken knows.
const (
	TokenAdmin = "admin"
	TokenRelay = "relay"
)

// Audit actions of token rotation.
const (
	AuditAdminTokenRotate = "admin.token_rotate"
	AuditRelayTokenRotate = "relay.token_rotate"
)

// RotatedToken is what RotateToken returns: the new token, shown once.
type RotatedToken struct {
	Kind  string `json:"kind"`
	Token string `json:"token"`
	// Path is where the coordinator that rotated it wrote it (in its
	// state dir).
	Path string `json:"path"`
}

// relayEpoch lets relay revocation streams end when the relay token they
// were opened with is rotated away.
type relayEpoch struct {
	mu sync.Mutex
	ch chan struct{} // closed at the next rotation
}

func (e *relayEpoch) current() <-chan struct{} {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.ch == nil {
		e.ch = make(chan struct{})
	}
	return e.ch
}

func (e *relayEpoch) rotated() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.ch != nil {
		close(e.ch)
	}
	e.ch = make(chan struct{})
}

// RotateToken replaces the admin or relay token (kind TokenAdmin or
// TokenRelay) with a new one and returns it. The relay token can only be
// rotated where relay verification is enabled (EnableRelayVerify).
func (s *Server) RotateToken(ctx context.Context, kind string) (RotatedToken, error) {
	var prefix, file, meta, action string
	switch kind {
	case TokenAdmin:
		prefix, file, meta, action = controlclient.AdminTokenPrefix, s.adminPath, metaAdminHash, AuditAdminTokenRotate
	case TokenRelay:
		if s.relayHash.Load() == nil {
			return RotatedToken{}, fmt.Errorf("%w: this coordinator does not verify relays (it has no relay token to rotate)", controlclient.ErrBadRequest)
		}
		prefix, file, meta, action = relayTokenPrefix, filepath.Join(s.opts.StateDir, relayTokenFile), metaRelayHash, AuditRelayTokenRotate
	default:
		return RotatedToken{}, fmt.Errorf("%w: token kind %q: want %q or %q", controlclient.ErrBadRequest, kind, TokenAdmin, TokenRelay)
	}
	tok := prefix + "-" + randomSecret() + "-" + s.fingerprint
	h := hashSecret(tok)
	s.tokenMu.Lock()
	defer s.tokenMu.Unlock()
	// The file first: if storing the hash then fails, the old token stays
	// in force everywhere and a restart sees a file that is not the
	// tailnet's, which it reports; the other order could leave a token in
	// force that nobody holds.
	if err := atomicfile.Write(file, []byte(tok+"\n"), 0o600); err != nil {
		return RotatedToken{}, fmt.Errorf("coordinator: write the new %s token: %w", kind, err)
	}
	if err := s.store.SetMeta(ctx, meta, hex.EncodeToString(h)); err != nil {
		return RotatedToken{}, fmt.Errorf("coordinator: store the new %s token: %w", kind, err)
	}
	s.installTokenHash(kind, h)
	s.audit(ctx, nil, action, kind+"-token", nil)
	s.log.Info("token rotated", "kind", kind, "path", file)
	return RotatedToken{Kind: kind, Token: tok, Path: file}, nil
}

// installTokenHash puts a token hash in force here.
func (s *Server) installTokenHash(kind string, h []byte) {
	switch kind {
	case TokenAdmin:
		s.adminHash.Store(&h)
	case TokenRelay:
		if old := s.relayHash.Load(); old != nil && !bytes.Equal(*old, h) {
			s.relayHash.Store(&h)
			s.relayEpoch.rotated()
		}
	}
}

// syncRelayHash applies the relay token hash another replica stored.
func (s *Server) syncRelayHash() {
	if s.relayHash.Load() == nil {
		return // this replica does not verify relays
	}
	h, ok := s.storedTokenHash(metaRelayHash, "relay")
	if !ok {
		return
	}
	if old := s.relayHash.Load(); !bytes.Equal(*old, h) {
		s.installTokenHash(TokenRelay, h)
		s.log.Info("relay token changed by another replica")
	}
}

func (s *Server) tokenRoutes(mux *http.ServeMux, h func(func(*http.Request) (any, error)) http.HandlerFunc) {
	mux.HandleFunc("POST /admin/v1/tokens/{kind}/rotate", h(func(r *http.Request) (any, error) {
		return s.RotateToken(r.Context(), r.PathValue("kind"))
	}))
}

// RotateToken replaces the coordinator's admin or relay token and returns
// the new one. Rotating the admin token makes this client's token stale.
func (a *AdminClient) RotateToken(ctx context.Context, kind string) (RotatedToken, error) {
	var out RotatedToken
	err := a.do(ctx, http.MethodPost, "/admin/v1/tokens/"+kind+"/rotate", struct{}{}, &out)
	return out, err
}
