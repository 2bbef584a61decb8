package control

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/internal/atomicfile"
	"meshd.dev/meshd/internal/clock"
	"meshd.dev/meshd/internal/connlimit"
	"meshd.dev/meshd/netmap"
)

// EmbeddedDERPRegionID is the region id of the relay embedded in the
// coordinator when no --derp-map is given.
const EmbeddedDERPRegionID = 1

// EmbeddedDERPMap is the one-region map pointing at a relay embedded in
// (or run next to) the coordinator: host is what nodes dial, fingerprint
// pins its certificate (the coordinator's own when the relay shares its
// listener). stunPort -1 means no STUN server.
func EmbeddedDERPMap(host string, derpPort, stunPort int, fingerprint string) *netmap.DERPMap {
	return &netmap.DERPMap{Regions: []netmap.DERPRegion{{
		ID: EmbeddedDERPRegionID, Code: "coord", Name: "coordinator",
		Nodes: []netmap.DERPNode{{
			Name: "1a", Host: host, DERPPort: derpPort, STUNPort: stunPort, CertFingerprint: fingerprint,
		}},
	}}}
}

// SetDERPMap replaces the DERP map that full network maps carry. It is meant
// for start-up, before Serve, when the map depends on the coordinator itself
// (the embedded relay is pinned by the coordinator's fingerprint, which is
// only known once NewServer has loaded its key). Streams already open keep
// the map they were sent until they reconnect.
func (s *Server) SetDERPMap(m *netmap.DERPMap) error {
	if m != nil {
		if err := m.Validate(); err != nil {
			return fmt.Errorf("coordinator: %w", err)
		}
	}
	s.hub.mu.Lock()
	defer s.hub.mu.Unlock()
	s.hub.derpMap = m
	return nil
}

// SetEmbeddedDERPMap is SetDERPMap for the map of this coordinator's own
// embedded relay (EmbeddedDERPMap). On replicas sharing a database the
// relay joins one region with every live replica's embedded relay, oldest
// first, and that region is the map handed out (replica_relay.go): nodes
// streaming from different replicas still share a relay.
func (s *Server) SetEmbeddedDERPMap(m *netmap.DERPMap) error {
	if m == nil || len(m.Regions) != 1 || m.Regions[0].ID != EmbeddedDERPRegionID || len(m.Regions[0].Nodes) != 1 {
		return fmt.Errorf("coordinator: an embedded relay's map has one region, %d, with one node (EmbeddedDERPMap)", EmbeddedDERPRegionID)
	}
	if err := s.SetDERPMap(m); err != nil {
		return err
	}
	if s.repl != nil {
		s.repl.setOwnRelay(m.Regions[0].Nodes[0])
	}
	return nil
}

// DERPMap returns the DERP map handed out to nodes (nil if none).
func (s *Server) DERPMap() *netmap.DERPMap {
	s.hub.mu.Lock()
	defer s.hub.mu.Unlock()
	return s.hub.derpMap
}

// ErrUnknownNodeKey is what a relay tells a client the coordinator does not
// know.
var ErrUnknownNodeKey = errors.New("node key is not registered with the coordinator, or it expired: run `meshd up` on the node")

// VerifyNodeKey is the "verify clients" check for a DERP relay: nil if k is
// the key of a registered, authorized node whose key has not expired. It
// fits derp.ServerOptions.Verify for a relay embedded in the coordinator.
func (s *Server) VerifyNodeKey(_ context.Context, k netmap.NodePublic) error {
	if s.nodeKeyValid(k, s.now()) {
		return nil
	}
	return ErrUnknownNodeKey
}

// nodeKeyValid checks expiry itself rather than trusting the hub alone:
// the expiry sweep runs every SweepInterval, and a relay should not accept
// a key in the gap.
func (s *Server) nodeKeyValid(k netmap.NodePublic, now time.Time) bool {
	h := s.hub
	h.mu.Lock()
	defer h.mu.Unlock()
	id, ok := h.byKey[k]
	if !ok {
		return false
	}
	n := h.nodes[id]
	return n != nil && (n.KeyExpiry.IsZero() || now.Before(n.KeyExpiry))
}

