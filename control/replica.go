package control

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/control/store"
	"meshd.dev/meshd/internal/atomicfile"
	"meshd.dev/meshd/netmap"
	"meshd.dev/meshd/policy"
)

// Several coordinators ("replicas") can share one PostgreSQL database
// (docs/ha.md). What makes that work:
//
//   - The coordinator's identity is in the database, not in a state dir:
//     its Ed25519 key, the challenge key and the tailnet CA are claimed by
//     the first replica to start (ClaimMeta: the first writer wins, the
//     others adopt it), so every replica has one fingerprint and nodes
//     trust all of them. The admin token's hash is shared the same way.
//   - Every committed change to a node, the policy or a setting reaches
//     every replica through the database's change feed (LISTEN/NOTIFY,
//     store.Listener), and each applies it to its hub as if it had made
//     it: reload the row, compare, fan out the delta to its own streams.
//   - Which nodes hold a map stream where (online) lives in the replicas,
//     not the database: each announces its streams opening and closing,
//     a new replica asks the others to announce theirs, and a replica
//     whose database sessions are gone (killed) has its streams dropped.
//   - Registrations are serialised across replicas in the database
//     (store.Postgres), so single-use keys, addresses and hostnames stay
//     exactly-once.

// Settings that hold the shared identity.
const (
	metaCoordinatorKey = "coordinator_key_pem"
	metaChallengeKey   = "challenge_key_pem"
	metaCAPEM          = "ca_pem" // the CA key, then its certificate
)

// livenessInterval is how often a replica checks which others are still
// connected to the database, to drop the streams of one that died.
const livenessInterval = 3 * time.Second

// DefaultGoneGrace is how long the nodes that streamed from a replica that
// left the database keep their online flag before they are taken offline,
// unless they reappear on a survivor first. A replica's death says
// nothing of its nodes: they fail over within their reconnect backoff
// (1 s for meshd's client). Taking each offline at once and back online a
// moment later cost every peer two frames per node; at 10,000 nodes that
// was about half a million frames, which held the survivor's CPU and the
// failover itself up by seconds. A node that vanishes without closing its
// connection already shows online for up to DefaultDeadConnTimeout, so
// this is no new kind of staleness (docs/ha.md).
const DefaultGoneGrace = 30 * time.Second

// announceBatch bounds the node ids of one announcement (a notification
// carries at most 8,000 bytes).
const announceBatch = 400

func newReplicaName() string {
	var b [6]byte
	rand.Read(b[:])
	return "meshd-coordinator-" + hex.EncodeToString(b[:])
}

