// Package control is the coordinator: the node registry and its store, auth
// keys, the admin API, streaming network maps, and the client nodes use to
// talk to it.
//
// The control channel is TLS 1.3 with pinned keys and no CA: the
// coordinator serves a self-signed certificate for its long-term Ed25519 key,
// nodes pin its fingerprint (carried inside every auth key), and nodes prove
// their machine key with a self-signed client certificate. HTTP/2 over that
// connection carries the long-lived map stream and the other requests.
package control

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/control/store"
	"meshd.dev/meshd/internal/atomicfile"
	"meshd.dev/meshd/internal/clock"
	"meshd.dev/meshd/internal/connlimit"
	"meshd.dev/meshd/internal/tlspin"
	"meshd.dev/meshd/netmap"
)

// ServerOptions configures a coordinator.
type ServerOptions struct {
	// StateDir holds the coordinator key, the admin token and (by default)
	// the SQLite database. Created with mode 0700 if missing.
	StateDir string
	// DBURL selects the database: "" is SQLite in StateDir; "sqlite:PATH"
	// is SQLite elsewhere.
	DBURL  string
	Logger *slog.Logger
	// EphemeralTimeout is how long after its last map stream closes an
	// ephemeral node is deleted (default 5m).
	EphemeralTimeout time.Duration
	// KeepAliveInterval is the idle time after which a map stream carries a
	// keep-alive (default 20s).
	KeepAliveInterval time.Duration
	// DeadConnTimeout is how long data the coordinator sent may stay
	// unacknowledged before the kernel drops the connection
	// (TCP_USER_TIMEOUT, Linux; default DefaultDeadConnTimeout). With the
	// keep-alives it bounds how long a node that vanished without closing
	// its connection (power loss, a cut link) stays online.
	DeadConnTimeout time.Duration
	DERPMap         *netmap.DERPMap
	// DNS is the tailnet's name service. A zero Suffix means
	// netmap.DefaultDNSSuffix; nil SearchDomains mean just the suffix.
	DNS netmap.DNSConfig

	// NodeKeyExpiry is how long a user's node key is valid after it
	// registers (default 180 days). Tagged nodes never expire.
	NodeKeyExpiry time.Duration
	// RequireApproval makes nodes enrolled with keys that are not
	// pre-authorized wait for `meshd admin nodes approve`.
	RequireApproval bool
	// FilterDelay is how long the packet-filter updates that joins and
	// leaves cause may wait to be coalesced (default DefaultFilterDelay;
	// negative: none). Changes that can narrow access never wait.
	FilterDelay time.Duration
	// SessionQueueLen bounds the frames queued per map stream before a slow
	// reader is dropped (default 1024).
	SessionQueueLen int
	// SweepInterval is how often expired node keys are looked for
	// (default 30s).
	SweepInterval time.Duration
	// Policy, when non-nil, is the tailnet policy file to start with
	// (meshd coordinator --policy FILE): it must validate, it replaces the
	// stored policy and is stored. When nil the stored policy (the last one
	// set) is used, or the bootstrap default if none ever was.
	Policy []byte
	// PolicyFile names Policy in messages (its base name is used).
	PolicyFile string
	// Limits bound the connections of each listener passed to Serve:
	// per source address and in total, how long a connection may stay
	// unauthenticated (no request yet proved a registered machine key, a
	// valid auth key, the admin token or the relay token; no DERP
	// handshake), and how long a request header and body may take. Zero
	// fields take the connlimit defaults.
	Limits connlimit.Limits

	// clock is the time of every decision and schedule of the coordinator
	// (registration, key expiry and its sweep, ephemeral deletion,
	// keep-alives, timestamps): clock.Real unless a test moves it.
	// Socket deadlines stay on the wall clock.
	clock clock.Clock

	// InitState (meshd coordinator --init-state) re-initialises state that
	// cannot be used: a database that is missing, empty, not meshd's or
	// another coordinator's is moved aside (never deleted) and an empty
	// one is created, with a new admin token. Without it such a start is
	// refused, because a coordinator that quietly started over would hand
	// out a new admin token and the allow-all bootstrap policy. It refuses
	// to act on an intact database: it is a one-off operator action.
	InitState bool

	// NewCA (meshd coordinator --new-ca) replaces the tailnet CA: the old
	// ca.key and ca.crt are moved aside and a new CA is made. Every host
	// that trusted the old CA must then trust the new one. Without it a
	// start that finds the recorded CA missing, damaged or made for
	// another DNS suffix is refused.
	NewCA bool
	// certLifetime replaces DefaultCertLifetime, for tests.
	certLifetime time.Duration
	// goneGrace replaces DefaultGoneGrace, for tests.
	goneGrace time.Duration
}