// Relay tokens let standalone relays (`meshd derp --coordinator`) ask the
// coordinator about node keys. They are separate from the admin token so a
// relay host holds no power over the tailnet: the token answers one yes/no
// question per key. Like admin tokens they carry the coordinator's
// fingerprint, which the relay pins.
const (
	relayTokenFile   = "relay.token"
	relayTokenPrefix = "msrly"
	relayVerifyPath  = "/relay/v1/verify"
	// metaRelayHash is the relay token's hash, shared by replicas.
	metaRelayHash = "relay_token_sha256"
)

// RelayVerifyResponse is the answer of GET /relay/v1/verify?key=nodekey:….
type RelayVerifyResponse struct {
	Known bool `json:"known"`
}

// EnableRelayVerify makes sure DIR/relay.token exists (creating it, mode
// 0600, on first use; delete it and restart to rotate) and serves
// GET /relay/v1/verify?key=NODEKEY to holders of that token. It returns the
// token file's path. Calling it again is harmless.
//
// Replicas on one database share the token as they share the admin token:
// the first to enable it makes it and writes its file, the others adopt its
// hash (the database holds only the hash), so a standalone relay holding
// it can ask any replica (`meshd derp --coordinator URL1,URL2`). A replica
// that did not make it holds no copy: the path returned is then "".
func (s *Server) EnableRelayVerify() (string, error) {
	path := filepath.Join(s.opts.StateDir, relayTokenFile)
	tok, err := readRelayToken(path)
	if err == nil {
		if fp, _ := relayTokenFingerprint(tok); fp != s.fingerprint {
			s.log.Warn("relay token was issued by another coordinator key; issuing a new one", "path", path)
			err = os.ErrNotExist
		}
	}
	fresh := errors.Is(err, os.ErrNotExist)
	if fresh {
		tok = relayTokenPrefix + "-" + randomSecret() + "-" + s.fingerprint
	} else if err != nil {
		return "", err
	}
	want := hashSecret(tok)
	if s.repl != nil {
		stored, err := s.repl.db.ClaimMeta(s.ctx, metaRelayHash, hex.EncodeToString(want))
		if err != nil {
			return "", fmt.Errorf("coordinator: relay token: %w", err)
		}
		h, err := hex.DecodeString(stored)
		if err != nil || len(h) != sha256.Size {
			return "", errors.New("coordinator: the database's relay token hash is damaged")
		}
		if !hashEqual(h, want) {
			if !fresh {
				s.log.Warn("relay token file is not the tailnet's (the database holds another one's hash); relays holding it are refused by every replica", "path", path)
			}
			want, path, fresh = h, "", false
		}
	}
	if fresh {
		if err := atomicfile.Write(path, []byte(tok+"\n"), 0o600); err != nil {
			return "", fmt.Errorf("coordinator: write relay token: %w", err)
		}
	}
	probe := &http.Request{Method: http.MethodGet, URL: &url.URL{Path: relayVerifyPath}}
	if _, pattern := s.mux.Handler(probe); pattern == "GET "+relayVerifyPath {
		return path, nil // enabled before; the token is the same file
	}
	s.relayHash.Store(&want)
	auth := func(w http.ResponseWriter, r *http.Request) bool {
		got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || !hashEqual(hashSecret(strings.TrimSpace(got)), *s.relayHash.Load()) {
			// Not controlclient.ErrUnauthorized, whose message names the admin token.
			writeJSON(w, http.StatusUnauthorized, controlclient.ErrorBody{Code: "unauthorized",
				Error: "relay token missing or wrong: use the content of the coordinator's " + relayTokenFile})
			return false
		}
		connlimit.Authenticate(r.Context())
		return true
	}
	s.mux.HandleFunc("GET "+relayVerifyPath, func(w http.ResponseWriter, r *http.Request) {
		if !auth(w, r) {
			return
		}
		k, err := netmap.ParseNodePublic(r.URL.Query().Get("key"))
		if err != nil {
			s.writeError(w, r, fmt.Errorf("%w: key: %v", controlclient.ErrBadRequest, err))
			return
		}
		writeJSON(w, http.StatusOK, RelayVerifyResponse{Known: s.nodeKeyValid(k, s.now())})
	})
	s.relayRoutes(auth)
	return path, nil
}