// openShared opens the PostgreSQL database (initialising an empty one)
// and claims or adopts the shared keys.
func openShared(ctx context.Context, opts ServerOptions, name string) (*store.Postgres, ed25519.PrivateKey, *challenger, error) {
	switch {
	case opts.InitState:
		return nil, nil, nil, errors.New("coordinator: --init-state does not apply to --db postgres://: a PostgreSQL database that is empty is initialised by the first start; to start over, create a new database (CREATE DATABASE) and point --db at it")
	case opts.NewCA:
		return nil, nil, nil, errors.New("coordinator: --new-ca is not supported with --db postgres:// yet: the CA is shared by every replica")
	}
	o := store.PostgresOptions{Name: name}
	st, err := store.OpenPostgres(ctx, opts.DBURL, addrPool{}, o)
	if errors.Is(err, store.ErrNoDatabase) {
		st, err = store.CreatePostgres(ctx, opts.DBURL, addrPool{}, o, nil)
		if err == nil {
			opts.Logger.Info("initialised the empty PostgreSQL database")
		}
	}
	if errors.Is(err, store.ErrNotMeshd) {
		return nil, nil, nil, &StateError{Msg: fmt.Sprintf("coordinator: refusing to start: %v. Check --db: it must name a database meshd created, or an empty one", err), Err: err}
	}
	if err != nil {
		return nil, nil, nil, fmt.Errorf("coordinator: %w", err)
	}
	// A coordinator.key in the state dir is offered as the tailnet's key
	// (and must be the one the database holds); otherwise a new one is.
	keyPath := filepath.Join(opts.StateDir, keyFile)
	local, err := os.ReadFile(keyPath)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		st.Close()
		return nil, nil, nil, fmt.Errorf("coordinator: %w", err)
	}
	key, err := claimKey(ctx, st, metaCoordinatorKey, "coordinator key", local, newEd25519, asEd25519)
	if err != nil {
		st.Close()
		return nil, nil, nil, err
	}
	if local != nil {
		if lk, err := parsePEMKey(local, "coordinator key "+keyPath, "", asEd25519); err != nil || !lk.Equal(key) {
			st.Close()
			return nil, nil, nil, &StateError{Msg: fmt.Sprintf("coordinator: refusing to start: %s is not the key of the tailnet in the database (every replica shares the database's key; nodes pin it): remove %s, or point --db at the database it belongs to", keyPath, keyPath), Err: ErrForeignDatabase}
		}
	}
	xk, err := claimKey(ctx, st, metaChallengeKey, "challenge key", nil, newX25519, asX25519)
	if err != nil {
		st.Close()
		return nil, nil, nil, err
	}
	chal, err := challengerFor(xk)
	if err != nil {
		st.Close()
		return nil, nil, nil, fmt.Errorf("coordinator: %w", err)
	}
	return st, key, chal, nil
}

// claimKey returns the private key stored under meta key k, storing offer
// (or a new key, if offer is nil) first if there is none.
func claimKey[K any](ctx context.Context, st *store.Postgres, k, what string, offer []byte, generate func() (crypto.PrivateKey, error), as func(crypto.PrivateKey) (K, bool)) (K, error) {
	var zero K
	if offer == nil {
		var err error
		if offer, err = newPEMKey(what, generate); err != nil {
			return zero, fmt.Errorf("coordinator: %w", err)
		}
	}
	stored, err := st.ClaimMeta(ctx, k, string(offer))
	if err != nil {
		return zero, fmt.Errorf("coordinator: %w", err)
	}
	key, err := parsePEMKey([]byte(stored), what+" in the database", "the database's setting "+k+" is damaged", as)
	if err != nil {
		return zero, &StateError{Msg: "coordinator: refusing to start: " + err.Error(), Err: store.ErrNotMeshd}
	}
	return key, nil
}

// claimOwner records fp as the database's coordinator, or checks that it
// is.
func claimOwner(ctx context.Context, st *store.Postgres, fp string) error {
	owner, err := st.ClaimMeta(ctx, metaOwner, fp)
	if err != nil {
		return fmt.Errorf("coordinator: %w", err)
	}
	if owner != fp {
		return &StateError{Msg: fmt.Sprintf("coordinator: refusing to start: %v: it records fingerprint %s, its stored key's is %s", ErrForeignDatabase, owner, fp), Err: ErrForeignDatabase}
	}
	return nil
}

// initSharedAdminToken makes sure the tailnet has an admin token. The
// first replica to start makes it and writes admin.token in its state
// dir; the others adopt its hash (the database holds only the hash), so
// the token from any replica's state dir works on every replica. A
// state dir's admin.token that is not the tailnet's is left alone and
// reported, never turned into a new token: that would lock out every
// administrator holding the current one.
func (s *Server) initSharedAdminToken(ctx context.Context) error {
	data, err := os.ReadFile(s.adminPath)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("coordinator: read admin token: %w", err)
	}
	tok := strings.TrimSpace(string(data))
	offer := controlclient.AdminTokenPrefix + "-" + randomSecret() + "-" + s.fingerprint
	stored, err := s.repl.db.ClaimMeta(ctx, metaAdminHash, hex.EncodeToString(hashSecret(offer)))
	if err != nil {
		return fmt.Errorf("coordinator: %w", err)
	}
	h, err := hex.DecodeString(stored)
	if err != nil || len(h) != sha256.Size {
		return fmt.Errorf("coordinator: the database's admin token hash is damaged")
	}
	s.adminHash.Store(&h)
	switch {
	case hashEqual(h, hashSecret(offer)):
		if err := atomicfile.Write(s.adminPath, []byte(offer+"\n"), 0o600); err != nil {
			return fmt.Errorf("coordinator: write admin token: %w", err)
		}
	case data == nil:
		s.log.Info("the admin token is the tailnet's, made by the replica that initialised the database; this state dir holds no copy", "path", s.adminPath)
	case !hashEqual(h, hashSecret(tok)):
		s.log.Warn("admin token file is not the tailnet's (the database holds another one's hash); it does not work on any replica", "path", s.adminPath)
	}
	return nil
}