// Server is a coordinator.
type Server struct {
	opts        ServerOptions
	log         *slog.Logger
	store       store.Store
	cert        tls.Certificate
	tlsConf     *tls.Config // see TLSConfig
	fingerprint string
	adminHash   atomic.Pointer[[]byte] // SHA-256 of the admin token
	// relayHash is the relay token's SHA-256, nil until EnableRelayVerify;
	// relayEpoch ends relay streams when it is rotated (tokens.go).
	relayHash  atomic.Pointer[[]byte]
	relayEpoch relayEpoch
	tokenMu    sync.Mutex // serialises token rotations
	adminPath  string
	hub        *hub
	keys       keyFeed     // revoked node keys, for relays
	chal       *challenger // issues node key challenges, checks proofs
	mux        *http.ServeMux
	ctx        context.Context
	cancel     context.CancelFunc
	wg         sync.WaitGroup
	clock      clock.Clock // see ServerOptions.clock

	// The tailnet CA (ca.go, cert.go) and how long its certificates last.
	ca           *certAuthority
	certLimit    *nodeLimiter
	certLifetime time.Duration

	polMu     sync.Mutex // serialises policy changes; taken before mu, never under it
	mu        sync.Mutex // serialises node mutations: store write, then hub
	ephemeral map[netmap.NodeID]clock.Timer
	servers   []*http.Server
	closed    bool
	polInfo   PolicyInfo // the policy file in force

	sshWaiters sshWaiters     // wait requests for check-mode SSH approvals (ssh.go)
	sshEnds    *nodeLimiter   // SSH session end reports (ssh.go)
	met        *serverMetrics // metrics.go
	// repl follows the other coordinators sharing a PostgreSQL database;
	// nil on SQLite.
	repl *replication
}

const (
	keyFile        = "coordinator.key"
	dbFile         = "coordinator.db"
	adminTokenFile = "admin.token"
	metaAdminHash  = "admin_token_sha256"
	// metaOwner is the fingerprint of the coordinator key the database was
	// made for; a database with another one is refused.
	metaOwner = "coordinator_fingerprint"

	maxRequestBody = 64 << 10
	maxEndpoints   = 64
	writeTimeout   = 30 * time.Second
)

