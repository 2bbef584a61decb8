package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"time"

	"modernc.org/sqlite" // also registers the "sqlite" database/sql driver
	sqlite3 "modernc.org/sqlite/lib"

	"meshd.dev/meshd/netmap"
)

// migration is one schema step: SQL, or Go for steps that must look at
// the rows (repairs before a constraint can be added). fn returns what it
// repaired, in words, for the coordinator to log.
type migration struct {
	sql string
	fn  func(ctx context.Context, tx *sql.Tx) (repairs []string, err error)
}

// migrations are applied in order; each runs once, recorded in
// schema_migrations. Never edit a released migration: append a new one.
var migrations = []migration{
	{sql: `CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
	CREATE TABLE users (
		id INTEGER PRIMARY KEY AUTOINCREMENT,
		login TEXT NOT NULL UNIQUE,
		created INTEGER NOT NULL);
	CREATE TABLE auth_keys (
		id TEXT PRIMARY KEY,
		hash BLOB NOT NULL,
		reusable INTEGER NOT NULL,
		ephemeral INTEGER NOT NULL,
		preauthorized INTEGER NOT NULL,
		tags TEXT NOT NULL,
		user_login TEXT NOT NULL,
		created INTEGER NOT NULL,
		expires INTEGER NOT NULL,
		revoked INTEGER NOT NULL DEFAULT 0,
		last_used INTEGER NOT NULL DEFAULT 0,
		uses INTEGER NOT NULL DEFAULT 0);
	CREATE TABLE nodes (
		id INTEGER PRIMARY KEY AUTOINCREMENT,
		machine_key TEXT NOT NULL UNIQUE,
		ipv4 TEXT NOT NULL UNIQUE,
		data TEXT NOT NULL);`},
	// 2: the tailnet policy file in force, as its author wrote it (one row).
	{sql: `CREATE TABLE policy (
		id INTEGER PRIMARY KEY CHECK (id = 1),
		file TEXT NOT NULL,
		data BLOB NOT NULL,
		updated INTEGER NOT NULL);`},
	// 3: node key, disco key and hostname as indexed columns, each unique
	// (see unique.go).
	{fn: migrateUniqueIdentity},
	// 4: rows that failed to decode or validate, moved out of their table
	// so that one bad row does not stop the whole tailnet.
	{sql: `CREATE TABLE quarantine (
		id INTEGER PRIMARY KEY AUTOINCREMENT,
		source TEXT NOT NULL,
		row_key TEXT NOT NULL,
		data TEXT NOT NULL,
		reason TEXT NOT NULL,
		at INTEGER NOT NULL);`},
	// 5: self_tags, the tags a node asked for itself beyond its auth key's
	// (re-checked when a policy is set). Rows written before it cannot
	// tell those from tags an administrator applied with `admin nodes
	// tag`: every tag not on the node's auth key counts as asked for, so
	// it is re-checked rather than kept unchecked. Rows that are not valid
	// JSON are left for the quarantine check.
	{sql: `UPDATE nodes SET data = json_set(data, '$.self_tags', json((
		SELECT json_group_array(t.value) FROM json_each(nodes.data, '$.tags') AS t
		WHERE t.value NOT IN (
			SELECT k.value FROM auth_keys AS a,
				json_each(CASE WHEN json_valid(a.tags) AND json_type(a.tags) = 'array' THEN a.tags ELSE '[]' END) AS k
			WHERE a.id = json_extract(nodes.data, '$.auth_key_id')))))
	WHERE CASE WHEN json_valid(data) THEN json_type(data, '$.tags') = 'array' ELSE 0 END;`},
	// 6: the audit log (audit.go). Append-only: the triggers refuse any
	// change to a written row, whatever the code above them does.
	{sql: `CREATE TABLE audit (
		id INTEGER PRIMARY KEY AUTOINCREMENT,
		at INTEGER NOT NULL,
		actor TEXT NOT NULL,
		action TEXT NOT NULL,
		target TEXT NOT NULL,
		details TEXT NOT NULL);
	CREATE INDEX audit_at ON audit (at);
	CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
	CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;`},
}