// initSharedCA loads the tailnet CA from the database, the first replica
// making it. Its certificate is also written to the state dir (public),
// where `meshd coordinator` tells operators to find it.
func (s *Server) initSharedCA(ctx context.Context) error {
	suffix, now := s.opts.DNS.Suffix, s.now()
	offer, err := newCertAuthority(suffix, now)
	if err != nil {
		return fmt.Errorf("coordinator: %w", err)
	}
	kp, cp, err := offer.pemFiles()
	if err != nil {
		return fmt.Errorf("coordinator: %w", err)
	}
	stored, err := s.repl.db.ClaimMeta(ctx, metaCAPEM, string(kp)+string(cp))
	if err != nil {
		return fmt.Errorf("coordinator: %w", err)
	}
	keyBlock, rest := pem.Decode([]byte(stored))
	if keyBlock == nil {
		return &StateError{Msg: "coordinator: refusing to start: the tailnet CA in the database is damaged"}
	}
	ca, err := parseCertAuthority(pem.EncodeToMemory(keyBlock), rest)
	if err != nil {
		return &StateError{Msg: "coordinator: refusing to start: the tailnet CA in the database is unusable: " + err.Error()}
	}
	if err := ca.checkFor(suffix, now); err != nil {
		return &StateError{Msg: "coordinator: refusing to start: " + err.Error() + " (every replica must use the same --dns-suffix)"}
	}
	if fp, err := s.repl.db.ClaimMeta(ctx, metaCA, ca.fingerprint); err != nil {
		return fmt.Errorf("coordinator: record the tailnet CA: %w", err)
	} else if fp != ca.fingerprint {
		return &StateError{Msg: fmt.Sprintf("coordinator: refusing to start: the database records tailnet CA sha256 %s but holds %s", fp, ca.fingerprint)}
	}
	_, certPEM, _ := ca.pemFiles()
	if err := atomicfile.Write(filepath.Join(s.opts.StateDir, caCertFile), certPEM, 0o644); err != nil {
		return fmt.Errorf("coordinator: write %s: %w", caCertFile, err)
	}
	s.ca = ca
	return nil
}

// replication is a coordinator's part in a set of replicas.
type replication struct {
	s    *Server
	db   *store.Postgres
	name string // this replica's, its application_name in the database

	mu sync.Mutex // a leaf: nothing else is locked under it
	// remote is, per node, the other replicas it holds streams on.
	remote map[netmap.NodeID]map[string]bool
	// byReplica is the inverse of remote.
	byReplica map[string]map[netmap.NodeID]bool

	announce chan presence

	// started orders this replica's embedded relay among the others'
	// (replica_relay.go); own is that relay, nil when the replica runs
	// none; relays are the other replicas' embedded relays. Under mu.
	started int64
	own     *replicaRelay
	relays  map[string]replicaRelay

	// Node changes from the feed, coalesced: a burst (a fleet
	// reconnecting, churn) is loaded in one query per batch, and the
	// feed's connection is read on while a batch is applied.
	pendMu  sync.Mutex
	pending map[netmap.NodeID]bool
	kick    chan struct{}
}

// maxSyncBatch bounds the nodes loaded (under the server's lock) at once.
const maxSyncBatch = 512

