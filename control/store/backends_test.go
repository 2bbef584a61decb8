package store

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"meshd.dev/meshd/internal/pgtest"
)

// pg is the PostgreSQL server of this test binary; nil with pgWhy where
// none could be started.
var (
	pg    *pgtest.Server
	pgWhy error
)

func TestMain(m *testing.M) {
	os.Exit(pgtest.Main(func(s *pgtest.Server, why error) int {
		pg, pgWhy = s, why
		return m.Run()
	}))
}

// backend is one Store implementation under test.
type backend struct {
	name string
	// create makes an empty store with pool and returns it and a
	// function that closes it and opens the same database again.
	create func(t *testing.T, pool AddrAllocator) (s *sqlStore, reopen func(t *testing.T) (*sqlStore, error))
}

// needPostgres skips t where PostgreSQL is not installed, and fails it
// where it is but did not start.
func needPostgres(t *testing.T) {
	t.Helper()
	switch {
	case errors.Is(pgWhy, pgtest.ErrNoPostgres):
		t.Skipf("skipping the PostgreSQL store: %v", pgWhy)
	case pgWhy != nil:
		t.Fatalf("PostgreSQL is installed but did not start: %v", pgWhy)
	}
}

var backends = []backend{
	{"sqlite", func(t *testing.T, pool AddrAllocator) (*sqlStore, func(*testing.T) (*sqlStore, error)) {
		path := filepath.Join(t.TempDir(), "db")
		s, err := CreateSQLite(context.Background(), path, pool, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return &s.sqlStore, func(t *testing.T) (*sqlStore, error) {
			s.Close()
			s2, err := OpenSQLite(context.Background(), path, pool)
			if err != nil {
				return nil, err
			}
			t.Cleanup(func() { s2.Close() })
			return &s2.sqlStore, nil
		}
	}},
	{"postgres", func(t *testing.T, pool AddrAllocator) (*sqlStore, func(*testing.T) (*sqlStore, error)) {
		needPostgres(t)
		url := pg.Database(t)
		s, err := CreatePostgres(context.Background(), url, pool, PostgresOptions{Name: "test"}, nil)
		if err != nil {
			t.Fatal(err)
		}
		// Registered after the database's drop, so it runs first.
		t.Cleanup(func() { s.Close() })
		return &s.sqlStore, func(t *testing.T) (*sqlStore, error) {
			s.Close()
			s2, err := OpenPostgres(context.Background(), url, pool, PostgresOptions{Name: "test"})
			if err != nil {
				return nil, err
			}
			t.Cleanup(func() { s2.Close() })
			return &s2.sqlStore, nil
		}
	}},
}

// eachBackend runs test against every Store implementation.
func eachBackend(t *testing.T, test func(t *testing.T, b backend)) {
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) { test(t, b) })
	}
}

// newStore is b's empty store with pool.
func newStore(t *testing.T, b backend, pool AddrAllocator) *sqlStore {
	s, _ := b.create(t, pool)
	return s
}

// mustReopen closes s's database and opens it again.
func mustReopen(t *testing.T, reopen func(*testing.T) (*sqlStore, error)) *sqlStore {
	t.Helper()
	s, err := reopen(t)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// rawExec runs statements that bypass the store (to corrupt rows or fake
// an old schema), picking the dialect's spelling.
func rawExec(t *testing.T, s *sqlStore, byDialect map[string]string) {
	t.Helper()
	q, ok := byDialect[s.d.name]
	if !ok {
		t.Fatalf("no %s spelling of %v", s.d.name, byDialect)
	}
	if _, err := s.db.ExecContext(context.Background(), q); err != nil {
		t.Fatalf("%s: %v", q, err)
	}
}

func same(q string) map[string]string { return map[string]string{"sqlite": q, "postgres": q} }

var _ = fmt.Sprint