// Errors of opening and creating a SQLite database.
var (
	// ErrNoDatabase: the file is missing or empty (zero bytes).
	ErrNoDatabase = errors.New("no database")
	// ErrNotMeshd: the file is not a SQLite database, or one without
	// meshd's schema.
	ErrNotMeshd = errors.New("not a meshd database")
)

// SQLite is the embedded single-file Store.
type SQLite struct {
	db    *sql.DB
	alloc AddrAllocator
	// repairs lists what opening the database changed to restore an
	// invariant an older version did not keep.
	repairs []string
}

// dbFileMode is the mode of the database file. SQLite gives its -wal and
// -shm files the database file's mode, whatever the umask.
const dbFileMode = 0o600

// OpenSQLite opens the existing database at path and migrates it to the
// current schema. It never creates one: a missing or empty file is
// ErrNoDatabase, and a file that is not a SQLite database with meshd's
// schema is ErrNotMeshd (and is left untouched). The file and its -wal and
// -shm companions are made mode 0600.
func OpenSQLite(ctx context.Context, path string, alloc AddrAllocator) (*SQLite, error) {
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("sqlite %s: %w: the file does not exist", path, ErrNoDatabase)
	case err != nil:
		return nil, fmt.Errorf("sqlite %s: %w", path, err)
	case !fi.Mode().IsRegular():
		return nil, fmt.Errorf("sqlite %s: %w: not a regular file", path, ErrNotMeshd)
	case fi.Size() == 0 && !nonEmpty(path+"-wal"):
		return nil, fmt.Errorf("sqlite %s: %w: the file is empty (0 bytes)", path, ErrNoDatabase)
	}
	// Look before writing anything: switching someone else's database to
	// WAL or migrating it would change it.
	probe, err := openSQLite(path, "ro", "", alloc)
	if err != nil {
		return nil, err
	}
	err = probe.checkSchema(ctx)
	probe.Close()
	if err != nil {
		return nil, fmt.Errorf("sqlite %s: %w", path, err)
	}
	// Databases made by earlier builds were 0644: they hold auth key and
	// admin token hashes, so tighten them (and their companions, which
	// SQLite makes with the database's mode).
	for _, p := range []string{path, path + "-wal", path + "-shm"} {
		if err := os.Chmod(p, dbFileMode); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("sqlite %s: %w", path, err)
		}
	}
	s, err := openSQLite(path, "rw", "WAL", alloc)
	if err != nil {
		return nil, err
	}
	if err := s.migrate(ctx); err != nil {
		s.Close()
		return nil, fmt.Errorf("sqlite %s: %w", path, err)
	}
	return s, nil
}

// CreateSQLite creates a database at path, which must not exist, with the
// current schema and the given settings (such as whose database it is).
// It is built under a temporary name and renamed into place when
// complete, so a crash never leaves a half-made database at path, and it
// is mode 0600 from the start whatever the umask.
func CreateSQLite(ctx context.Context, path string, alloc AddrAllocator, meta map[string]string) (*SQLite, error) {
	if _, err := os.Lstat(path); err == nil {
		return nil, fmt.Errorf("sqlite %s: already exists", path)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("sqlite %s: %w", path, err)
	}
	f, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".init-*")
	if err != nil {
		return nil, fmt.Errorf("create database: %w", err)
	}
	tmp := f.Name()
	err = f.Chmod(dbFileMode) // CreateTemp's 0600 is subject to the umask only downwards; be explicit
	f.Close()
	if err == nil {
		err = buildSQLite(ctx, tmp, alloc, meta)
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err == nil {
		err = syncDir(filepath.Dir(path))
	}
	if err != nil {
		os.Remove(tmp)
		os.Remove(tmp + "-journal")
		return nil, fmt.Errorf("create database %s: %w", path, err)
	}
	return OpenSQLite(ctx, path, alloc)
}

