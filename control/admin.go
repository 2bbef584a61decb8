package control

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/control/store"
	"meshd.dev/meshd/internal/connlimit"
	"meshd.dev/meshd/netmap"
)

// AuthKeyOptions describes a new auth key.
type AuthKeyOptions struct {
	Reusable      bool
	Ephemeral     bool
	Preauthorized bool
	// Tags make enrolled nodes tagged nodes (service identities, no user,
	// keys that never expire). Without tags, User owns the nodes.
	Tags []string
	// Expiry is how long the key can be used; zero means it never expires.
	Expiry time.Duration
	// User (a login such as alice@example.com) owns the nodes of an
	// untagged key. Users are created on first use.
	User string
}

// AuthKey describes an auth key (never its secret).
type AuthKey struct {
	ID            string    `json:"id"`
	Reusable      bool      `json:"reusable"`
	Ephemeral     bool      `json:"ephemeral"`
	Preauthorized bool      `json:"preauthorized"`
	Tags          []string  `json:"tags"`
	User          string    `json:"user,omitempty"`
	Created       time.Time `json:"created"`
	Expires       time.Time `json:"expires,omitzero"`
	Revoked       time.Time `json:"revoked,omitzero"`
	LastUsed      time.Time `json:"last_used,omitzero"`
	Uses          int       `json:"uses"`
	// State is "valid", "expired", "revoked" or "used".
	State string `json:"state"`
}

// NewAuthKey is a created key with its secret, shown once.
type NewAuthKey struct {
	AuthKey
	Key string `json:"key"`
}

// NodeInfo is a node as the admin API lists it.
type NodeInfo struct {
	netmap.Node
	Authorized bool   `json:"authorized"`
	Expired    bool   `json:"expired"`
	AuthKeyID  string `json:"auth_key_id,omitempty"`
}

// User is a person who owns devices.
type User = store.User

func authKeyView(k store.AuthKey, now time.Time) AuthKey {
	v := AuthKey{
		ID: k.ID, Reusable: k.Reusable, Ephemeral: k.Ephemeral, Preauthorized: k.Preauthorized,
		Tags: k.Tags, User: k.User, Created: k.Created, Expires: k.Expires, Revoked: k.Revoked,
		LastUsed: k.LastUsed, Uses: k.Uses, State: "valid",
	}
	if v.Tags == nil {
		v.Tags = []string{}
	}
	switch {
	case !k.Revoked.IsZero():
		v.State = "revoked"
	case !k.Expires.IsZero() && !now.Before(k.Expires):
		v.State = "expired"
	case !k.Reusable && k.Uses > 0:
		v.State = "used"
	}
	return v
}

func checkLogin(login string) error {
	if login == "" || len(login) > 256 || strings.ContainsFunc(login, func(r rune) bool { return r <= ' ' || r == 0x7f }) {
		return fmt.Errorf("%w: user %q: want a login such as alice@example.com", controlclient.ErrBadRequest, login)
	}
	return nil
}

// CreateAuthKey creates an auth key and returns its secret (the full key
// string, shown once) and its description.
func (s *Server) CreateAuthKey(ctx context.Context, o AuthKeyOptions) (string, AuthKey, error) {
	tags, err := netmap.NormalizeTags(o.Tags)
	if err != nil {
		return "", AuthKey{}, fmt.Errorf("%w: %v", controlclient.ErrBadRequest, err)
	}
	o.User = strings.TrimSpace(o.User)
	switch {
	case len(tags) == 0 && o.User == "":
		return "", AuthKey{}, fmt.Errorf("%w: a key needs --tags (nodes become tagged services) or --user (nodes become that user's devices)", controlclient.ErrBadRequest)
	case len(tags) > 0 && o.User != "":
		return "", AuthKey{}, fmt.Errorf("%w: a key is either tagged or a user's, not both: drop --user or --tags", controlclient.ErrBadRequest)
	case o.Expiry < 0:
		return "", AuthKey{}, fmt.Errorf("%w: expiry %v is negative", controlclient.ErrBadRequest, o.Expiry)
	}
	if o.User != "" {
		if err := checkLogin(o.User); err != nil {
			return "", AuthKey{}, err
		}
	}
	// Tags on a key are the administrator's to apply: like Tailscale's
	// admin, the token holder owns every tag the policy defines, so the
	// key's tags must only exist in "tagOwners". Tags a node requests
	// beyond its key's are checked against their owners at registration.
	if err := s.adminMayApply(tags); err != nil {
		return "", AuthKey{}, err
	}
	now := s.now().UTC()
	if o.User != "" {
		if _, err := s.store.EnsureUser(ctx, o.User, now); err != nil {
			return "", AuthKey{}, err
		}
	}
	pk := controlclient.AuthKey{ID: randomKeyID(), Secret: randomSecret(), Fingerprint: s.fingerprint}
	k := store.AuthKey{
		ID: pk.ID, Hash: hashSecret(pk.Secret), Reusable: o.Reusable, Ephemeral: o.Ephemeral,
		Preauthorized: o.Preauthorized, Tags: tags, User: o.User, Created: now,
	}
	if o.Expiry > 0 {
		k.Expires = now.Add(o.Expiry)
	}
	if err := s.store.InsertAuthKey(ctx, k); err != nil {
		return "", AuthKey{}, err
	}
	s.log.Info("auth key created", "id", k.ID, "tags", tags, "user", o.User, "reusable", o.Reusable, "ephemeral", o.Ephemeral)
	view := authKeyView(k, now)
	s.audit(ctx, nil, AuditKeyCreate, k.ID, view)
	return pk.String(), view, nil
}