// NewServer opens (or initialises) the coordinator state in opts.StateDir.
// On first start it creates the coordinator key and the admin token.
func NewServer(ctx context.Context, opts ServerOptions) (*Server, error) {
	if opts.StateDir == "" {
		return nil, errors.New("coordinator: --state-dir is required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.EphemeralTimeout <= 0 {
		opts.EphemeralTimeout = 5 * time.Minute
	}
	if opts.KeepAliveInterval <= 0 {
		opts.KeepAliveInterval = 20 * time.Second
	}
	if opts.DeadConnTimeout <= 0 {
		opts.DeadConnTimeout = DefaultDeadConnTimeout
	}
	if opts.NodeKeyExpiry <= 0 {
		opts.NodeKeyExpiry = 180 * 24 * time.Hour
	}
	if opts.SweepInterval <= 0 {
		opts.SweepInterval = 30 * time.Second
	}
	opts.clock = clock.Or(opts.clock)
	if err := opts.Limits.Validate(); err != nil {
		return nil, fmt.Errorf("coordinator: %w", err)
	}
	if opts.DERPMap != nil {
		if err := opts.DERPMap.Validate(); err != nil {
			return nil, fmt.Errorf("coordinator: %w", err)
		}
	}
	if opts.DNS.Suffix == "" {
		opts.DNS.Suffix = netmap.DefaultDNSSuffix
	}
	if opts.DNS.SearchDomains == nil {
		opts.DNS.SearchDomains = []string{opts.DNS.Suffix}
	}
	if err := opts.DNS.Validate(); err != nil {
		return nil, fmt.Errorf("coordinator: %w", err)
	}
	if err := os.MkdirAll(opts.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("coordinator state dir: %w", err)
	}
	var (
		st       store.Store
		key      ed25519.PrivateKey
		chal     *challenger
		dbPath   string
		shared   *store.Postgres
		replica  string
		listener *store.Listener
		err      error
	)
	if store.IsPostgresURL(opts.DBURL) {
		replica = newReplicaName()
		shared, key, chal, err = openShared(ctx, opts, replica)
		if err != nil {
			return nil, err
		}
		// Subscribed before anything is loaded: what other replicas
		// commit from now on reaches this one.
		listener, err = shared.Listen(ctx)
		if err != nil {
			shared.Close()
			return nil, fmt.Errorf("coordinator: %w", err)
		}
		st, dbPath = shared, "the PostgreSQL database"
	} else {
		st, key, chal, dbPath, err = openLocal(ctx, opts)
		if err != nil {
			return nil, err
		}
	}
	cert, err := tlspin.SelfSigned(key, "meshd coordinator", nil)
	if err != nil {
		st.Close()
		return nil, err
	}
	fp := tlspin.Fingerprint(cert.Leaf)
	if shared != nil {
		if err := claimOwner(ctx, shared, fp); err != nil {
			listener.Close()
			st.Close()
			return nil, err
		}
	}
	cleanup := func() {
		if listener != nil {
			listener.Close()
		}
		st.Close()
	}
	var epoch [8]byte
	rand.Read(epoch[:])
	s := &Server{
		opts:        opts,
		log:         opts.Logger,
		store:       st,
		cert:        cert,
		fingerprint: fp,
		adminPath:   filepath.Join(opts.StateDir, adminTokenFile),
		hub:         newHub(hex.EncodeToString(epoch[:]), opts.DERPMap, opts.SessionQueueLen, opts.clock.Now),
		ephemeral:   make(map[netmap.NodeID]clock.Timer),
		chal:        chal,
		clock:       opts.clock,

		certLifetime: opts.certLifetime,
		certLimit:    &nodeLimiter{every: certEvery, burst: certBurst},
		sshEnds:      &nodeLimiter{every: sshEndEvery, burst: sshEndBurst},
	}
	if shared != nil {
		s.repl = newReplication(s, shared, replica)
		s.hub.elsewhere = s.repl.elsewhere
	}
	if s.certLifetime <= 0 {
		s.certLifetime = DefaultCertLifetime
	}
	s.tlsConf = &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{s.cert},
		ClientAuth:   tls.RequestClientCert,
		NextProtos:   []string{"h2", "http/1.1"},
	}
	tickets, err := sessionTicketKeys(key, s.clock.Now())
	if err != nil {
		cleanup()
		return nil, fmt.Errorf("coordinator: %w", err)
	}
	s.tlsConf.SetSessionTicketKeys(tickets)
	s.hub.filterDelay = opts.FilterDelay
	if s.hub.filterDelay == 0 {
		s.hub.filterDelay = DefaultFilterDelay
	}
	s.hub.afterFunc = func(d time.Duration, f func()) { opts.clock.AfterFunc(d, f) }
	s.hub.announceDelay = DefaultAnnounceDelay
	s.hub.revoked = s.keys.publish
	s.hub.dns = opts.DNS
	s.met = newServerMetrics(s)
	s.hub.fanout = func(d time.Duration) { s.met.fanout.Observe(d.Seconds()) }
	if err := s.quarantineCorrupt(ctx, dbPath); err != nil {
		cleanup()
		return nil, err
	}
	if err := s.initAdminToken(ctx); err != nil {
		cleanup()
		return nil, err
	}
	if err := s.initCA(ctx); err != nil {
		cleanup()
		return nil, err
	}
	s.hub.tlsCA = s.ca.cert.Raw
	if err := s.loadNodes(ctx); err != nil {
		cleanup()
		return nil, err
	}
	if err := s.initPolicy(ctx); err != nil {
		cleanup()
		return nil, err
	}
	s.mux = http.NewServeMux()
	s.mux.HandleFunc("POST /machine/register", machineJSON(s, s.registerCounted))
	s.mux.HandleFunc("POST /machine/map", s.handleMap)
	s.mux.HandleFunc("POST "+controlclient.ChallengePath, s.handleChallenge)
	s.mux.HandleFunc("POST /machine/tags", machineJSON(s, s.setTags))
	s.mux.HandleFunc("POST "+controlclient.LogoutPath, machineJSON(s, s.logout))
	s.mux.HandleFunc("POST "+controlclient.CertPath, machineJSON(s, s.issueCert))
	s.mux.HandleFunc("GET "+DERPMapPath, s.handleDERPMap)
	s.sshRoutes()
	s.adminRoutes(s.mux)
	s.ctx, s.cancel = context.WithCancel(context.WithoutCancel(ctx))
	// Armed before NewServer returns, so that time a test moves from then
	// on is swept.
	sweep := s.clock.NewTicker(opts.SweepInterval)
	s.wg.Add(1)
	go s.sweep(sweep)
	routers := s.clock.NewTicker(routerCheck)
	s.wg.Add(1)
	go s.watchRouters(routers)
	ticketTick := s.clock.NewTicker(time.Minute)
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		rotateTicketKeys(s.tlsConf.SetSessionTicketKeys, key, s.clock, ticketTick, s.ctx.Done())
	}()
	if s.repl != nil {
		s.repl.start(listener)
	}
	return s, nil
}