// buildSQLite writes the schema and meta into the empty file at path. It
// uses a rollback journal, not WAL, so that the finished database is one
// file to rename; OpenSQLite switches it to WAL.
func buildSQLite(ctx context.Context, path string, alloc AddrAllocator, meta map[string]string) error {
	s, err := openSQLite(path, "rw", "DELETE", alloc)
	if err != nil {
		return err
	}
	defer s.Close()
	if err := s.migrate(ctx); err != nil {
		return err
	}
	for k, v := range meta {
		if err := s.SetMeta(ctx, k, v); err != nil {
			return err
		}
	}
	return s.Close()
}

func openSQLite(path, mode, journal string, alloc AddrAllocator) (*SQLite, error) {
	q := url.Values{}
	// mode=rw: never create the file (a vanished database is an error,
	// not a fresh empty one).
	q.Set("mode", mode)
	if journal != "" {
		q.Add("_pragma", "journal_mode("+journal+")")
	}
	q.Add("_pragma", "busy_timeout(5000)")
	q.Add("_pragma", "foreign_keys(1)")
	q.Add("_pragma", "synchronous(NORMAL)")
	q.Set("_txlock", "immediate")
	db, err := sql.Open("sqlite", "file:"+path+"?"+q.Encode())
	if err != nil {
		return nil, fmt.Errorf("open sqlite %s: %w", path, err)
	}
	// One connection: SQLite serialises writers anyway, and a single
	// connection rules out SQLITE_BUSY between our own goroutines.
	db.SetMaxOpenConns(1)
	return &SQLite{db: db, alloc: alloc}, nil
}

// checkSchema refuses a file that is not a meshd database before anything
// is written to it: migrating someone else's database would add tables to it.
func (s *SQLite) checkSchema(ctx context.Context) error {
	var n int
	err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'`).Scan(&n)
	var se *sqlite.Error
	switch {
	case errors.As(err, &se) && (se.Code() == sqlite3.SQLITE_NOTADB || se.Code() == sqlite3.SQLITE_CORRUPT):
		return fmt.Errorf("%w: %v", ErrNotMeshd, err)
	case err != nil:
		return fmt.Errorf("read schema: %w", err)
	case n == 0:
		return fmt.Errorf("%w: it has no schema_migrations table", ErrNotMeshd)
	}
	return nil
}

func nonEmpty(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Size() > 0
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func (s *SQLite) migrate(ctx context.Context) error {
	if _, err := s.db.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied INTEGER NOT NULL)`); err != nil {
		return fmt.Errorf("create migrations table: %w", err)
	}
	var have int
	if err := s.db.QueryRowContext(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_migrations`).Scan(&have); err != nil {
		return fmt.Errorf("read schema version: %w", err)
	}
	if have > len(migrations) {
		return fmt.Errorf("database schema version %d is newer than this build's %d: upgrade meshd", have, len(migrations))
	}
	for v := have + 1; v <= len(migrations); v++ {
		m := migrations[v-1]
		err := s.tx(ctx, func(tx *sql.Tx) error {
			if m.sql != "" {
				if _, err := tx.ExecContext(ctx, m.sql); err != nil {
					return err
				}
			}
			if m.fn != nil {
				r, err := m.fn(ctx, tx)
				if err != nil {
					return err
				}
				s.repairs = append(s.repairs, r...)
			}
			_, err := tx.ExecContext(ctx, `INSERT INTO schema_migrations (version, applied) VALUES (?, ?)`, v, time.Now().Unix())
			return err
		})
		if err != nil {
			return fmt.Errorf("migration %d: %w", v, err)
		}
	}
	return nil
}

func (s *SQLite) tx(ctx context.Context, fn func(*sql.Tx) error) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		tx.Rollback()
		return err
	}
	return tx.Commit()
}