// AuthKeys lists every auth key.
func (s *Server) AuthKeys(ctx context.Context) ([]AuthKey, error) {
	ks, err := s.store.AuthKeys(ctx)
	if err != nil {
		return nil, err
	}
	now := s.now()
	out := make([]AuthKey, 0, len(ks))
	for _, k := range ks {
		out = append(out, authKeyView(k, now))
	}
	return out, nil
}

// RevokeAuthKey revokes a key; nodes already enrolled with it stay.
func (s *Server) RevokeAuthKey(ctx context.Context, id string) error {
	err := s.store.RevokeAuthKey(ctx, id, s.now().UTC())
	if errors.Is(err, store.ErrNotFound) {
		return fmt.Errorf("%w: no auth key %q", controlclient.ErrNotFound, id)
	}
	if err == nil {
		s.audit(ctx, nil, AuditKeyRevoke, id, nil)
	}
	return err
}

// Nodes lists every registered node.
func (s *Server) Nodes(ctx context.Context) ([]NodeInfo, error) {
	ns, err := s.store.Nodes(ctx)
	if err != nil {
		return nil, err
	}
	now := s.now()
	out := make([]NodeInfo, 0, len(ns))
	for _, n := range ns {
		ni := NodeInfo{Node: n.Node, Authorized: n.Authorized, AuthKeyID: n.AuthKeyID,
			Expired: !n.KeyExpiry.IsZero() && !now.Before(n.KeyExpiry)}
		ni.DNSName = netmap.DNSName(n.Hostname, s.opts.DNS.Suffix)
		if cur := s.hub.get(n.ID); cur != nil {
			ni.Online, ni.Endpoints, ni.HomeDERP = cur.Online, cur.Endpoints, cur.HomeDERP
		}
		out = append(out, ni)
	}
	return out, nil
}

func (s *Server) storeNode(ctx context.Context, id netmap.NodeID) (store.Node, error) {
	n, err := s.store.Node(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		return n, fmt.Errorf("%w: no node %d", controlclient.ErrNotFound, id)
	}
	return n, err
}

// DeleteNode removes a node; its map stream ends and peers drop it.
func (s *Server) DeleteNode(ctx context.Context, id netmap.NodeID) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	n, err := s.storeNode(ctx, id)
	if err != nil {
		return err
	}
	if err := s.deleteNodeLocked(ctx, id, nil, auditNode(&n)); err != nil {
		return err
	}
	s.log.Info("node deleted", "node", id)
	return nil
}

// deleteNodeLocked deletes node id from the store and the tailnet: its
// deletion timer stops, its streams end with ErrNotRegistered and its peers
// drop it. The deletion is audited with actor (nil: the one ctx carries)
// and details. s.mu held.
func (s *Server) deleteNodeLocked(ctx context.Context, id netmap.NodeID, actor *Actor, details any) error {
	if err := s.store.DeleteNode(ctx, id); err != nil {
		return err
	}
	s.cancelEphemeralLocked(id)
	s.hub.remove(id, controlclient.ErrNotRegistered)
	s.audit(ctx, actor, AuditNodeDelete, nodeTarget(id), details)
	return nil
}

// ExpireNode expires a node's key now: it leaves every map and must
// re-authenticate with an auth key.
func (s *Server) ExpireNode(ctx context.Context, id netmap.NodeID) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	n, err := s.storeNode(ctx, id)
	if err != nil {
		return err
	}
	n.KeyExpiry = s.now().UTC()
	n.AdminActed = n.KeyExpiry
	if err := s.store.UpdateNode(ctx, n); err != nil {
		return err
	}
	s.hub.remove(id, controlclient.ErrNodeExpired)
	s.log.Info("node expired by administrator", "node", id)
	s.audit(ctx, nil, AuditNodeExpire, nodeTarget(id), auditNode(&n))
	return nil
}

