package control

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/control/store"
	"meshd.dev/meshd/internal/connlimit"
	"meshd.dev/meshd/netmap"
)

// machineKey returns the machine key the client proved in the TLS handshake.
func machineKey(r *http.Request) (netmap.MachinePublic, error) {
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		return netmap.MachinePublic{}, fmt.Errorf("%w: no client certificate: machine requests must present the machine key", controlclient.ErrBadRequest)
	}
	pub, ok := r.TLS.PeerCertificates[0].PublicKey.(ed25519.PublicKey)
	if !ok {
		return netmap.MachinePublic{}, fmt.Errorf("%w: client certificate key is %T, want Ed25519", controlclient.ErrBadRequest, r.TLS.PeerCertificates[0].PublicKey)
	}
	return netmap.MachinePublicFromEd25519(pub)
}

func checkVersion(v int) error {
	if v < netmap.MinProtocolVersion {
		return fmt.Errorf("%w: client speaks protocol %d, this coordinator needs at least %d: upgrade meshd on the node", controlclient.ErrTooOld, v, netmap.MinProtocolVersion)
	}
	return nil
}

// sanitizeHostname makes a DNS label of what the node calls itself.
func sanitizeHostname(h string) string {
	h = strings.ToLower(strings.TrimSpace(h))
	if i := strings.IndexByte(h, '.'); i >= 0 {
		h = h[:i]
	}
	b := []byte(h)
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			b[i] = '-'
		}
	}
	h = strings.Trim(string(b), "-")
	if len(h) > 63 {
		h = strings.TrimRight(h[:63], "-")
	}
	if h == "" {
		h = "node"
	}
	return h
}