// Close closes the database.
func (s *SQLite) Close() error { return s.db.Close() }

func unixNano(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func fromUnixNano(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n).UTC()
}

// Meta implements Store.
func (s *SQLite) Meta(ctx context.Context, key string) (string, error) {
	var v string
	err := s.db.QueryRowContext(ctx, `SELECT value FROM meta WHERE key = ?`, key).Scan(&v)
	if errors.Is(err, sql.ErrNoRows) {
		return "", fmt.Errorf("setting %q: %w", key, ErrNotFound)
	}
	if err != nil {
		return "", fmt.Errorf("read setting %q: %w", key, err)
	}
	return v, nil
}

// SetMeta implements Store.
func (s *SQLite) SetMeta(ctx context.Context, key, value string) error {
	_, err := s.db.ExecContext(ctx, `INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value`, key, value)
	if err != nil {
		return fmt.Errorf("write setting %q: %w", key, err)
	}
	return nil
}

// EnsureUser implements Store.
func (s *SQLite) EnsureUser(ctx context.Context, login string, now time.Time) (User, error) {
	var u User
	err := s.tx(ctx, func(tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, `INSERT INTO users (login, created) VALUES (?, ?) ON CONFLICT(login) DO NOTHING`, login, unixNano(now)); err != nil {
			return err
		}
		var created int64
		if err := tx.QueryRowContext(ctx, `SELECT id, login, created FROM users WHERE login = ?`, login).Scan(&u.ID, &u.Login, &created); err != nil {
			return err
		}
		u.Created = fromUnixNano(created)
		return nil
	})
	if err != nil {
		return User{}, fmt.Errorf("user %q: %w", login, err)
	}
	return u, nil
}

// Users implements Store.
func (s *SQLite) Users(ctx context.Context) ([]User, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT id, login, created FROM users ORDER BY id`)
	if err != nil {
		return nil, fmt.Errorf("list users: %w", err)
	}
	defer rows.Close()
	var out []User
	for rows.Next() {
		var u User
		var created int64
		if err := rows.Scan(&u.ID, &u.Login, &created); err != nil {
			return nil, fmt.Errorf("list users: %w", err)
		}
		u.Created = fromUnixNano(created)
		out = append(out, u)
	}
	return out, rows.Err()
}

// InsertAuthKey implements Store.
func (s *SQLite) InsertAuthKey(ctx context.Context, k AuthKey) error {
	tags, err := json.Marshal(nonNil(k.Tags))
	if err != nil {
		return err
	}
	_, err = s.db.ExecContext(ctx, `INSERT INTO auth_keys (id, hash, reusable, ephemeral, preauthorized, tags, user_login, created, expires)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		k.ID, k.Hash, k.Reusable, k.Ephemeral, k.Preauthorized, string(tags), k.User, unixNano(k.Created), unixNano(k.Expires))
	if err != nil {
		return fmt.Errorf("insert auth key %s: %w", k.ID, err)
	}
	return nil
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

const authKeyCols = `id, hash, reusable, ephemeral, preauthorized, tags, user_login, created, expires, revoked, last_used, uses`

type scanner interface{ Scan(...any) error }

func scanAuthKey(r scanner) (AuthKey, error) {
	var k AuthKey
	var tags string
	var created, expires, revoked, lastUsed int64
	if err := r.Scan(&k.ID, &k.Hash, &k.Reusable, &k.Ephemeral, &k.Preauthorized, &tags, &k.User, &created, &expires, &revoked, &lastUsed, &k.Uses); err != nil {
		return k, err
	}
	if err := json.Unmarshal([]byte(tags), &k.Tags); err != nil {
		return k, fmt.Errorf("auth key %s: corrupt tags: %w", k.ID, err)
	}
	k.Created, k.Expires, k.Revoked, k.LastUsed = fromUnixNano(created), fromUnixNano(expires), fromUnixNano(revoked), fromUnixNano(lastUsed)
	return k, nil
}