// presence is a node's stream opening (on) or closing here.
type presence struct {
	id netmap.NodeID
	on bool
}

func newReplication(s *Server, db *store.Postgres, name string) *replication {
	return &replication{
		s: s, db: db, name: name,
		remote:    make(map[netmap.NodeID]map[string]bool),
		byReplica: make(map[string]map[netmap.NodeID]bool),
		announce:  make(chan presence, 4096),
		started:   s.clock.Now().UnixNano(),
		relays:    make(map[string]replicaRelay),
		pending:   make(map[netmap.NodeID]bool),
		kick:      make(chan struct{}, 1),
	}
}

// start follows the change feed, announces streams and watches the other
// replicas' liveness until the server closes.
func (r *replication) start(l *store.Listener) {
	s := r.s
	s.wg.Add(4)
	go func() {
		defer s.wg.Done()
		r.syncer()
	}()
	go func() {
		defer s.wg.Done()
		l.Run(s.ctx, r.apply, func(err error) { s.log.Warn("change feed", "err", err) })
	}()
	go func() {
		defer s.wg.Done()
		r.announcer()
	}()
	go func() {
		defer s.wg.Done()
		r.watchLiveness()
	}()
	r.hello()
}

// hello asks the other replicas to announce the streams they hold.
func (r *replication) hello() {
	if err := r.db.Announce(r.s.ctx, "h:"+r.name); err != nil && r.s.ctx.Err() == nil {
		r.s.log.Warn("change feed: announce", "err", err)
	}
}

// elsewhere reports whether node id holds a stream on another replica.
func (r *replication) elsewhere(id netmap.NodeID) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.remote[id]) > 0
}

// streamOpened and streamClosed queue the announcement of a node's
// stream here; the announcer sends them in batches, in order.
func (r *replication) streamOpened(id netmap.NodeID) { r.queue(presence{id, true}) }
func (r *replication) streamClosed(id netmap.NodeID) { r.queue(presence{id, false}) }

func (r *replication) queue(p presence) {
	select {
	case r.announce <- p:
	case <-r.s.ctx.Done():
	}
}

// announcer sends queued presence as "o:NAME:ID,ID" (streams opened) and
// "f:NAME:ID,..." (closed), a batch per run of one kind.
func (r *replication) announcer() {
	var batch []netmap.NodeID
	var on bool
	flush := func() {
		if len(batch) == 0 {
			return
		}
		kind := "f:"
		if on {
			kind = "o:"
		}
		msg := kind + r.name + ":" + joinIDs(batch)
		if err := r.db.Announce(r.s.ctx, msg); err != nil && r.s.ctx.Err() == nil {
			r.s.log.Warn("change feed: announce", "err", err)
		}
		batch = batch[:0]
	}
	for {
		select {
		case <-r.s.ctx.Done():
			return
		case p := <-r.announce:
			if len(batch) > 0 && p.on != on || len(batch) == announceBatch {
				flush()
			}
			on = p.on
			batch = append(batch, p.id)
			// Take whatever else is queued before sending.
			for more := true; more; {
				select {
				case p := <-r.announce:
					if p.on != on || len(batch) == announceBatch {
						flush()
					}
					on = p.on
					batch = append(batch, p.id)
				default:
					more = false
				}
			}
			flush()
		}
	}
}

func joinIDs(ids []netmap.NodeID) string {
	var b strings.Builder
	for i, id := range ids {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(strconv.FormatUint(uint64(id), 10))
	}
	return b.String()
}