// openLocal opens the SQLite state: the coordinator and challenge keys
// from the state dir, the database made on a first start.
func openLocal(ctx context.Context, opts ServerOptions) (store.Store, ed25519.PrivateKey, *challenger, string, error) {
	dbPath, err := sqlitePath(opts)
	if err != nil {
		return nil, nil, nil, "", err
	}
	keyPath := filepath.Join(opts.StateDir, keyFile)
	keyExisted, err := fileExists(keyPath)
	if err != nil {
		return nil, nil, nil, "", fmt.Errorf("coordinator key: %w", err)
	}
	if !keyExisted && !opts.InitState {
		// A database without its key is not a new tailnet: every node
		// pins the key. Check before a new key is written.
		if ok, err := fileExists(dbPath); err != nil || ok && nonEmpty(dbPath) {
			return nil, nil, nil, "", fmt.Errorf("coordinator: %s is missing but the database %s exists: restore %s from a backup (nodes pin its fingerprint); "+
				"to start a new, empty tailnet instead, start once with --init-state (it moves the database aside)", keyPath, dbPath, keyFile)
		}
	}
	key, err := loadOrCreateKey(keyPath)
	if err != nil {
		return nil, nil, nil, "", err
	}
	cert, err := tlspin.SelfSigned(key, "meshd coordinator", nil)
	if err != nil {
		return nil, nil, nil, "", err
	}
	chal, err := newChallenger(filepath.Join(opts.StateDir, challengeKeyFile))
	if err != nil {
		return nil, nil, nil, "", fmt.Errorf("coordinator: %w", err)
	}
	fp := tlspin.Fingerprint(cert.Leaf)
	st, err := openState(ctx, opts, dbPath, fp, keyExisted)
	if err != nil {
		return nil, nil, nil, "", err
	}
	return st, key, chal, dbPath, nil
}

// sqlitePath is where the database is, from --db.
func sqlitePath(opts ServerOptions) (string, error) {
	switch u := opts.DBURL; {
	case u == "":
		return filepath.Join(opts.StateDir, dbFile), nil
	case strings.HasPrefix(u, "sqlite:"):
		return strings.TrimPrefix(strings.TrimPrefix(u, "sqlite:"), "//"), nil
	default:
		return "", fmt.Errorf("coordinator: --db %q: want sqlite:PATH or postgres://... (or omit it for SQLite in --state-dir)", u)
	}
}

// ErrForeignDatabase is the start-up error for a database made for another
// coordinator key.
var ErrForeignDatabase = errors.New("the database belongs to another coordinator")