// AuthKey implements Store.
func (s *SQLite) AuthKey(ctx context.Context, id string) (AuthKey, error) {
	k, err := scanAuthKey(s.db.QueryRowContext(ctx, `SELECT `+authKeyCols+` FROM auth_keys WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return k, fmt.Errorf("auth key %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return k, fmt.Errorf("read auth key %s: %w", id, err)
	}
	return k, nil
}

// AuthKeys implements Store.
func (s *SQLite) AuthKeys(ctx context.Context) ([]AuthKey, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT `+authKeyCols+` FROM auth_keys ORDER BY created, id`)
	if err != nil {
		return nil, fmt.Errorf("list auth keys: %w", err)
	}
	defer rows.Close()
	var out []AuthKey
	for rows.Next() {
		k, err := scanAuthKey(rows)
		if err != nil {
			return nil, fmt.Errorf("list auth keys: %w", err)
		}
		out = append(out, k)
	}
	return out, rows.Err()
}

// RevokeAuthKey implements Store.
func (s *SQLite) RevokeAuthKey(ctx context.Context, id string, now time.Time) error {
	res, err := s.db.ExecContext(ctx, `UPDATE auth_keys SET revoked = ? WHERE id = ? AND revoked = 0`, unixNano(now), id)
	if err != nil {
		return fmt.Errorf("revoke auth key %s: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		if _, err := s.AuthKey(ctx, id); err != nil {
			return err
		}
		// Already revoked: revoking is idempotent.
	}
	return nil
}

// Register implements Store.
func (s *SQLite) Register(ctx context.Context, p RegisterParams) (Node, error) {
	var out Node
	err := s.tx(ctx, func(tx *sql.Tx) error {
		if p.ConsumeKey && p.Identity != nil {
			cond := `AND last_used = 0`
			if p.Reusable {
				cond = ``
			}
			res, err := tx.ExecContext(ctx, `UPDATE auth_keys SET last_used = ?, uses = uses + 1 WHERE id = ? AND revoked = 0 `+cond,
				unixNano(p.Now), p.Identity.AuthKeyID)
			if err != nil {
				return fmt.Errorf("consume auth key: %w", err)
			}
			if n, err := res.RowsAffected(); err != nil {
				return err
			} else if n != 1 {
				return fmt.Errorf("auth key %s: %w", p.Identity.AuthKeyID, ErrKeyUnusable)
			}
		}
		n, err := nodeByMachine(ctx, tx, p.MachineKey)
		switch {
		case errors.Is(err, ErrNotFound):
			if p.Identity == nil {
				return fmt.Errorf("machine %s: %w", p.MachineKey, ErrNotFound)
			}
			n = Node{Node: netmap.Node{MachineKey: p.MachineKey, Created: p.Now}}
			v4, err := s.allocate(ctx, tx)
			if err != nil {
				return err
			}
			n.Addresses = s.alloc.Addresses(v4)
			n.AllowedIPs = n.Addresses
		case err != nil:
			return err
		}
		n.NodeKey, n.DiscoKey, n.LastSeen = p.NodeKey, p.DiscoKey, p.Now
		if p.OS != "" {
			n.OS = p.OS
		}
		if p.Hostname != "" || n.Hostname == "" {
			if n.Hostname, err = freeHostname(ctx, tx, p.Hostname, n.ID); err != nil {
				return err
			}
		}
		if id := p.Identity; id != nil {
			n.User, n.Tags, n.Ephemeral, n.Authorized, n.KeyExpiry, n.AuthKeyID = id.User, id.Tags, id.Ephemeral, id.Authorized, id.KeyExpiry, id.AuthKeyID
			if n.SelfTags, err = selfTags(ctx, tx, id); err != nil {
				return err
			}
			n.Notices = nil // a new identity: what was said about the old one is moot
		}
		if err := checkKeysFree(ctx, tx, n); err != nil {
			return err
		}
		if n.ID == 0 {
			res, err := tx.ExecContext(ctx, `INSERT INTO nodes (machine_key, ipv4, data) VALUES (?, ?, '{}')`,
				n.MachineKey.String(), n.Addresses[0].Addr().String())
			if err != nil {
				return fmt.Errorf("insert node: %w", err)
			}
			id, err := res.LastInsertId()
			if err != nil {
				return err
			}
			// The id is only known after the insert; writeNode stores it
			// in data too.
			n.ID = netmap.NodeID(id)
		}
		if err := writeNode(ctx, tx, n); err != nil {
			return err
		}
		out = n
		return nil
	})
	if err != nil {
		return Node{}, fmt.Errorf("register %s: %w", p.MachineKey, err)
	}
	return out, nil
}

// selfTags returns the tags of id that its auth key does not carry: those
// the node asked for. Worked out here, from the key row, rather than taken
// from the caller, so that every registration path records them.
func selfTags(ctx context.Context, tx *sql.Tx, id *Identity) ([]string, error) {
	var keyTags []string
	if id.AuthKeyID != "" {
		k, err := scanAuthKey(tx.QueryRowContext(ctx, `SELECT `+authKeyCols+` FROM auth_keys WHERE id = ?`, id.AuthKeyID))
		switch {
		case errors.Is(err, sql.ErrNoRows):
			// No key to credit: every tag counts as asked for.
		case err != nil:
			return nil, fmt.Errorf("auth key %s: %w", id.AuthKeyID, err)
		default:
			keyTags = k.Tags
		}
	}
	var out []string
	for _, t := range id.Tags {
		if !slices.Contains(keyTags, t) {
			out = append(out, t)
		}
	}
	return out, nil
}

// allocate finds a free IPv4 after the last one handed out, so addresses of
// deleted nodes are reused only after the pool wraps around.
func (s *SQLite) allocate(ctx context.Context, tx *sql.Tx) (netip.Addr, error) {
	var last netip.Addr
	var lastText string
	err := tx.QueryRowContext(ctx, `SELECT value FROM meta WHERE key = 'last_ipv4'`).Scan(&lastText)
	switch {
	case errors.Is(err, sql.ErrNoRows):
	case err != nil:
		return last, err
	default:
		last, _ = netip.ParseAddr(lastText) // invalid restarts at the pool's start
	}
	cand := last
	for range s.alloc.Size() {
		cand = s.alloc.Next(cand)
		var one int
		err := tx.QueryRowContext(ctx, `SELECT 1 FROM nodes WHERE ipv4 = ?`, cand.String()).Scan(&one)
		if errors.Is(err, sql.ErrNoRows) {
			_, err := tx.ExecContext(ctx, `INSERT INTO meta (key, value) VALUES ('last_ipv4', ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value`, cand.String())
			return cand, err
		}
		if err != nil {
			return cand, err
		}
	}
	return netip.Addr{}, ErrPoolExhausted
}

func nodeByMachine(ctx context.Context, q interface {
	QueryRowContext(context.Context, string, ...any) *sql.Row
}, mk netmap.MachinePublic) (Node, error) {
	var data string
	err := q.QueryRowContext(ctx, `SELECT data FROM nodes WHERE machine_key = ?`, mk.String()).Scan(&data)
	if errors.Is(err, sql.ErrNoRows) {
		return Node{}, fmt.Errorf("machine %s: %w", mk, ErrNotFound)
	}
	if err != nil {
		return Node{}, err
	}
	return decodeNode(data)
}

func decodeNode(data string) (Node, error) {
	var n Node
	if err := json.Unmarshal([]byte(data), &n); err != nil {
		return n, fmt.Errorf("corrupt node record: %w", err)
	}
	return n, nil
}

// validID reports whether id fits SQLite's signed 64-bit integers; larger
// ids cannot exist.
func validID(id netmap.NodeID) bool { return id > 0 && id <= math.MaxInt64 }

// Node implements Store.
func (s *SQLite) Node(ctx context.Context, id netmap.NodeID) (Node, error) {
	if !validID(id) {
		return Node{}, fmt.Errorf("node %d: %w", id, ErrNotFound)
	}
	var data string
	err := s.db.QueryRowContext(ctx, `SELECT data FROM nodes WHERE id = ?`, id).Scan(&data)
	if errors.Is(err, sql.ErrNoRows) {
		return Node{}, fmt.Errorf("node %d: %w", id, ErrNotFound)
	}
	if err != nil {
		return Node{}, fmt.Errorf("read node %d: %w", id, err)
	}
	return decodeNode(data)
}

// NodeByMachine implements Store.
func (s *SQLite) NodeByMachine(ctx context.Context, mk netmap.MachinePublic) (Node, error) {
	return nodeByMachine(ctx, s.db, mk)
}

// Nodes implements Store.
func (s *SQLite) Nodes(ctx context.Context) ([]Node, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT data FROM nodes ORDER BY id`)
	if err != nil {
		return nil, fmt.Errorf("list nodes: %w", err)
	}
	defer rows.Close()
	var out []Node
	for rows.Next() {
		var data string
		if err := rows.Scan(&data); err != nil {
			return nil, fmt.Errorf("list nodes: %w", err)
		}
		n, err := decodeNode(data)
		if err != nil {
			return nil, err
		}
		out = append(out, n)
	}
	return out, rows.Err()
}

// validNode checks a decoded node row against its columns and the wire
// rules its map entry must pass (a node that fails them would make every
// peer reject its map).
func validNode(n *Node, id int64, machineKey, ipv4 string) error {
	if int64(n.ID) != id {
		return fmt.Errorf("data says node %d", n.ID)
	}
	if n.MachineKey.IsZero() || n.MachineKey.String() != machineKey {
		return fmt.Errorf("machine key %s does not match the row's %s", n.MachineKey, machineKey)
	}
	if len(n.Addresses) == 0 || n.Addresses[0].Addr().String() != ipv4 {
		return fmt.Errorf("addresses %v do not start with the row's %s", n.Addresses, ipv4)
	}
	v := n.Node
	if v.NodeKey.IsZero() {
		// No node key is a state, not corruption: the uniqueness repair
		// cleared a key two nodes held, and the node stays out of every
		// map until it proves a key of its own. Check the rest.
		v.NodeKey = netmap.NodePublic{1}
	}
	return v.Validate()
}

// QuarantineCorrupt implements Store.
func (s *SQLite) QuarantineCorrupt(ctx context.Context, now time.Time) ([]Quarantined, error) {
	var out []Quarantined
	err := s.tx(ctx, func(tx *sql.Tx) error {
		type bad struct {
			q    Quarantined
			key  any // the row's id, typed as its column
			data string
		}
		var bads []bad
		rows, err := tx.QueryContext(ctx, `SELECT id, machine_key, ipv4, data FROM nodes ORDER BY id`)
		if err != nil {
			return fmt.Errorf("scan nodes: %w", err)
		}
		for rows.Next() {
			var id int64
			var mk, v4, data string
			if err := rows.Scan(&id, &mk, &v4, &data); err != nil {
				rows.Close()
				return fmt.Errorf("scan nodes: %w", err)
			}
			n, err := decodeNode(data)
			if err == nil {
				err = validNode(&n, id, mk, v4)
			}
			if err != nil {
				bads = append(bads, bad{Quarantined{"nodes", fmt.Sprint(id), err.Error()}, id, data})
			}
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return fmt.Errorf("scan nodes: %w", err)
		}
		// Keys one by one: a row whose columns do not even scan must still
		// be named by its id.
		var keyIDs []string
		krows, err := tx.QueryContext(ctx, `SELECT id FROM auth_keys ORDER BY id`)
		if err != nil {
			return fmt.Errorf("scan auth keys: %w", err)
		}
		for krows.Next() {
			var id string
			if err := krows.Scan(&id); err != nil {
				krows.Close()
				return fmt.Errorf("scan auth keys: %w", err)
			}
			keyIDs = append(keyIDs, id)
		}
		krows.Close()
		if err := krows.Err(); err != nil {
			return fmt.Errorf("scan auth keys: %w", err)
		}
		for _, id := range keyIDs {
			k, err := scanAuthKey(tx.QueryRowContext(ctx, `SELECT `+authKeyCols+` FROM auth_keys WHERE id = ?`, id))
			if err == nil && len(k.Hash) != 32 {
				err = fmt.Errorf("secret hash is %d bytes, want 32", len(k.Hash))
			}
			if err == nil {
				_, err = netmap.NormalizeTags(k.Tags)
			}
			if err != nil {
				var data string
				tx.QueryRowContext(ctx, `SELECT json_object('hash', hex(hash), 'reusable', reusable, 'ephemeral', ephemeral, 'preauthorized', preauthorized,
					'tags', CAST(tags AS TEXT), 'user_login', user_login, 'created', created, 'expires', expires, 'revoked', revoked, 'last_used', last_used, 'uses', uses)
					FROM auth_keys WHERE id = ?`, id).Scan(&data)
				bads = append(bads, bad{Quarantined{"auth_keys", id, err.Error()}, id, data})
			}
		}
		for _, b := range bads {
			if _, err := tx.ExecContext(ctx, `INSERT INTO quarantine (source, row_key, data, reason, at) VALUES (?, ?, ?, ?, ?)`,
				b.q.Source, b.q.Key, b.data, b.q.Reason, unixNano(now)); err != nil {
				return fmt.Errorf("quarantine %s %s: %w", b.q.Source, b.q.Key, err)
			}
			if _, err := tx.ExecContext(ctx, `DELETE FROM `+b.q.Source+` WHERE id = ?`, b.key); err != nil {
				return fmt.Errorf("quarantine %s %s: %w", b.q.Source, b.q.Key, err)
			}
			out = append(out, b.q)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// UpdateNode implements Store.
func (s *SQLite) UpdateNode(ctx context.Context, n Node) error {
	if !validID(n.ID) {
		return fmt.Errorf("node %d: %w", n.ID, ErrNotFound)
	}
	err := s.tx(ctx, func(tx *sql.Tx) error {
		var data string
		if err := tx.QueryRowContext(ctx, `SELECT data FROM nodes WHERE id = ?`, n.ID).Scan(&data); errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("node %d: %w", n.ID, ErrNotFound)
		} else if err != nil {
			return err
		}
		old, err := decodeNode(data)
		if err != nil {
			return err
		}
		// Identity columns never change through an update.
		n.MachineKey, n.Addresses, n.Created = old.MachineKey, old.Addresses, old.Created
		if err := checkKeysFree(ctx, tx, n); err != nil {
			return err
		}
		if err := checkHostnameFree(ctx, tx, n); err != nil {
			return err
		}
		return writeNode(ctx, tx, n)
	})
	if err != nil {
		return fmt.Errorf("update node %d: %w", n.ID, err)
	}
	return nil
}

// DeleteNode implements Store.
func (s *SQLite) DeleteNode(ctx context.Context, id netmap.NodeID) error {
	if !validID(id) {
		return fmt.Errorf("node %d: %w", id, ErrNotFound)
	}
	res, err := s.db.ExecContext(ctx, `DELETE FROM nodes WHERE id = ?`, id)
	if err != nil {
		return fmt.Errorf("delete node %d: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("node %d: %w", id, ErrNotFound)
	}
	return nil
}

var _ Store = (*SQLite)(nil)
