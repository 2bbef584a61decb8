package store

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"path/filepath"
	"testing"
	"time"

	_ "modernc.org/sqlite"
)

func TestPolicyRoundTripAndReopen(t *testing.T) {
	eachBackend(t, func(t *testing.T, bk backend) {
		ctx := context.Background()
		s, reopen := bk.create(t, tinyPool{})
		if _, err := s.Policy(ctx); !errors.Is(err, ErrNotFound) {
			t.Fatalf("fresh database: Policy error %v, want ErrNotFound", err)
		}
		first := Policy{File: "a.hujson", Data: []byte("// one\n{}"), Updated: time.Unix(100, 5).UTC()}
		second := Policy{File: "b.hujson", Data: []byte("{\"grants\": []}\n"), Updated: time.Unix(200, 7).UTC()}
		for _, p := range []Policy{first, second} {
			if err := s.SetPolicy(ctx, p); err != nil {
				t.Fatal(err)
			}
		}
		s = mustReopen(t, reopen)
		got, err := s.Policy(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if got.File != second.File || !bytes.Equal(got.Data, second.Data) || !got.Updated.Equal(second.Updated) {
			t.Fatalf("after reopen: %+v, want the last one set %+v", got, second)
		}
	})
}

// TestPolicyMigrationOnOldDatabase opens a database that has only the first
// migration, as an older meshd left it: the policy table is added and the
// existing state is kept.
func TestPolicyMigrationOnOldDatabase(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "db")
	db, err := sql.Open("sqlite", "file:"+path)
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{
		`CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied INTEGER NOT NULL)`,
		migrations[0].sql,
		`INSERT INTO schema_migrations (version, applied) VALUES (1, 0)`,
		`INSERT INTO meta (key, value) VALUES ('k', 'v')`,
	} {
		if _, err := db.ExecContext(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	db.Close()

	s := open(t, path)
	if v, err := s.Meta(ctx, "k"); err != nil || v != "v" {
		t.Fatalf("meta after migration: %q %v", v, err)
	}
	if _, err := s.Policy(ctx); !errors.Is(err, ErrNotFound) {
		t.Fatalf("migrated database: Policy error %v, want ErrNotFound", err)
	}
	if err := s.SetPolicy(ctx, Policy{File: "p", Data: []byte("{}"), Updated: time.Now()}); err != nil {
		t.Fatal(err)
	}
	var version int
	if err := s.db.QueryRowContext(ctx, `SELECT MAX(version) FROM schema_migrations`).Scan(&version); err != nil || version != len(migrations) {
		t.Fatalf("schema version %d (%v), want %d", version, err, len(migrations))
	}
}