// TagNode replaces a node's tags. The node becomes a tagged node: it loses
// its user identity, its key stops expiring, and it keeps its addresses.
func (s *Server) TagNode(ctx context.Context, id netmap.NodeID, tags []string) error {
	tags, err := netmap.NormalizeTags(tags)
	if err != nil {
		return fmt.Errorf("%w: %v", controlclient.ErrBadRequest, err)
	}
	if len(tags) == 0 {
		return fmt.Errorf("%w: give at least one tag, or return the node to a user (meshd admin nodes tag ID --user LOGIN)", controlclient.ErrBadRequest)
	}
	if err := s.adminMayApply(tags); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	n, err := s.storeNode(ctx, id)
	if err != nil {
		return err
	}
	before := auditNode(&n)
	n.Tags, n.User, n.KeyExpiry = tags, "", time.Time{}
	n.AdminActed = s.now().UTC()
	// The administrator chose these tags: none is the node's own request
	// to re-check, and what the node was told about earlier tags is moot.
	n.SelfTags, n.Notices = nil, nil
	if err := s.store.UpdateNode(ctx, n); err != nil {
		return err
	}
	s.republishLocked(n)
	s.audit(ctx, nil, AuditNodeTags, nodeTarget(id), auditChange{Before: before, After: auditNode(&n)})
	return nil
}

// UntagNode returns a node to user (a login; created on first use): it
// loses its tags and becomes that user's device, with the key expiry of a
// device enrolled with the user's key (NodeKeyExpiry from now). It keeps
// its id and addresses.
func (s *Server) UntagNode(ctx context.Context, id netmap.NodeID, user string) error {
	user = strings.TrimSpace(user)
	if err := checkLogin(user); err != nil {
		return err
	}
	now := s.now().UTC()
	if _, err := s.store.EnsureUser(ctx, user, now); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	n, err := s.storeNode(ctx, id)
	if err != nil {
		return err
	}
	before := auditNode(&n)
	n.Tags, n.User, n.KeyExpiry = nil, user, now.Add(s.opts.NodeKeyExpiry)
	n.SelfTags, n.Notices = nil, nil // the administrator decided; nothing to re-check
	n.AdminActed = now               // ends a single-use key's retry window
	if err := s.store.UpdateNode(ctx, n); err != nil {
		return err
	}
	s.republishLocked(n)
	s.log.Info("node returned to a user by administrator", "node", id, "user", user, "key_expiry", n.KeyExpiry)
	s.audit(ctx, nil, AuditNodeUser, nodeTarget(id), auditChange{Before: before, After: auditNode(&n)})
	return nil
}

// adminMayApply checks tags the administrator applies (admin nodes tag,
// keys create --tags) against the policy: the admin acts as an owner of
// every tag, the way an auth key carrying a tag may apply it, so CheckTags
// refuses only tags the policy does not define. Under the bootstrap
// default any tag goes.
func (s *Server) adminMayApply(tags []string) error {
	if err := s.policy().CheckTags("", tags, tags); err != nil {
		return fmt.Errorf("%w: %v", controlclient.ErrTagsForbidden, err)
	}
	return nil
}

// ApproveNode authorizes a node waiting for approval.
func (s *Server) ApproveNode(ctx context.Context, id netmap.NodeID) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	n, err := s.storeNode(ctx, id)
	if err != nil {
		return err
	}
	if n.Authorized {
		return nil
	}
	n.Authorized = true
	n.AdminActed = s.now().UTC()
	if err := s.store.UpdateNode(ctx, n); err != nil {
		return err
	}
	s.republishLocked(n)
	s.audit(ctx, nil, AuditNodeApprove, nodeTarget(id), auditNode(&n))
	return nil
}

// republishLocked pushes a node's stored identity to the hub, keeping its
// live state (online, endpoints). s.mu held.
func (s *Server) republishLocked(n store.Node) {
	if !s.visible(n, s.now()) {
		s.hub.remove(n.ID, controlclient.ErrNodeExpired)
		return
	}
	wn := n.Node
	if cur := s.hub.get(n.ID); cur != nil {
		wn.Online, wn.Endpoints, wn.HomeDERP, wn.DiscoKey, wn.NodeKey = cur.Online, cur.Endpoints, cur.HomeDERP, cur.DiscoKey, cur.NodeKey
	} else {
		wn.Online = false
	}
	s.hub.upsertRouted(&wn, n.RoutesApproved)
}

// Users lists users.
func (s *Server) Users(ctx context.Context) ([]User, error) { return s.store.Users(ctx) }

// --- admin HTTP API ---