// openState opens the database, or creates it on a first start (no
// coordinator key before this start). State that cannot be this
// coordinator's is refused with what to do, unless opts.InitState says to
// move it aside and start over: a coordinator that quietly started over
// would issue a new admin token and serve the allow-all bootstrap policy
// to a tailnet that had a real one.
func openState(ctx context.Context, opts ServerOptions, path, fp string, keyExisted bool) (store.Store, error) {
	log := opts.Logger
	reinit := fmt.Sprintf("to start over with an empty tailnet under the same key instead (every node enrols again; a new admin token is issued), start once with --init-state, which moves %s aside", filepath.Base(path))
	st, err := store.OpenSQLite(ctx, path, addrPool{})
	var refuse, aside string // why the state is unusable; its moved-aside suffix
	switch {
	case errors.Is(err, store.ErrNoDatabase) && !keyExisted:
		// First start: a new key and a new database.
	case errors.Is(err, store.ErrNoDatabase):
		refuse = fmt.Sprintf("%v, but %s exists: this coordinator's state is gone. Restore the database from a backup (stop the coordinator, copy it back to %s, start again); %s",
			err, filepath.Join(opts.StateDir, keyFile), path, reinit)
		aside = "empty"
	case errors.Is(err, store.ErrNotMeshd):
		refuse = fmt.Sprintf("%v. Check --db and --state-dir, or restore the database from a backup; %s", err, reinit)
		aside = "unknown"
	case err != nil:
		return nil, fmt.Errorf("coordinator: %w", err)
	default:
		ferr := checkOwner(ctx, st, fp, opts.StateDir, log)
		switch {
		case ferr == nil && opts.InitState:
			st.Close()
			return nil, fmt.Errorf("coordinator: --init-state: the database %s is intact and belongs to this coordinator: refusing to discard it. Remove --init-state (move the database aside yourself if you really mean to start over)", path)
		case ferr == nil:
			return st, nil
		}
		st.Close()
		if !errors.Is(ferr, ErrForeignDatabase) {
			return nil, fmt.Errorf("coordinator: %s: %w", path, ferr)
		}
		refuse = fmt.Sprintf("%s: %v. Start with the coordinator.key the database was made with, or restore this coordinator's own database from a backup; %s", path, ferr, reinit)
		aside = "foreign"
		err = ferr
	}
	if refuse != "" && !opts.InitState {
		return nil, &StateError{Msg: "coordinator: refusing to start: " + refuse, Err: err}
	}
	if refuse == "" && err != nil {
		aside = "empty" // a first start over a zero-byte file: nothing in it to keep, but keep it anyway
	}
	if aside != "" {
		moved, merr := moveAside(path, aside, opts.clock.Now())
		if merr != nil {
			return nil, fmt.Errorf("coordinator: --init-state: %w", merr)
		}
		if moved != "" {
			log.Warn("moved the unusable database aside", "path", path, "moved_to", moved, "reason", aside)
		}
		if refuse != "" {
			log.Warn("--init-state: starting with an empty database: every node must enrol again, and a new admin token is issued", "path", path)
		}
	}
	st, err = store.CreateSQLite(ctx, path, addrPool{}, map[string]string{metaOwner: fp})
	if err != nil {
		return nil, fmt.Errorf("coordinator: %w", err)
	}
	for _, r := range st.Repairs() {
		opts.Logger.Warn("database repaired on upgrade: " + r)
	}
	return st, nil
}

// StateError is a start refused because the coordinator's state cannot be
// used as it is (missing, empty, foreign or not a meshd database). Msg
// says how to restore or re-initialise it.
type StateError struct {
	Msg string
	Err error // store.ErrNoDatabase, store.ErrNotMeshd or ErrForeignDatabase
}

func (e *StateError) Error() string { return e.Msg }
func (e *StateError) Unwrap() error { return e.Err }

// checkOwner makes sure the database was made for the key with fingerprint
// fp. A database from before the fingerprint was recorded is adopted if
// the admin token file (which carries the fingerprint) matches it, or if
// there is no token file to compare with.
func checkOwner(ctx context.Context, st store.Store, fp, stateDir string, log *slog.Logger) error {
	owner, err := st.Meta(ctx, metaOwner)
	switch {
	case err == nil && owner == fp:
		return nil
	case err == nil:
		return fmt.Errorf("%w: it was made for the coordinator key with fingerprint %s, this coordinator.key's is %s", ErrForeignDatabase, owner, fp)
	case !errors.Is(err, store.ErrNotFound):
		return err
	}
	tokPath := filepath.Join(stateDir, adminTokenFile)
	data, err := os.ReadFile(tokPath)
	switch {
	case errors.Is(err, os.ErrNotExist):
		log.Warn("the database records no coordinator fingerprint (made by an older meshd) and there is no admin token to check it against: adopting it", "fingerprint", fp)
	case err != nil:
		return fmt.Errorf("read admin token: %w", err)
	default:
		tok := strings.TrimSpace(string(data))
		want, merr := st.Meta(ctx, metaAdminHash)
		wb, _ := hex.DecodeString(want)
		tfp, _ := controlclient.AdminTokenFingerprint(tok)
		if merr != nil || !hashEqual(wb, hashSecret(tok)) || tfp != fp {
			return fmt.Errorf("%w: it records no coordinator fingerprint (made by an older meshd), and its admin token is not the one in %s for this key", ErrForeignDatabase, tokPath)
		}
	}
	if err := st.SetMeta(ctx, metaOwner, fp); err != nil {
		return err
	}
	log.Info("recorded the coordinator fingerprint in the database", "fingerprint", fp)
	return nil
}