func readRelayToken(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return "", err
		}
		return "", fmt.Errorf("coordinator: read relay token: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

// relayTokenFingerprint returns the coordinator fingerprint a relay token
// carries.
func relayTokenFingerprint(token string) (string, error) {
	parts := strings.Split(strings.TrimSpace(token), "-")
	if len(parts) != 3 || parts[0] != relayTokenPrefix || len(parts[2]) != controlclient.FingerprintLen || !controlclient.IsHex(parts[2]) {
		return "", errors.New("relay token is malformed: want msrly-SECRET-FINGERPRINT, the content of the coordinator's relay.token")
	}
	return parts[2], nil
}

// RelayVerifierOptions tunes a RelayVerifier; zero values pick defaults.
type RelayVerifierOptions struct {
	// TTL is how long a "known" answer is trusted (default 30s).
	TTL time.Duration
	// NegativeTTL is how long an "unknown" answer is trusted (default 5s),
	// short so a node that just registered gets in on its next attempt.
	NegativeTTL time.Duration
	// StaleTTL is how long a "known" answer keeps being used while the
	// coordinator cannot be reached (default 10m), so a coordinator
	// restart does not lock known nodes out of the relay. Unknown keys are
	// refused while the coordinator is unreachable.
	StaleTTL time.Duration
	// MaxEntries bounds the cache (default 65536).
	MaxEntries int
	Logger     *slog.Logger

	// clock is the time of the cache, the revocation stream's watchdog
	// and its reconnect delay: clock.Real unless a test moves it.
	clock clock.Clock
}

// RelayVerifier answers derp.ServerOptions.Verify for a standalone relay by
// asking the coordinator, caching answers briefly.
type RelayVerifier struct {
	// bases are the coordinator's replicas; cur indexes the one asked.
	bases []*url.URL
	cur   atomic.Int32
	token string
	hc    *http.Client
	// stream has no overall timeout: it carries the revocation stream,
	// whose liveness the keep-alives show.
	stream *http.Client
	opts   RelayVerifierOptions
	clock  clock.Clock

	mu     sync.Mutex
	cache  map[netmap.NodePublic]verifyEntry
	revGen uint64 // revocations received, see verifyEntry.revoked
}

type verifyEntry struct {
	known bool
	at    time.Time
	// revoked is the revocation generation that set this entry (0: an
	// answer to a question), so an answer asked for before that revocation
	// cannot overwrite it.
	revoked uint64
}

// NewRelayVerifier returns a verifier for the coordinator at rawURL (or its
// replicas' URLs, separated by commas: it asks the next when one cannot be
// reached); token is the content of the coordinator's relay.token, whose
// fingerprint is pinned.
func NewRelayVerifier(rawURL, token string, opts RelayVerifierOptions) (*RelayVerifier, error) {
	us, err := controlclient.ParseURLs(rawURL)
	if err != nil {
		return nil, err
	}
	token = strings.TrimSpace(token)
	fp, err := relayTokenFingerprint(token)
	if err != nil {
		return nil, err
	}
	if opts.TTL <= 0 {
		opts.TTL = 30 * time.Second
	}
	if opts.NegativeTTL <= 0 {
		opts.NegativeTTL = 5 * time.Second
	}
	if opts.StaleTTL <= 0 {
		opts.StaleTTL = 10 * time.Minute
	}
	if opts.MaxEntries <= 0 {
		opts.MaxEntries = 65536
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	tr := controlclient.PinnedTransport(fp)
	return &RelayVerifier{
		bases: us, token: token, opts: opts, clock: clock.Or(opts.clock),
		hc:     &http.Client{Transport: tr, Timeout: 10 * time.Second},
		stream: &http.Client{Transport: tr},
		cache:  make(map[netmap.NodePublic]verifyEntry),
	}, nil
}

// Close releases idle connections.
func (v *RelayVerifier) Close() { v.hc.CloseIdleConnections() }

// Verify returns nil if the coordinator knows k (from cache when fresh).
func (v *RelayVerifier) Verify(ctx context.Context, k netmap.NodePublic) error {
	now := v.clock.Now()
	v.mu.Lock()
	e, cached := v.cache[k]
	gen := v.revGen
	v.mu.Unlock()
	if cached {
		ttl := v.opts.NegativeTTL
		if e.known {
			ttl = v.opts.TTL
		}
		if now.Sub(e.at) < ttl {
			return verdict(e.known)
		}
	}
	known, err := v.ask(ctx, k)
	if err != nil {
		if cached && e.known && now.Sub(e.at) < v.opts.StaleTTL {
			v.opts.Logger.Warn("relay: coordinator unreachable; accepting a node it knew recently", "node", k.ShortString(), "err", err)
			return nil
		}
		return fmt.Errorf("cannot check the node with the coordinator: %w", err)
	}
	return verdict(v.store(k, known, now, gen))
}

// store caches an answer the coordinator gave to a question asked when
// the revocation generation was gen, and returns the verdict to use: a
// revocation of k received since then wins over a "known" that was on the
// wire when it came.
func (v *RelayVerifier) store(k netmap.NodePublic, known bool, now time.Time, gen uint64) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	if e, ok := v.cache[k]; ok && e.revoked > gen {
		return false
	}
	if len(v.cache) >= v.opts.MaxEntries {
		v.evictLocked(now)
	}
	v.cache[k] = verifyEntry{known: known, at: now}
	return known
}

// markRevoked caches k as unknown because the coordinator revoked it.
func (v *RelayVerifier) markRevoked(k netmap.NodePublic, now time.Time) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if len(v.cache) >= v.opts.MaxEntries {
		v.evictLocked(now)
	}
	v.revGen++
	v.cache[k] = verifyEntry{known: false, at: now, revoked: v.revGen}
}

