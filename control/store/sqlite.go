package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"

	"modernc.org/sqlite" // also registers the "sqlite" database/sql driver
	sqlite3 "modernc.org/sqlite/lib"
)

// migration is one schema step: SQL, or Go for steps that must look at
// the rows (repairs before a constraint can be added). fn returns what it
// repaired, in words, for the coordinator to log.
type migration struct {
	sql string
	fn  func(ctx context.Context, tx querier) (repairs []string, err error)
}

// migrations are SQLite's schema steps, applied in order; each runs once,
// recorded in schema_migrations. Never edit a released migration: append
// a new one (and its PostgreSQL counterpart to pgMigrations).
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
	// 7: SSH check-mode approvals (ssh.go): pending and approved checks
	// until they expire, and what an approval grants for its check
	// period. approved is 0 or when.
	{sql: sshSchema},
	// 8: the nodes that gave themselves tags, which every policy change
	// looks for twice (NodesWithSelfTags): found in the index, not by
	// reading every node's row.
	{sql: selfTaggedIndex},
}

// selfTaggedWhere selects the rows whose node may have self tags; the
// partial index selfTaggedIndex holds exactly those rows, and a query
// with this very condition is answered from it.
const selfTaggedWhere = `data LIKE '%"self_tags":%'`

// selfTaggedIndex is the same statement on SQLite and PostgreSQL.
const selfTaggedIndex = `CREATE INDEX IF NOT EXISTS nodes_self_tagged ON nodes (id) WHERE ` + selfTaggedWhere + `;`

// sshSchema is migration 7 of SQLite and 4 of PostgreSQL: the same SQL.
const sshSchema = `CREATE TABLE ssh_checks (
		id TEXT PRIMARY KEY,
		node_id BIGINT NOT NULL,
		caller_node BIGINT NOT NULL,
		local_user TEXT NOT NULL,
		data TEXT NOT NULL,
		period BIGINT NOT NULL,
		created BIGINT NOT NULL,
		expires BIGINT NOT NULL,
		approved BIGINT NOT NULL DEFAULT 0);
	CREATE INDEX ssh_checks_expires ON ssh_checks (expires);
	CREATE TABLE ssh_grants (
		caller_node BIGINT NOT NULL,
		node_id BIGINT NOT NULL,
		local_user TEXT NOT NULL,
		until BIGINT NOT NULL,
		PRIMARY KEY (caller_node, node_id, local_user));`

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
	sqlStore
}

// sqliteDialect: one connection and immediate transactions serialise
// every writer, so nothing needs locking beyond that.
var sqliteDialect = dialect{
	name: "sqlite",
	authKeyJSON: `SELECT json_object('hash', hex(hash), 'reusable', reusable, 'ephemeral', ephemeral, 'preauthorized', preauthorized,
		'tags', CAST(tags AS TEXT), 'user_login', user_login, 'created', created, 'expires', expires, 'revoked', revoked, 'last_used', last_used, 'uses', uses)
		FROM auth_keys WHERE id = ?`,
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
	d := sqliteDialect
	d.migrations = migrations
	return &SQLite{sqlStore{db: db, d: &d, alloc: alloc}}, nil
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