// sanitizeOS keeps what a node says its OS is to a short lowercase word,
// since peers show it (whois, status) and must not be handed markup or
// control characters.
func sanitizeOS(os string) string {
	os = strings.ToLower(os)
	if len(os) > 32 {
		os = os[:32]
	}
	if strings.ContainsFunc(os, func(r rune) bool { return !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9') }) {
		return "other"
	}
	return os
}

// machineJSON serves a machine endpoint: the caller's machine key from
// its TLS client certificate, a JSON request of type Req, and do's answer
// as JSON. A request do accepts came from an enrolled machine, which lifts
// the connection's limits on unauthenticated clients.
func machineJSON[Req, Resp any](s *Server, do func(context.Context, netmap.MachinePublic, Req) (*Resp, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		mk, err := machineKey(r)
		if err != nil {
			s.writeError(w, r, err)
			return
		}
		var req Req
		if err := decodeBody(r, &req); err != nil {
			s.writeError(w, r, err)
			return
		}
		resp, err := do(r.Context(), mk, req)
		if err != nil {
			s.writeError(w, r, err)
			return
		}
		connlimit.Authenticate(r.Context())
		writeJSON(w, http.StatusOK, resp)
	}
}

// registerCounted is register, counted in the registration metrics.
func (s *Server) registerCounted(ctx context.Context, mk netmap.MachinePublic, req netmap.RegisterRequest) (*netmap.RegisterResponse, error) {
	resp, err := s.register(ctx, mk, req)
	s.met.registered(err)
	return resp, err
}

// register enrols or re-registers machine mk.
func (s *Server) register(ctx context.Context, mk netmap.MachinePublic, req netmap.RegisterRequest) (*netmap.RegisterResponse, error) {
	if err := checkVersion(req.Version); err != nil {
		return nil, err
	}
	if req.NodeKey.IsZero() {
		return nil, fmt.Errorf("%w: node_key is missing", controlclient.ErrBadRequest)
	}
	if len(req.Hostname) > 1024 || len(req.RequestTags) > 64 {
		return nil, fmt.Errorf("%w: hostname or tag list too long", controlclient.ErrBadRequest)
	}
	requested, err := netmap.NormalizeTags(req.RequestTags)
	if err != nil {
		return nil, fmt.Errorf("%w: requested tags: %v", controlclient.ErrBadRequest, err)
	}
	now := s.now().UTC()
	if err := s.checkNodeKeyProof(mk, req.Version, req.NodeKey, req.NodeKeyProof, now); err != nil {
		return nil, err
	}
	p := store.RegisterParams{
		MachineKey: mk, NodeKey: req.NodeKey, DiscoKey: req.DiscoKey,
		Hostname: sanitizeHostname(req.Hostname), OS: sanitizeOS(req.OS), Now: now,
	}
	// Held from the auth key check to the write, so an admin action on the
	// node cannot slip between a single-use key's retry check and the
	// registration it allows; and the policy is read under it, because a
	// policy swap (which re-checks tags nodes gave themselves) also holds
	// it: tags checked against the old policy cannot land after the swap.
	s.mu.Lock()
	defer s.mu.Unlock()
	pol := s.policy()
	if req.AuthKey != "" {
		key, retry, err := s.checkAuthKey(ctx, mk, req.AuthKey, now)
		if err != nil {
			return nil, err
		}
		if err := pol.CheckTags(key.User, key.Tags, requested); err != nil {
			return nil, fmt.Errorf("%w: %v", controlclient.ErrTagsForbidden, err)
		}
		tags := registrationTags(pol, key.Tags, requested)
		id := &store.Identity{
			Tags: tags, Ephemeral: key.Ephemeral, AuthKeyID: key.ID,
			Authorized: key.Preauthorized || !s.opts.RequireApproval,
		}
		if len(tags) == 0 {
			id.User = key.User
			id.KeyExpiry = now.Add(s.opts.NodeKeyExpiry)
		}
		// A retry does not use the key again: its first use stays the
		// start of the retry window.
		p.Identity, p.ConsumeKey, p.Reusable = id, !retry, key.Reusable
	} else if len(requested) > 0 {
		return nil, fmt.Errorf("%w: changing tags needs an auth key (or `meshd admin nodes tag`)", controlclient.ErrBadRequest)
	}

	var prev *store.Node // the node before a re-registration without a key
	if p.Identity == nil {
		old, err := s.store.NodeByMachine(ctx, mk)
		if errors.Is(err, store.ErrNotFound) {
			return nil, fmt.Errorf("%w: this machine is not enrolled: run meshd up with --authkey", controlclient.ErrNotRegistered)
		}
		if err != nil {
			return nil, err
		}
		if !old.KeyExpiry.IsZero() && !now.Before(old.KeyExpiry) {
			return nil, fmt.Errorf("%w: node %d's key expired at %s: re-authenticate with a new --authkey", controlclient.ErrNodeExpired, old.ID, old.KeyExpiry.Format(time.RFC3339))
		}
		if !req.OldNodeKey.IsZero() && req.OldNodeKey != old.NodeKey {
			return nil, fmt.Errorf("%w: old_node_key does not match the registered node key", controlclient.ErrBadRequest)
		}
		prev = &old
	}
	n, err := s.store.Register(ctx, p)
	if kerr, ok := errors.AsType[*store.KeyInUseError](err); ok {
		return nil, s.keyInUse(mk, kerr)
	}
	if errors.Is(err, store.ErrKeyUnusable) {
		// Lost a race for a single-use key, or it was revoked meanwhile.
		if k, kerr := s.store.AuthKey(ctx, p.Identity.AuthKeyID); kerr == nil && !k.Revoked.IsZero() {
			return nil, fmt.Errorf("%w: key %s was revoked", controlclient.ErrAuthKeyRevoked, k.ID)
		}
		return nil, fmt.Errorf("%w: key %s is single-use and another machine used it", controlclient.ErrAuthKeyUsed, p.Identity.AuthKeyID)
	}
	if err != nil {
		return nil, err
	}
	wn := n.Node
	if s.visible(n, now) {
		if cur := s.hub.get(n.ID); cur != nil {
			wn.Online = cur.Online
		}
		s.hub.upsertRouted(&wn, n.RoutesApproved)
	} else {
		s.hub.remove(n.ID, controlclient.ErrNotAuthorized)
	}
	if n.Ephemeral && !s.hub.online(n.ID) {
		// A node that registers but never opens a stream is cleaned up too.
		s.scheduleEphemeralLocked(n.ID)
	}
	if n.Hostname != p.Hostname {
		s.log.Info("hostname taken by another node; suffixed", "node", n.ID, "asked", p.Hostname, "hostname", n.Hostname)
	}
	s.log.Info("node registered", "node", n.ID, "hostname", n.Hostname, "user", n.User, "tags", n.Tags, "addrs", n.Addresses)
	actor := NodeActor(&n.Node)
	reg := struct {
		auditNodeView
		AuthKey string `json:"auth_key,omitempty"`
		NodeKey string `json:"node_key"`
	}{auditNode(&n), "", n.NodeKey.String()}
	if p.Identity != nil {
		reg.AuthKey = p.Identity.AuthKeyID
		if p.ConsumeKey {
			s.audit(ctx, &actor, AuditKeyUse, p.Identity.AuthKeyID, auditNode(&n))
		}
	}
	// A re-registration that changes nothing (a daemon restarting) is not
	// news, and a node repeating it must not grow the log.
	if prev == nil || prev.NodeKey != n.NodeKey || prev.Hostname != n.Hostname {
		s.audit(ctx, &actor, AuditNodeRegister, nodeTarget(n.ID), reg)
	}
	return &netmap.RegisterResponse{Node: wn, ServerKey: s.fingerprint}, nil
}

// authKeyRetryWindow is how long after its use a single-use key is
// accepted again from the machine that used it: long enough for a retry
// after a lost response, too short to be a credential.
const authKeyRetryWindow = 10 * time.Minute

// checkAuthKey validates an auth key's secret and state. A single-use key
// that this same machine used is accepted again (retry reports true) for a
// retry after a lost response, without being consumed twice: only within
// authKeyRetryWindow of its use, and only while no administrator has acted
// on the node since (expired, tagged, approved it; a deleted node has no
// record left), so the key cannot undo what an administrator did. s.mu
// held.
func (s *Server) checkAuthKey(ctx context.Context, mk netmap.MachinePublic, text string, now time.Time) (k store.AuthKey, retry bool, err error) {
	pk, err := controlclient.ParseAuthKey(text)
	if err != nil {
		return store.AuthKey{}, false, fmt.Errorf("%w: %v", controlclient.ErrAuthKeyUnknown, err)
	}
	if pk.Fingerprint != s.fingerprint {
		return store.AuthKey{}, false, fmt.Errorf("%w: the key was issued by a different coordinator (fingerprint %s..., this one is %s...)", controlclient.ErrAuthKeyUnknown, pk.Fingerprint[:12], s.fingerprint[:12])
	}
	k, err = s.store.AuthKey(ctx, pk.ID)
	if errors.Is(err, store.ErrNotFound) || err == nil && !hashEqual(k.Hash, hashSecret(pk.Secret)) {
		return k, false, fmt.Errorf("%w: no auth key %s on this coordinator", controlclient.ErrAuthKeyUnknown, pk.ID)
	}
	if err != nil {
		return k, false, err
	}
	switch {
	case !k.Revoked.IsZero():
		return k, false, fmt.Errorf("%w: key %s was revoked at %s", controlclient.ErrAuthKeyRevoked, k.ID, k.Revoked.Format(time.RFC3339))
	case !k.Expires.IsZero() && !now.Before(k.Expires):
		return k, false, fmt.Errorf("%w: key %s expired at %s", controlclient.ErrAuthKeyExpired, k.ID, k.Expires.Format(time.RFC3339))
	case !k.Reusable && k.Uses > 0:
		n, err := s.store.NodeByMachine(ctx, mk)
		if err == nil && n.AuthKeyID == k.ID && now.Sub(k.LastUsed) < authKeyRetryWindow &&
			(n.AdminActed.IsZero() || n.AdminActed.Before(k.LastUsed)) {
			return k, true, nil
		}
		return k, false, fmt.Errorf("%w: key %s is single-use and was used at %s (the machine that used it may retry only within %v, and not after an administrator acted on its node): create a new key",
			controlclient.ErrAuthKeyUsed, k.ID, k.LastUsed.Format(time.RFC3339), authKeyRetryWindow)
	}
	return k, false, nil
}

// nodeForMap loads the calling machine's node and checks it may use the map.
func (s *Server) nodeForMap(ctx context.Context, mk netmap.MachinePublic) (store.Node, error) {
	n, err := s.store.NodeByMachine(ctx, mk)
	if errors.Is(err, store.ErrNotFound) {
		return n, fmt.Errorf("%w: this machine is not enrolled (or was deleted): run meshd up with --authkey", controlclient.ErrNotRegistered)
	}
	if err != nil {
		return n, err
	}
	if !n.KeyExpiry.IsZero() && !s.now().Before(n.KeyExpiry) {
		return n, fmt.Errorf("%w: node %d's key expired at %s: re-authenticate with a new --authkey", controlclient.ErrNodeExpired, n.ID, n.KeyExpiry.Format(time.RFC3339))
	}
	if !n.Authorized {
		return n, fmt.Errorf("%w: node %d must be approved by an administrator: meshd admin nodes approve %d", controlclient.ErrNotAuthorized, n.ID, n.ID)
	}
	return n, nil
}

func validateMapRequest(req *netmap.MapRequest) error {
	if err := checkVersion(req.Version); err != nil {
		return err
	}
	if req.NodeKey.IsZero() {
		return fmt.Errorf("%w: node_key is missing", controlclient.ErrBadRequest)
	}
	if len(req.Endpoints) > maxEndpoints {
		return fmt.Errorf("%w: %d endpoints, at most %d", controlclient.ErrBadRequest, len(req.Endpoints), maxEndpoints)
	}
	for i, ep := range req.Endpoints {
		if !ep.IsValid() || ep.Port() == 0 || ep.Addr().IsUnspecified() {
			return fmt.Errorf("%w: endpoint %v is not a usable ip:port", controlclient.ErrBadRequest, ep)
		}
		req.Endpoints[i] = netip.AddrPortFrom(ep.Addr().Unmap(), ep.Port())
	}
	if req.HomeDERP < 0 {
		return fmt.Errorf("%w: home_derp %d is negative", controlclient.ErrBadRequest, req.HomeDERP)
	}
	if req.Hostinfo != nil {
		rs, err := netmap.CheckRoutableIPs(req.Hostinfo.RoutableIPs)
		if err != nil {
			return fmt.Errorf("%w: advertised routes: %v", controlclient.ErrBadRequest, err)
		}
		req.Hostinfo.RoutableIPs = rs
	}
	return nil
}

// applyMapRequest records what node sn (of machine mk, as read before
// the call) reports: endpoints, home DERP, disco key, a rotated node key.
// It returns the node. Empty fields keep the stored values, so a request
// that only opens a stream never erases what an Update reported. A key
// another node holds is refused and changes nothing.
func (s *Server) applyMapRequest(ctx context.Context, mk netmap.MachinePublic, sn store.Node, req *netmap.MapRequest) (store.Node, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	// The hub holds the live state (online) of visible nodes, whose keys
	// it always has as stored: most requests change nothing, and cost no
	// store access under the lock.
	cur := s.hub.get(sn.ID)
	if cur != nil && len(cur.AdvertisedRoutes) > 0 {
		s.hub.noteReport(sn.ID, s.now())
	}
	if cur != nil && sameReport(*cur, mergeReport(*cur, req)) {
		return sn, nil
	}
	// Something changes: start from the node as stored now, which also
	// knows nodes the hub does not show (one whose shared key a migration
	// cleared, until it proves its own again).
	sn, err := s.nodeForMap(ctx, mk)
	if err != nil {
		return sn, err
	}
	base := sn.Node
	base.Online = false
	if cur != nil {
		base = *cur
	}
	nn := mergeReport(base, req)
	prevKey := sn.NodeKey
	if nn.NodeKey != prevKey {
		if err := s.checkNodeKeyProof(mk, req.Version, nn.NodeKey, req.NodeKeyProof, s.now()); err != nil {
			return sn, err
		}
	}
	sn.Node.NodeKey, sn.Node.DiscoKey, sn.Node.Endpoints, sn.Node.HomeDERP = nn.NodeKey, nn.DiscoKey, nn.Endpoints, nn.HomeDERP
	if !slices.Equal(sn.Node.AdvertisedRoutes, nn.AdvertisedRoutes) {
		s.log.Info("node advertises routes", "node", sn.ID, "routes", nn.AdvertisedRoutes)
	}
	sn.Node.AdvertisedRoutes = nn.AdvertisedRoutes
	sn.Online = false
	if err := s.store.UpdateNode(ctx, sn); err != nil {
		if kerr, ok := errors.AsType[*store.KeyInUseError](err); ok {
			return sn, s.keyInUse(mk, kerr)
		}
		return sn, err
	}
	if nn.NodeKey != prevKey {
		s.log.Info("node key rotated", "node", sn.ID, "old", prevKey.ShortString(), "new", nn.NodeKey.ShortString())
		actor := NodeActor(&sn.Node)
		s.audit(ctx, &actor, AuditNodeKeyRotate, nodeTarget(sn.ID), auditChange{Before: prevKey.String(), After: nn.NodeKey.String()})
	}
	if cur != nil || s.visible(sn, s.now()) {
		s.hub.upsertRouted(&nn, sn.RoutesApproved)
	}
	return sn, nil
}

// mergeReport returns n with the non-empty fields req reports.
func mergeReport(n netmap.Node, req *netmap.MapRequest) netmap.Node {
	n.NodeKey = req.NodeKey
	if !req.DiscoKey.IsZero() {
		n.DiscoKey = req.DiscoKey
	}
	if len(req.Endpoints) > 0 {
		n.Endpoints = slices.Clone(req.Endpoints)
	}
	if req.HomeDERP != 0 {
		n.HomeDERP = req.HomeDERP
	}
	if req.Hostinfo != nil {
		n.AdvertisedRoutes = slices.Clone(req.Hostinfo.RoutableIPs)
		if len(n.AdvertisedRoutes) == 0 {
			n.AdvertisedRoutes = nil
		}
	}
	return n
}

// sameReport reports whether a and b agree on what map requests report.
func sameReport(a, b netmap.Node) bool {
	return a.NodeKey == b.NodeKey && a.DiscoKey == b.DiscoKey && a.HomeDERP == b.HomeDERP && slices.Equal(a.Endpoints, b.Endpoints) &&
		slices.Equal(a.AdvertisedRoutes, b.AdvertisedRoutes)
}

// keyInUse is the wire error for a key another node holds. The claimant
// learns which key, not which node holds it; the log says both, since
// outside a copied state dir only an impersonation attempt gets here.
func (s *Server) keyInUse(mk netmap.MachinePublic, kerr *store.KeyInUseError) error {
	s.log.Warn("refused a key another node holds", "machine", mk.String(), "kind", kerr.Kind, "key", kerr.Key, "holder", kerr.Holder)
	return fmt.Errorf("%w: %s %s is already held by another node: every node needs its own keys (was this state dir copied from another machine?)",
		controlclient.ErrKeyInUse, kerr.Kind, kerr.Key)
}

func (s *Server) handleMap(w http.ResponseWriter, r *http.Request) {
	mk, err := machineKey(r)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	var req netmap.MapRequest
	if err := decodeBody(r, &req); err != nil {
		s.writeError(w, r, err)
		return
	}
	if err := validateMapRequest(&req); err != nil {
		s.writeError(w, r, err)
		return
	}
	// Checked outside the lock first: unknown, expired and unapproved
	// machines are refused without waiting for it.
	sn, err := s.nodeForMap(r.Context(), mk)
	if err == nil || errors.Is(err, controlclient.ErrNotAuthorized) {
		// An enrolled machine key, approved or not, is an identity: its
		// connection may outlive the handshake deadline.
		connlimit.Authenticate(r.Context())
	}
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	if sn, err = s.applyMapRequest(r.Context(), mk, sn, &req); err != nil {
		s.writeError(w, r, err)
		return
	}
	if !req.Stream {
		writeJSON(w, http.StatusOK, struct{}{})
		return
	}
	s.stream(w, r, sn.ID, &req)
}

// stream serves one map session until the client goes away, the hub drops
// the session, or the coordinator closes.
func (s *Server) stream(w http.ResponseWriter, r *http.Request, id netmap.NodeID, req *netmap.MapRequest) {
	sess, first, err := s.hub.subscribe(id, req.Version, req.Since, req.Epoch, req.PeersDigest)
	if err != nil {
		s.writeError(w, r, fmt.Errorf("%w: node %d was removed", err, id))
		return
	}
	if r.TLS != nil && r.TLS.DidResume {
		s.hub.stats.tlsResumed.Add(1)
	} else {
		s.hub.stats.tlsFull.Add(1)
	}
	s.mu.Lock()
	s.cancelEphemeralLocked(id)
	s.mu.Unlock()
	if s.repl != nil {
		s.repl.streamOpened(id)
	}
	defer s.endSession(sess)

	frame, err := first.frame()
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "application/x-meshd-map-frames")
	w.Header().Set(controlclient.KeepAliveHeader, strconv.FormatInt(int64(s.opts.KeepAliveInterval/time.Millisecond), 10))
	w.WriteHeader(http.StatusOK)
	// The write deadline is set a quarter beyond writeTimeout and renewed
	// only once less than writeTimeout is left, so a stall is cut after
	// writeTimeout to 1.25 writeTimeout. Setting it per frame cost 3% of the
	// coordinator's CPU under churn, and per batch still 5%. It is renewed
	// every deadlineBytes too, so that a long backlog to a slow but live
	// reader is not cut short: writeTimeout bounds a stall, not a batch.
	const deadlineBytes = 256 << 10
	sinceDeadline := 0
	var renewAt time.Time
	setDeadline := func(now time.Time) {
		rc.SetWriteDeadline(now.Add(writeTimeout + writeTimeout/4))
		renewAt, sinceDeadline = now.Add(writeTimeout/4), 0
	}
	deadline := func() {
		if now := time.Now(); now.After(renewAt) {
			setDeadline(now)
		}
	}
	write := func(b []byte) bool {
		if sinceDeadline += len(b); sinceDeadline > deadlineBytes {
			setDeadline(time.Now())
		}
		_, err := w.Write(b)
		return err == nil
	}
	deadline()
	if !write(frame) || rc.Flush() != nil {
		return
	}
	frames := &s.hub.stats.frames
	s.log.Debug("map stream open", "node", id, "full", first.resp.Full, "version", first.resp.Version)
	ka := s.clock.NewTicker(s.opts.KeepAliveInterval)
	defer ka.Stop()
	var batch [][]byte
	for {
		select {
		case <-sess.q.ready:
			// Everything queued goes out in one flush.
			batch = sess.q.take(batch)
			deadline()
			for _, f := range batch {
				if !write(f) {
					return
				}
			}
			frames.Add(int64(len(batch)))
			clear(batch)
			if len(batch) == 0 {
				continue
			}
		case <-ka.C():
			deadline()
			if !write(s.hub.keepAlive) {
				return
			}
			frames.Add(1)
		case <-sess.dead:
			s.log.Info("map stream closed by coordinator", "node", id, "reason", sess.dropErr)
			return
		case <-r.Context().Done():
			return
		}
		if rc.Flush() != nil {
			return
		}
		s.hub.stats.writes.Add(1)
	}
}

func (s *Server) endSession(sess *session) {
	s.mu.Lock()
	defer s.mu.Unlock()
	off := s.hub.unsubscribe(sess)
	if s.repl != nil && !s.hub.online(sess.node) {
		s.repl.streamClosed(sess.node)
	}
	if off == nil {
		return
	}
	if sn, err := s.store.Node(s.ctx, off.ID); err == nil {
		sn.LastSeen = off.LastSeen
		if err := s.store.UpdateNode(s.ctx, sn); err != nil && !s.closed {
			s.log.Warn("record last seen", "node", off.ID, "err", err)
		}
	}
	if off.Ephemeral && !s.closed {
		s.scheduleEphemeralLocked(off.ID)
	}
}
