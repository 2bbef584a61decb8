package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"slices"
	"time"

	"meshd.dev/meshd/netmap"
)

// sqlStore is the Store over database/sql shared by SQLite and
// PostgreSQL: one set of queries, written with ? placeholders and the SQL
// both understand, so that the two behave alike. What differs is in the
// dialect.
type sqlStore struct {
	db    *sql.DB
	d     *dialect
	alloc AddrAllocator
	// repairs lists what opening the database changed to restore an
	// invariant an older version did not keep.
	repairs []string
}

// dialect is what differs between the databases.
type dialect struct {
	name string
	// rebind turns ? placeholders into the database's; nil keeps them.
	rebind func(string) string
	// lockRegister, when set, runs first in every registration
	// transaction: it serialises registrations where the transaction
	// itself does not (SQLite's immediate transactions already do).
	lockRegister string
	// forUpdate is appended to a read that precedes a write of the same
	// row in a transaction, where the database needs it to lock the row.
	forUpdate string
	// authKeyJSON selects one auth_keys row (id = ?) as JSON text, to
	// keep what quarantine moves out.
	authKeyJSON string
	// conflict maps a unique violation the database reports to
	// ErrKeyInUse or ErrNameInUse (nil if err is not one).
	conflict func(err error) error
	// migrations are this database's schema steps.
	migrations []migration
	// lockMigrations, when set, runs first in every migration
	// transaction, so that replicas starting together migrate once.
	lockMigrations string
	// lockSSH, when set, runs first in every transaction that adds an
	// SSH check, so that replicas keep the bound on pending checks.
	lockSSH string
}

// querier runs statements on the database or in a transaction, rebinding
// placeholders for the dialect.
type querier struct {
	db *sql.DB
	tx *sql.Tx
	d  *dialect
}

func (q querier) bind(s string) string {
	if q.d.rebind == nil {
		return s
	}
	return q.d.rebind(s)
}

func (q querier) ExecContext(ctx context.Context, s string, args ...any) (sql.Result, error) {
	if q.tx != nil {
		return q.tx.ExecContext(ctx, q.bind(s), args...)
	}
	return q.db.ExecContext(ctx, q.bind(s), args...)
}

func (q querier) QueryContext(ctx context.Context, s string, args ...any) (*sql.Rows, error) {
	if q.tx != nil {
		return q.tx.QueryContext(ctx, q.bind(s), args...)
	}
	return q.db.QueryContext(ctx, q.bind(s), args...)
}

func (q querier) QueryRowContext(ctx context.Context, s string, args ...any) *sql.Row {
	if q.tx != nil {
		return q.tx.QueryRowContext(ctx, q.bind(s), args...)
	}
	return q.db.QueryRowContext(ctx, q.bind(s), args...)
}

func (s *sqlStore) q() querier { return querier{db: s.db, d: s.d} }

func (s *sqlStore) tx(ctx context.Context, fn func(querier) error) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := fn(querier{tx: tx, d: s.d}); err != nil {
		tx.Rollback()
		return err
	}
	return tx.Commit()
}

// Repairs lists what opening the database changed to restore an invariant
// that an older version did not keep (duplicate keys or hostnames), one
// sentence each, for the caller to log. Empty for a healthy database.
func (s *sqlStore) Repairs() []string { return s.repairs }

// Close closes the database.
func (s *sqlStore) Close() error { return s.db.Close() }

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
func (s *sqlStore) Meta(ctx context.Context, key string) (string, error) {
	var v string
	err := s.q().QueryRowContext(ctx, `SELECT value FROM meta WHERE key = ?`, key).Scan(&v)
	if errors.Is(err, sql.ErrNoRows) {
		return "", fmt.Errorf("setting %q: %w", key, ErrNotFound)
	}
	if err != nil {
		return "", fmt.Errorf("read setting %q: %w", key, err)
	}
	return v, nil
}

// SetMeta implements Store.
func (s *sqlStore) SetMeta(ctx context.Context, key, value string) error {
	_, err := s.q().ExecContext(ctx, `INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value`, key, value)
	if err != nil {
		return fmt.Errorf("write setting %q: %w", key, err)
	}
	return nil
}