// parseAnnouncement splits "K:NAME:ID,ID" (K is o or f) or "h:NAME".
// Announcements come from other replicas through the database; one that
// does not parse is ignored.
func parseAnnouncement(msg string) (kind byte, name string, ids []netmap.NodeID, err error) {
	if len(msg) < 3 || msg[1] != ':' {
		return 0, "", nil, fmt.Errorf("announcement %.40q: no kind", msg)
	}
	kind, rest := msg[0], msg[2:]
	switch kind {
	case 'h':
		if rest == "" {
			return 0, "", nil, fmt.Errorf("announcement %.40q: no name", msg)
		}
		return kind, rest, nil, nil
	case 'o', 'f':
	default:
		return 0, "", nil, fmt.Errorf("announcement %.40q: unknown kind", msg)
	}
	name, list, ok := strings.Cut(rest, ":")
	if !ok || name == "" || list == "" {
		return 0, "", nil, fmt.Errorf("announcement %.40q: want %c:NAME:IDS", msg, kind)
	}
	for f := range strings.SplitSeq(list, ",") {
		id, err := strconv.ParseUint(f, 10, 63)
		if err != nil || id == 0 {
			return 0, "", nil, fmt.Errorf("announcement %.40q: bad node id %q", msg, f)
		}
		ids = append(ids, netmap.NodeID(id))
	}
	return kind, name, ids, nil
}

// apply is the change feed's handler.
func (r *replication) apply(c store.Change) {
	s := r.s
	switch c.Kind {
	case store.ChangeNode:
		r.pendMu.Lock()
		r.pending[c.Node] = true
		r.pendMu.Unlock()
		select {
		case r.kick <- struct{}{}:
		default:
		}
	case store.ChangePolicy:
		s.syncPolicy()
	case store.ChangeMeta:
		switch c.Key {
		case metaAdminHash:
			s.syncAdminHash()
		case metaRelayHash:
			s.syncRelayHash()
		}
	case store.ChangeSSHApproved:
		s.sshWaiters.wake(c.Key)
	case store.ChangeAnnounce:
		if strings.HasPrefix(c.Msg, "r:") {
			r.relayAnnounced(c.Msg)
			return
		}
		r.presence(c.Msg)
	case store.ChangeResync:
		s.log.Info("change feed reconnected: reloading the tailnet from the database")
		s.syncAll()
		s.syncPolicy()
		s.syncAdminHash()
		s.syncRelayHash()
		s.sshWaiters.wakeAll()
		r.hello()
		r.reannounce()
	}
}

// presence applies another replica's announcement.
func (r *replication) presence(msg string) {
	kind, name, ids, err := parseAnnouncement(msg)
	if err != nil {
		r.s.log.Warn("change feed: ignored an announcement", "err", err)
		return
	}
	if name == r.name {
		return
	}
	switch kind {
	case 'h':
		r.reannounce()
	case 'o':
		r.mu.Lock()
		for _, id := range ids {
			if r.remote[id] == nil {
				r.remote[id] = make(map[string]bool)
			}
			r.remote[id][name] = true
			if r.byReplica[name] == nil {
				r.byReplica[name] = make(map[netmap.NodeID]bool)
			}
			r.byReplica[name][id] = true
		}
		r.mu.Unlock()
		for _, id := range ids {
			r.s.setOnline(id, true)
		}
	case 'f':
		r.mu.Lock()
		for _, id := range ids {
			delete(r.remote[id], name)
			if len(r.remote[id]) == 0 {
				delete(r.remote, id)
			}
			delete(r.byReplica[name], id)
		}
		r.mu.Unlock()
		for _, id := range ids {
			r.s.setOnline(id, false)
		}
	}
}

// syncer applies the node changes apply queued, in batches.
func (r *replication) syncer() {
	for {
		select {
		case <-r.s.ctx.Done():
			return
		case <-r.kick:
		}
		for {
			r.pendMu.Lock()
			batch := make([]netmap.NodeID, 0, min(len(r.pending), maxSyncBatch))
			for id := range r.pending {
				if len(batch) == maxSyncBatch {
					break
				}
				batch = append(batch, id)
				delete(r.pending, id)
			}
			r.pendMu.Unlock()
			if len(batch) == 0 {
				break
			}
			r.s.syncNodes(r.db, batch)
		}
	}
}