// moveAside renames path (and its -wal and -shm) to path.why-TIME and
// returns the new name, or "" if there was nothing at path.
func moveAside(path, why string, now time.Time) (string, error) {
	ok, err := fileExists(path)
	if err != nil || !ok {
		return "", err
	}
	to := fmt.Sprintf("%s.%s-%s", path, why, now.UTC().Format("20060102T150405Z"))
	for _, sfx := range []string{"-wal", "-shm"} {
		if err := os.Rename(path+sfx, to+sfx); err != nil && !errors.Is(err, os.ErrNotExist) {
			return "", fmt.Errorf("move %s aside: %w", path+sfx, err)
		}
	}
	if err := os.Rename(path, to); err != nil {
		return "", fmt.Errorf("move %s aside: %w", path, err)
	}
	return to, nil
}

func fileExists(path string) (bool, error) {
	_, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	return err == nil, err
}

func nonEmpty(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && (fi.Size() > 0 || !fi.Mode().IsRegular())
}

// quarantineCorrupt moves rows that fail to decode or validate out of the
// way, each logged by name, so that the rest of the tailnet loads.
func (s *Server) quarantineCorrupt(ctx context.Context, dbPath string) error {
	qs, err := s.store.QuarantineCorrupt(ctx, s.now().UTC())
	if err != nil {
		return fmt.Errorf("coordinator: check the database for corrupt rows: %w", err)
	}
	for _, q := range qs {
		inspect := fmt.Sprintf("sqlite3 %s \"SELECT * FROM quarantine\"", dbPath)
		if s.repl != nil {
			inspect = "psql: SELECT * FROM quarantine"
		}
		s.log.Error("corrupt row moved to the quarantine table; the rest of the tailnet loads", "table", q.Source, "id", q.Key, "reason", q.Reason,
			"inspect", inspect)
	}
	return nil
}

// initAdminToken makes sure admin.token exists and matches the stored hash.
// Deleting the file and restarting rotates the token.
func (s *Server) initAdminToken(ctx context.Context) error {
	if s.repl != nil {
		return s.initSharedAdminToken(ctx)
	}
	data, err := os.ReadFile(s.adminPath)
	switch {
	case err == nil:
		tok := strings.TrimSpace(string(data))
		want, merr := s.store.Meta(ctx, metaAdminHash)
		if merr == nil {
			if wb, _ := hex.DecodeString(want); hashEqual(wb, hashSecret(tok)) {
				fp, _ := controlclient.AdminTokenFingerprint(tok)
				if fp != s.fingerprint {
					return fmt.Errorf("coordinator: %s carries fingerprint %s but the coordinator key is %s: delete %s to issue a new token", s.adminPath, fp, s.fingerprint, s.adminPath)
				}
				s.adminHash.Store(&wb)
				return nil
			}
		}
		s.log.Warn("admin token file does not match the database; issuing a new one", "path", s.adminPath)
	case !errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("coordinator: read admin token: %w", err)
	}
	tok := controlclient.AdminTokenPrefix + "-" + randomSecret() + "-" + s.fingerprint
	h := hashSecret(tok)
	s.adminHash.Store(&h)
	if err := s.store.SetMeta(ctx, metaAdminHash, hex.EncodeToString(h)); err != nil {
		return fmt.Errorf("coordinator: %w", err)
	}
	if err := atomicfile.Write(s.adminPath, []byte(tok+"\n"), 0o600); err != nil {
		return fmt.Errorf("coordinator: write admin token: %w", err)
	}
	return nil
}

// loadNodes fills the hub from the store after a (re)start. Every node
// starts offline; ephemeral ones get their cleanup timer now, since they may
// never come back.
func (s *Server) loadNodes(ctx context.Context) error {
	nodes, err := s.store.Nodes(ctx)
	if err != nil {
		return fmt.Errorf("coordinator: load nodes: %w", err)
	}
	now := s.now()
	for _, n := range nodes {
		if s.visible(n, now) {
			wn := n.Node
			wn.Online = false
			s.hub.upsertRouted(&wn, n.RoutesApproved)
		}
		if n.Ephemeral {
			s.scheduleEphemeralLocked(n.ID)
		}
	}
	return nil
}