// EnsureUser implements Store.
func (s *sqlStore) EnsureUser(ctx context.Context, login string, now time.Time) (User, error) {
	var u User
	err := s.tx(ctx, func(tx querier) error {
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
func (s *sqlStore) Users(ctx context.Context) ([]User, error) {
	rows, err := s.q().QueryContext(ctx, `SELECT id, login, created FROM users ORDER BY id`)
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
func (s *sqlStore) InsertAuthKey(ctx context.Context, k AuthKey) error {
	tags, err := json.Marshal(nonNil(k.Tags))
	if err != nil {
		return err
	}
	_, err = s.q().ExecContext(ctx, `INSERT INTO auth_keys (id, hash, reusable, ephemeral, preauthorized, tags, user_login, created, expires)
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
func (s *sqlStore) AuthKey(ctx context.Context, id string) (AuthKey, error) {
	k, err := scanAuthKey(s.q().QueryRowContext(ctx, `SELECT `+authKeyCols+` FROM auth_keys WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return k, fmt.Errorf("auth key %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return k, fmt.Errorf("read auth key %s: %w", id, err)
	}
	return k, nil
}

// AuthKeys implements Store.
func (s *sqlStore) AuthKeys(ctx context.Context) ([]AuthKey, error) {
	rows, err := s.q().QueryContext(ctx, `SELECT `+authKeyCols+` FROM auth_keys ORDER BY created, id`)
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
func (s *sqlStore) RevokeAuthKey(ctx context.Context, id string, now time.Time) error {
	res, err := s.q().ExecContext(ctx, `UPDATE auth_keys SET revoked = ? WHERE id = ? AND revoked = 0`, unixNano(now), id)
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
func (s *sqlStore) Register(ctx context.Context, p RegisterParams) (Node, error) {
	var out Node
	err := s.tx(ctx, func(tx querier) error {
		if s.d.lockRegister != "" {
			if _, err := tx.ExecContext(ctx, s.d.lockRegister); err != nil {
				return fmt.Errorf("lock registrations: %w", err)
			}
		}
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
			var id int64
			err := tx.QueryRowContext(ctx, `INSERT INTO nodes (machine_key, ipv4, data) VALUES (?, ?, '{}') RETURNING id`,
				n.MachineKey.String(), n.Addresses[0].Addr().String()).Scan(&id)
			if err != nil {
				return fmt.Errorf("insert node: %w", err)
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
		return Node{}, fmt.Errorf("register %s: %w", p.MachineKey, s.conflict(err))
	}
	return out, nil
}

// selfTags returns the tags of id that its auth key does not carry: those
// the node asked for. Worked out here, from the key row, rather than taken
// from the caller, so that every registration path records them.
func selfTags(ctx context.Context, tx querier, id *Identity) ([]string, error) {
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
func (s *sqlStore) allocate(ctx context.Context, tx querier) (netip.Addr, error) {
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

func nodeByMachine(ctx context.Context, q querier, mk netmap.MachinePublic) (Node, error) {
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
func (s *sqlStore) Node(ctx context.Context, id netmap.NodeID) (Node, error) {
	if !validID(id) {
		return Node{}, fmt.Errorf("node %d: %w", id, ErrNotFound)
	}
	var data string
	err := s.q().QueryRowContext(ctx, `SELECT data FROM nodes WHERE id = ?`, int64(id)).Scan(&data)
	if errors.Is(err, sql.ErrNoRows) {
		return Node{}, fmt.Errorf("node %d: %w", id, ErrNotFound)
	}
	if err != nil {
		return Node{}, fmt.Errorf("read node %d: %w", id, err)
	}
	return decodeNode(data)
}

// NodeByMachine implements Store.
func (s *sqlStore) NodeByMachine(ctx context.Context, mk netmap.MachinePublic) (Node, error) {
	return nodeByMachine(ctx, s.q(), mk)
}

// Nodes implements Store.
func (s *sqlStore) Nodes(ctx context.Context) ([]Node, error) {
	return s.nodesWhere(ctx, ``)
}

// NodesWithSelfTags implements Store. A node's JSON holds the key
// "self_tags" only when it has some (omitempty), and no string value can
// hold it unescaped, so the database skips every other row without the
// coordinator decoding it: a policy change looks for these at every
// replica, and at 10,000 nodes decoding them all twice was most of its
// own time. The condition is that of a partial index (selfTaggedIndex),
// so the database does not read the other rows either: at 10,000 nodes
// the scan was 7% of a policy change's CPU. Rows that match are decoded
// and checked.
func (s *sqlStore) NodesWithSelfTags(ctx context.Context) ([]Node, error) {
	all, err := s.nodesWhere(ctx, `WHERE `+selfTaggedWhere)
	if err != nil {
		return nil, err
	}
	out := all[:0]
	for _, n := range all {
		if len(n.SelfTags) > 0 {
			out = append(out, n)
		}
	}
	return out, nil
}

func (s *sqlStore) nodesWhere(ctx context.Context, where string) ([]Node, error) {
	rows, err := s.q().QueryContext(ctx, `SELECT data FROM nodes `+where+` ORDER BY id`)
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
func (s *sqlStore) QuarantineCorrupt(ctx context.Context, now time.Time) ([]Quarantined, error) {
	var out []Quarantined
	err := s.tx(ctx, func(tx querier) error {
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
				tx.QueryRowContext(ctx, s.d.authKeyJSON, id).Scan(&data)
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
func (s *sqlStore) UpdateNode(ctx context.Context, n Node) error {
	if !validID(n.ID) {
		return fmt.Errorf("node %d: %w", n.ID, ErrNotFound)
	}
	err := s.tx(ctx, func(tx querier) error {
		var data string
		if err := tx.QueryRowContext(ctx, `SELECT data FROM nodes WHERE id = ?`+s.d.forUpdate, int64(n.ID)).Scan(&data); errors.Is(err, sql.ErrNoRows) {
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
		return fmt.Errorf("update node %d: %w", n.ID, s.conflict(err))
	}
	return nil
}

// DeleteNode implements Store.
func (s *sqlStore) DeleteNode(ctx context.Context, id netmap.NodeID) error {
	if !validID(id) {
		return fmt.Errorf("node %d: %w", id, ErrNotFound)
	}
	res, err := s.q().ExecContext(ctx, `DELETE FROM nodes WHERE id = ?`, int64(id))
	if err != nil {
		return fmt.Errorf("delete node %d: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("node %d: %w", id, ErrNotFound)
	}
	return nil
}

var _ Store = (*sqlStore)(nil)

func (s *sqlStore) migrate(ctx context.Context) error {
	for {
		done, err := s.migrateOne(ctx)
		if err != nil || done {
			return err
		}
	}
}

// migrateOne applies the next migration, if there is one, in its own
// transaction and reports whether the schema is current. The version is
// read inside the transaction, after the migration lock, so that of two
// coordinators starting together one applies each step and the other
// finds it applied.
func (s *sqlStore) migrateOne(ctx context.Context) (done bool, err error) {
	migs := s.d.migrations
	var v int
	err = s.tx(ctx, func(tx querier) error {
		if s.d.lockMigrations != "" {
			if _, err := tx.ExecContext(ctx, s.d.lockMigrations); err != nil {
				return fmt.Errorf("lock migrations: %w", err)
			}
		}
		if _, err := tx.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied BIGINT NOT NULL)`); err != nil {
			return fmt.Errorf("create migrations table: %w", err)
		}
		var have int
		if err := tx.QueryRowContext(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_migrations`).Scan(&have); err != nil {
			return fmt.Errorf("read schema version: %w", err)
		}
		if have > len(migs) {
			return fmt.Errorf("database schema version %d is newer than this build's %d: upgrade meshd", have, len(migs))
		}
		if have == len(migs) {
			done = true
			return nil
		}
		v = have + 1
		m := migs[v-1]
		if m.sql != "" {
			if _, err := tx.ExecContext(ctx, m.sql); err != nil {
				return fmt.Errorf("migration %d: %w", v, err)
			}
		}
		if m.fn != nil {
			r, err := m.fn(ctx, tx)
			if err != nil {
				return fmt.Errorf("migration %d: %w", v, err)
			}
			s.repairs = append(s.repairs, r...)
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO schema_migrations (version, applied) VALUES (?, ?)`, v, time.Now().Unix()); err != nil {
			return fmt.Errorf("migration %d: %w", v, err)
		}
		return nil
	})
	return done, err
}

// conflict returns err, or the ErrKeyInUse or ErrNameInUse it is: a
// unique index refused a write that raced past the checks (two
// coordinators sharing one database, each checking in its own
// transaction).
func (s *sqlStore) conflict(err error) error {
	if s.d.conflict == nil {
		return err
	}
	if c := s.d.conflict(err); c != nil {
		return fmt.Errorf("%w (%v)", c, err)
	}
	return err
}