// reannounce announces this replica's embedded relay and every stream it
// holds.
func (r *replication) reannounce() {
	r.announceRelay()
	h := r.s.hub
	h.mu.Lock()
	ids := make([]netmap.NodeID, 0, len(h.sessions))
	for id := range h.sessions {
		ids = append(ids, id)
	}
	h.mu.Unlock()
	slices.Sort(ids)
	for _, id := range ids {
		r.streamOpened(id)
	}
}

// watchLiveness drops the streams of replicas that are no longer
// connected to the database (killed, or cut off from it): their nodes
// are offline unless they hold a stream elsewhere, which they will once
// they fail over.
func (r *replication) watchLiveness() {
	t := r.s.clock.NewTicker(livenessInterval)
	defer t.Stop()
	for {
		select {
		case <-r.s.ctx.Done():
			return
		case <-t.C():
		}
		live, err := r.db.LiveNames(r.s.ctx)
		if err != nil {
			if r.s.ctx.Err() == nil {
				r.s.log.Warn("check which replicas are alive", "err", err)
			}
			continue
		}
		r.mu.Lock()
		var gone []netmap.NodeID
		for name, ids := range r.byReplica {
			if live[name] {
				continue
			}
			r.s.log.Warn("replica is gone from the database: its map streams are dropped", "replica", name, "streams", len(ids))
			for id := range ids {
				delete(r.remote[id], name)
				if len(r.remote[id]) == 0 {
					delete(r.remote, id)
				}
				gone = append(gone, id)
			}
			delete(r.byReplica, name)
		}
		relaysGone := false
		for name := range r.relays {
			if !live[name] {
				r.s.log.Warn("replica is gone from the database: its embedded relay leaves the region", "replica", name)
				delete(r.relays, name)
				relaysGone = true
			}
		}
		r.mu.Unlock()
		if len(gone) > 0 {
			r.s.clock.AfterFunc(r.goneGrace(), func() {
				for _, id := range gone {
					r.s.setOnline(id, false) // no-op for the nodes that failed over
				}
			})
		}
		if relaysGone {
			r.refreshRelays()
		}
	}
}

func (r *replication) goneGrace() time.Duration {
	if g := r.s.opts.goneGrace; g > 0 {
		return g
	}
	return DefaultGoneGrace
}

// setOnline brings the hub's online flag of node id in line with where it
// holds streams, after another replica's announcement. A node going
// offline everywhere gets its ephemeral timer here too.
func (s *Server) setOnline(id netmap.NodeID, on bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	if !on && (s.hub.online(id) || s.repl.elsewhere(id)) {
		return
	}
	n := s.hub.get(id)
	if n == nil || n.Online == on {
		return
	}
	nn := *n
	nn.Online = on
	if !on {
		nn.LastSeen = s.now().UTC().Truncate(time.Second)
		if nn.Ephemeral {
			s.scheduleEphemeralLocked(id)
		}
	}
	s.hub.upsert(&nn)
}

// syncNodes applies nodes ids as stored to the hub: what another replica
// (or this one) committed, loaded in one query. A node the hub already
// shows as stored costs nothing more; one no longer stored leaves. The
// rows are read under s.mu: read outside it, a row could be older than
// what a local change under the lock has put in the hub meanwhile, and
// applying it would briefly undo that change.
func (s *Server) syncNodes(db *store.Postgres, ids []netmap.NodeID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	nodes, err := db.NodesByID(s.ctx, ids)
	if err != nil {
		if s.ctx.Err() == nil {
			s.log.Error("change feed: load nodes", "err", err)
		}
		return
	}
	found := make(map[netmap.NodeID]bool, len(nodes))
	for _, n := range nodes {
		found[n.ID] = true
		s.applyStoredLocked(n)
	}
	for _, id := range ids {
		if !found[id] {
			s.cancelEphemeralLocked(id)
			s.hub.remove(id, controlclient.ErrNotRegistered)
		}
	}
}