// visible reports whether n belongs in maps: approved, not expired, and
// holding a node key (a migration clears keys that two nodes shared, until
// the genuine holder proves its key again).
func (s *Server) visible(n store.Node, now time.Time) bool {
	return n.Authorized && (n.KeyExpiry.IsZero() || now.Before(n.KeyExpiry)) && !n.NodeKey.IsZero()
}

// now is the coordinator's time.
func (s *Server) now() time.Time { return s.clock.Now() }

// Fingerprint is the coordinator's key fingerprint (hex SHA-256 of its
// certificate's SubjectPublicKeyInfo).
func (s *Server) Fingerprint() string { return s.fingerprint }

// AdminTokenPath is where the admin token was written.
func (s *Server) AdminTokenPath() string { return s.adminPath }

// Epoch identifies this run of the coordinator in map responses.
func (s *Server) Epoch() string { return s.hub.epoch }

// SetPolicy replaces the policy (nil restores the bootstrap default) and
// pushes visibility and packet-filter changes to connected nodes. It is the
// in-process seam and does not store the policy; ApplyPolicy is the stored,
// validated path that `meshd admin policy set` takes. Tags nodes gave
// themselves that their owners may not hold under p are removed (and that
// is stored), as with ApplyPolicy.
func (s *Server) SetPolicy(p Policy) {
	s.polMu.Lock()
	defer s.polMu.Unlock()
	info := bootstrapInfo()
	if p != nil {
		info = PolicyInfo{File: "(set in process, not stored)"}
	}
	if _, err := s.installPolicy(s.ctx, p, info); err != nil {
		s.log.Error("policy set in process, but re-checking the tags nodes gave themselves failed", "err", err)
	}
}

func (s *Server) policy() Policy {
	s.hub.mu.Lock()
	defer s.hub.mu.Unlock()
	return s.hub.policy
}

// TLSConfig returns the server side TLS configuration: TLS 1.3 only, the
// self-signed certificate, a request (not a requirement) for a client
// certificate, since admin clients authenticate with a bearer token
// instead (machine endpoints refuse requests without one), and session
// tickets every replica can resume (tickets.go). It is shared: do not
// modify it.
func (s *Server) TLSConfig() *tls.Config {
	return s.tlsConf
}

// Serve accepts connections on ln (plain TCP: Serve adds TLS) until Close,
// and then returns nil. The connection limits of ServerOptions.Limits
// apply to ln.
func (s *Server) Serve(ln net.Listener) error {
	lim := s.ConnLimits()
	srv := lim.Server(s.Handler())
	// net/http serves a clone of srv.TLSConfig, which would keep the
	// ticket keys of the day Serve was called: every handshake is handed
	// the live configuration instead, whose keys rotateTicketKeys turns.
	srv.TLSConfig = s.tlsConf.Clone()
	srv.TLSConfig.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) { return s.tlsConf, nil }
	srv.ErrorLog = slog.NewLogLogger(s.log.Handler(), slog.LevelDebug)
	srv.BaseContext = func(net.Listener) context.Context { return s.ctx }
	// A node that vanished without closing its connection must go
	// offline within a minute, not when TCP gives up (15 minutes of
	// retransmissions): HTTP/2 pings quiet request connections, and map
	// streams, HTTP/1.1 with a keep-alive every KeepAliveInterval, are
	// cut by the kernel once one stays unacknowledged for
	// DeadConnTimeout.
	srv.HTTP2 = &http.HTTP2Config{SendPingTimeout: 30 * time.Second, PingTimeout: 15 * time.Second}
	ln = lim.Listener(deadConnListener{Listener: ln, timeout: s.opts.DeadConnTimeout, log: s.log})
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ln.Close()
		return nil
	}
	s.servers = append(s.servers, srv)
	s.mu.Unlock()
	err := srv.ServeTLS(ln, "", "")
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// ConnLimits returns the connection limits of the coordinator's
// listeners, defaults filled in, for other listeners serving its parts
// (the embedded relay's --derp-listen).
func (s *Server) ConnLimits() connlimit.Limits {
	lim := s.opts.Limits
	lim.Name, lim.Logger = "coordinator", s.log
	if lim.Hint == "" {
		lim.Hint = "raise meshd coordinator --max-conns-per-ip / --max-conns"
	}
	return lim.WithDefaults()
}