func (s *Server) adminRoutes(mux *http.ServeMux) {
	h := func(f func(*http.Request) (any, error)) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			if !s.adminAuthorized(r) {
				s.writeError(w, r, fmt.Errorf("%w: send the content of the coordinator's admin.token as a bearer token", controlclient.ErrUnauthorized))
				return
			}
			connlimit.Authenticate(r.Context())
			r = r.WithContext(WithActor(r.Context(), Actor{Kind: ActorAdmin, Addr: r.RemoteAddr}))
			v, err := f(r)
			if err != nil {
				s.writeError(w, r, err)
				return
			}
			writeJSON(w, http.StatusOK, v)
		}
	}
	s.tokenRoutes(mux, h)
	mux.HandleFunc("GET /admin/v1/keys", h(func(r *http.Request) (any, error) { return s.AuthKeys(r.Context()) }))
	mux.HandleFunc("POST /admin/v1/keys", h(func(r *http.Request) (any, error) {
		var req createKeyRequest
		if err := decodeBody(r, &req); err != nil {
			return nil, err
		}
		exp, err := time.ParseDuration(req.Expiry)
		if req.Expiry == "" {
			exp, err = 0, nil
		}
		if err != nil {
			return nil, fmt.Errorf("%w: expiry %q: %v", controlclient.ErrBadRequest, req.Expiry, err)
		}
		secret, k, err := s.CreateAuthKey(r.Context(), AuthKeyOptions{
			Reusable: req.Reusable, Ephemeral: req.Ephemeral, Preauthorized: req.Preauthorized,
			Tags: req.Tags, Expiry: exp, User: req.User,
		})
		if err != nil {
			return nil, err
		}
		return NewAuthKey{AuthKey: k, Key: secret}, nil
	}))
	mux.HandleFunc("POST /admin/v1/keys/{id}/revoke", h(func(r *http.Request) (any, error) {
		return struct{}{}, s.RevokeAuthKey(r.Context(), r.PathValue("id"))
	}))
	mux.HandleFunc("GET /admin/v1/nodes", h(func(r *http.Request) (any, error) { return s.Nodes(r.Context()) }))
	nodeOp := func(op func(context.Context, netmap.NodeID) error) http.HandlerFunc {
		return h(func(r *http.Request) (any, error) {
			id, err := parseNodeID(r.PathValue("id"))
			if err != nil {
				return nil, err
			}
			return struct{}{}, op(r.Context(), id)
		})
	}
	mux.HandleFunc("DELETE /admin/v1/nodes/{id}", nodeOp(s.DeleteNode))
	mux.HandleFunc("POST /admin/v1/nodes/{id}/expire", nodeOp(s.ExpireNode))
	mux.HandleFunc("POST /admin/v1/nodes/{id}/approve", nodeOp(s.ApproveNode))
	mux.HandleFunc("POST /admin/v1/nodes/{id}/tags", h(func(r *http.Request) (any, error) {
		id, err := parseNodeID(r.PathValue("id"))
		if err != nil {
			return nil, err
		}
		var req tagRequest
		if err := decodeBody(r, &req); err != nil {
			return nil, err
		}
		switch {
		case req.User != "" && len(req.Tags) > 0:
			return nil, fmt.Errorf("%w: a node is either tagged or a user's: give tags or a user, not both", controlclient.ErrBadRequest)
		case req.User != "":
			return struct{}{}, s.UntagNode(r.Context(), id, req.User)
		}
		return struct{}{}, s.TagNode(r.Context(), id, req.Tags)
	}))
	s.policyRoutes(mux, h)
	s.auditRoutes(mux, h)
	s.sshAdminRoutes(mux, h)
	s.routeAdminRoutes(mux, h)
	mux.HandleFunc("GET /admin/v1/users", h(func(r *http.Request) (any, error) {
		u, err := s.Users(r.Context())
		if u == nil {
			u = []User{}
		}
		return u, err
	}))
}

type createKeyRequest struct {
	Reusable      bool     `json:"reusable"`
	Ephemeral     bool     `json:"ephemeral"`
	Preauthorized bool     `json:"preauthorized"`
	Tags          []string `json:"tags"`
	User          string   `json:"user"`
	Expiry        string   `json:"expiry"` // Go duration; "" or "0" never
}

type tagRequest struct {
	Tags []string `json:"tags"`
	// User, instead of Tags, returns the node to that user.
	User string `json:"user,omitempty"`
}

func parseNodeID(s string) (netmap.NodeID, error) {
	// 63 bits: node ids are SQL integers, which are signed.
	id, err := strconv.ParseUint(s, 10, 63)
	if err != nil || id == 0 {
		return 0, fmt.Errorf("%w: node id %q: want a positive number as listed by `meshd admin nodes list`", controlclient.ErrBadRequest, s)
	}
	return netmap.NodeID(id), nil
}

func (s *Server) adminAuthorized(r *http.Request) bool {
	tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok {
		return false
	}
	sum := sha256.Sum256([]byte(strings.TrimSpace(tok)))
	h := s.adminHash.Load()
	return h != nil && hashEqual(sum[:], *h)
}