// applyStoredLocked puts stored node n in the hub (or takes it out).
// s.mu held.
func (s *Server) applyStoredLocked(n store.Node) {
	now := s.now()
	if !s.visible(n, now) {
		reason := controlclient.ErrNotAuthorized
		if !n.KeyExpiry.IsZero() && !now.Before(n.KeyExpiry) {
			reason = controlclient.ErrNodeExpired
		}
		s.hub.remove(n.ID, reason)
		return
	}
	wn := n.Node
	cur := s.hub.get(n.ID)
	if cur != nil {
		wn.Online = cur.Online
		wn.DNSName = cur.DNSName
		if reflect.DeepEqual(&wn, cur) {
			return
		}
	} else {
		wn.Online = s.hub.online(n.ID) || s.repl.elsewhere(n.ID)
	}
	s.hub.upsert(&wn)
	if n.Ephemeral && !wn.Online {
		s.scheduleEphemeralLocked(n.ID)
	}
}

// syncAll reloads every node after the change feed was interrupted.
func (s *Server) syncAll() {
	nodes, err := s.store.Nodes(s.ctx)
	if err != nil {
		if s.ctx.Err() == nil {
			s.log.Error("change feed: reload nodes", "err", err)
		}
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	stored := make(map[netmap.NodeID]bool, len(nodes))
	for _, n := range nodes {
		stored[n.ID] = true
		s.applyStoredLocked(n)
	}
	s.hub.mu.Lock()
	var gone []netmap.NodeID
	for id := range s.hub.nodes {
		if !stored[id] {
			gone = append(gone, id)
		}
	}
	s.hub.mu.Unlock()
	for _, id := range gone {
		s.hub.remove(id, controlclient.ErrNotRegistered)
	}
}

// syncPolicy puts the stored policy in force if it is not already: one
// another replica set.
func (s *Server) syncPolicy() {
	ctx := s.ctx
	st, err := s.store.Policy(ctx)
	if errors.Is(err, store.ErrNotFound) {
		return
	}
	if err != nil {
		if ctx.Err() == nil {
			s.log.Error("change feed: load policy", "err", err)
		}
		return
	}
	s.polMu.Lock()
	defer s.polMu.Unlock()
	sum := sha256.Sum256(st.Data)
	if cur := s.CurrentPolicy(); cur.SHA256 == hex.EncodeToString(sum[:]) && cur.File == st.File {
		return
	}
	p, err := parsePolicy(st.File, st.Data)
	if err != nil {
		// Another replica validated it; a build of this one that cannot
		// is older: keep what is in force and say so.
		s.log.Error("another replica stored a policy this one cannot parse; the previous policy stays in force here: upgrade this replica", "file", st.File, "err", err)
		return
	}
	info := infoFor(p, st.File, st.Data, st.Updated)
	if _, err := s.installPolicy(ctx, policy.NewEngine(p), info); err != nil {
		s.log.Error("policy from another replica in force, but re-checking tags failed", "err", err)
	}
	s.log.Info("policy set by another replica is in force", "file", st.File, "sha256", info.SHA256[:12])
}

// storedTokenHash loads a token hash (meta key) another replica stored;
// ok is false, and the reason logged, if it cannot be used.
func (s *Server) storedTokenHash(key, what string) (h []byte, ok bool) {
	v, err := s.store.Meta(s.ctx, key)
	if err != nil {
		if s.ctx.Err() == nil {
			s.log.Error("change feed: load "+what+" token hash", "err", err)
		}
		return nil, false
	}
	h, err = hex.DecodeString(v)
	if err != nil || len(h) != sha256.Size {
		s.log.Error("change feed: the database's " + what + " token hash is damaged; keeping the previous one")
		return nil, false
	}
	return h, true
}

// syncAdminHash takes the admin token hash from the database.
func (s *Server) syncAdminHash() {
	h, ok := s.storedTokenHash(metaAdminHash, "admin")
	if !ok {
		return
	}
	if old := s.adminHash.Load(); old == nil || !bytes.Equal(*old, h) {
		s.adminHash.Store(&h)
		s.log.Info("admin token changed by another replica")
	}
}
