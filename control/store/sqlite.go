package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"net/url"
	"time"

	"meshd.dev/meshd/netmap"

	_ "modernc.org/sqlite" // registers the "sqlite" database/sql driver
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
}

// SQLite is the embedded single-file Store.
type SQLite struct {
	db    *sql.DB
	alloc AddrAllocator
	// repairs lists what opening the database changed to restore an
	// invariant an older version did not keep.
	repairs []string
}

// OpenSQLite opens (creating if needed) the database at path and migrates
// it to the current schema.
func OpenSQLite(ctx context.Context, path string, alloc AddrAllocator) (*SQLite, error) {
	q := url.Values{}
	q.Add("_pragma", "journal_mode(WAL)")
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
	s := &SQLite{db: db, alloc: alloc}
	if err := s.migrate(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("sqlite %s: %w", path, err)
	}
	return s, nil
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
		if p.Hostname != "" || n.Hostname == "" {
			if n.Hostname, err = freeHostname(ctx, tx, p.Hostname, n.ID); err != nil {
				return err
			}
		}
		if id := p.Identity; id != nil {
			n.User, n.Tags, n.Ephemeral, n.Authorized, n.KeyExpiry, n.AuthKeyID = id.User, id.Tags, id.Ephemeral, id.Authorized, id.KeyExpiry, id.AuthKeyID
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