func verdict(known bool) error {
	if known {
		return nil
	}
	return ErrUnknownNodeKey
}

// evictLocked drops entries past any use; if that frees nothing the cache
// starts over rather than growing without bound.
func (v *RelayVerifier) evictLocked(now time.Time) {
	for k, e := range v.cache {
		if now.Sub(e.at) >= v.opts.StaleTTL || (!e.known && now.Sub(e.at) >= v.opts.NegativeTTL) {
			delete(v.cache, k)
		}
	}
	if len(v.cache) >= v.opts.MaxEntries {
		clear(v.cache)
	}
}

func (v *RelayVerifier) ask(ctx context.Context, k netmap.NodePublic) (bool, error) {
	var err error
	for range v.bases {
		base := v.base()
		u := base.JoinPath(relayVerifyPath)
		u.RawQuery = url.Values{"key": {k.String()}}.Encode()
		var out RelayVerifyResponse
		if err = controlclient.DoJSON(ctx, v.hc, http.MethodGet, u.String(), v.token, nil, &out, nil); err == nil {
			return out.Known, nil
		}
		if !v.failover(ctx, base, err) {
			break
		}
	}
	return false, err
}

// base is the replica asked now.
func (v *RelayVerifier) base() *url.URL {
	return v.bases[int(v.cur.Load())%len(v.bases)]
}

// failover moves on to the next replica after base failed with err, unless
// err is the coordinator's answer (it would be the same everywhere) or
// ctx ended; it reports whether it moved.
func (v *RelayVerifier) failover(ctx context.Context, base *url.URL, err error) bool {
	var ae *controlclient.APIError
	if len(v.bases) < 2 || ctx.Err() != nil || errors.As(err, &ae) {
		return false
	}
	cur := v.cur.Load()
	if v.bases[int(cur)%len(v.bases)] != base {
		return true // another request moved on already
	}
	if v.cur.CompareAndSwap(cur, (cur+1)%int32(len(v.bases))) {
		v.opts.Logger.Info("relay: coordinator replica unreachable; asking the next one", "from", base.Host, "to", v.base().Host, "err", err)
	}
	return true
}