// Close stops serving, ends every map stream and closes the store.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	for _, t := range s.ephemeral {
		t.Stop()
	}
	servers := s.servers
	s.mu.Unlock()
	s.cancel()
	for _, srv := range servers {
		// Close, not Shutdown: map streams never go idle by themselves.
		srv.Close()
	}
	s.wg.Wait()
	return s.store.Close()
}

// sweep removes nodes whose key expired from everyone's map at each tick
// of t, until the server closes.
func (s *Server) sweep(t clock.Ticker) {
	defer s.wg.Done()
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C():
			// The time read now, not the tick's: a tick that waited for a
			// busy sweep is stale.
			for _, id := range s.hub.expired(s.now()) {
				s.log.Info("node key expired", "node", id)
				s.hub.remove(id, controlclient.ErrNodeExpired)
			}
		}
	}
}

// scheduleEphemeralLocked (re)starts node id's deletion timer. s.mu held.
func (s *Server) scheduleEphemeralLocked(id netmap.NodeID) {
	if t := s.ephemeral[id]; t != nil {
		t.Stop()
	}
	s.ephemeral[id] = s.clock.AfterFunc(s.opts.EphemeralTimeout, func() { s.reapEphemeral(id) })
}

func (s *Server) cancelEphemeralLocked(id netmap.NodeID) {
	if t := s.ephemeral[id]; t != nil {
		t.Stop()
		delete(s.ephemeral, id)
	}
}

func (s *Server) reapEphemeral(id netmap.NodeID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.hub.online(id) || s.repl != nil && s.repl.elsewhere(id) {
		return
	}
	delete(s.ephemeral, id)
	if n, err := s.store.Node(s.ctx, id); err != nil || !n.Ephemeral {
		return // gone already, or re-enrolled with a non-ephemeral key
	}
	reason := map[string]string{"reason": "ephemeral node offline"}
	switch err := s.deleteNodeLocked(s.ctx, id, nil, reason); {
	case errors.Is(err, store.ErrNotFound):
		// Deleted from the store a moment ago (another replica): out of
		// this hub too.
		s.hub.remove(id, controlclient.ErrNotRegistered)
		s.audit(s.ctx, nil, AuditNodeDelete, nodeTarget(id), reason)
	case err != nil:
		s.log.Error("delete ephemeral node", "node", id, "err", err)
		return
	}
	s.log.Info("deleted ephemeral node after it went offline", "node", id, "timeout", s.opts.EphemeralTimeout)
}

// Handler returns the coordinator's HTTP API (machine and admin, and
// anything added with Handle), without the connection limits Serve adds.
func (s *Server) Handler() http.Handler { return s.mux }

// Handle serves another handler on the coordinator's listener, such as an
// embedded DERP relay on "/derp". Patterns follow http.ServeMux; call it
// before Serve or while serving (ServeMux is safe for concurrent use). A
// pattern that conflicts with the coordinator's own routes (/machine/...,
// /admin/...) panics, as ServeMux.Handle does: a programming error.
func (s *Server) Handle(pattern string, h http.Handler) { s.mux.Handle(pattern, h) }

// NodeKeyKnown reports whether k is the node key of a node currently in the
// tailnet (registered, authorized, not expired). An embedded DERP server
// uses it to serve only the tailnet's nodes.
func (s *Server) NodeKeyKnown(k netmap.NodePublic) bool { return s.hub.nodeKeyKnown(k) }

func (s *Server) writeError(w http.ResponseWriter, r *http.Request, err error) {
	code, status := controlclient.Code(err)
	msg := err.Error()
	if status == http.StatusInternalServerError {
		s.log.Error("request failed", "path", r.URL.Path, "err", err)
		msg = "internal coordinator error; see the coordinator log"
	} else {
		s.log.Debug("request refused", "path", r.URL.Path, "code", code, "err", err)
	}
	writeJSON(w, status, controlclient.ErrorBody{Error: msg, Code: code})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// decodeBody reads a small JSON request. How long the body may take is
// bounded for every request by connlimit.LimitBody (Serve), also when a
// handler returns without reading it.
func decodeBody(r *http.Request, v any) error {
	if err := netmap.DecodeJSON(io.LimitReader(r.Body, maxRequestBody+1), maxRequestBody, v); err != nil {
		return fmt.Errorf("%w: %v", controlclient.ErrBadRequest, err)
	}
	return nil
}
