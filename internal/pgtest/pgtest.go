// Package pgtest runs a throwaway PostgreSQL server for tests: initdb in a
// temporary directory, the server listening only on a unix socket inside
// it, a fresh database per test, and everything removed on Close.
//
// It uses Debian's postgresql packages (/usr/lib/postgresql/N/bin) or an
// initdb on PATH. PostgreSQL refuses to run as root, so under root the
// server runs as the unprivileged user "nobody" and the directory is
// handed to that user.
package pgtest

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// ErrNoPostgres is returned by Start where no PostgreSQL server binaries
// are installed.
var ErrNoPostgres = errors.New("PostgreSQL server binaries not found (apt-get install postgresql)")

// Server is a running throwaway PostgreSQL.
type Server struct {
	dir  string
	cmd  *exec.Cmd
	done chan error
	next atomic.Int64
	// Admin is the URL of the maintenance database, for creating others.
	Admin string
}

// binDir finds the directory holding initdb and postgres: $MESHD_PG_BIN,
// then the newest /usr/lib/postgresql/N/bin, then PATH.
func binDir() (string, error) {
	if d := os.Getenv("MESHD_PG_BIN"); d != "" {
		return d, nil
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	slices.SortFunc(dirs, func(a, b string) int {
		va, _ := strconv.Atoi(filepath.Base(filepath.Dir(a)))
		vb, _ := strconv.Atoi(filepath.Base(filepath.Dir(b)))
		return vb - va
	})
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join(d, "postgres")); err == nil {
			return d, nil
		}
	}
	if p, err := exec.LookPath("initdb"); err == nil {
		return filepath.Dir(p), nil
	}
	return "", ErrNoPostgres
}

// Start runs initdb and starts the server. maxConns is the server's
// max_connections (0: 100).
func Start(ctx context.Context, maxConns int) (*Server, error) {
	bin, err := binDir()
	if err != nil {
		return nil, err
	}
	if maxConns <= 0 {
		maxConns = 100
	}
	dir, err := os.MkdirTemp("", "pgtest-")
	if err != nil {
		return nil, err
	}
	s := &Server{dir: dir, done: make(chan error, 1)}
	cred, err := credential(dir)
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	data := filepath.Join(dir, "data")
	initdb := exec.CommandContext(ctx, filepath.Join(bin, "initdb"), "-D", data, "-U", "meshd", "-A", "trust", "-E", "UTF8", "--no-sync")
	initdb.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	if out, err := initdb.CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("initdb: %w\n%s", err, out)
	}
	logf, err := os.Create(filepath.Join(dir, "postgres.log"))
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	defer logf.Close()
	// Durability is not the point of a test server: fsync off makes
	// creating databases and committing cheap.
	s.cmd = exec.Command(filepath.Join(bin, "postgres"), "-D", data, "-k", dir, "-c", "listen_addresses=",
		"-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
		"-c", "max_connections="+strconv.Itoa(maxConns), "-c", "shared_buffers=64MB")
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred, Setpgid: true}
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	if err := s.cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("start postgres: %w", err)
	}
	go func() { s.done <- s.cmd.Wait() }()
	s.Admin = s.url("postgres")
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := pgx.Connect(ctx, s.Admin)
		if err == nil {
			c.Close(ctx)
			return s, nil
		}
		select {
		case werr := <-s.done:
			log, _ := os.ReadFile(filepath.Join(dir, "postgres.log"))
			os.RemoveAll(dir)
			return nil, fmt.Errorf("postgres exited: %v\n%s", werr, log)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.Close()
			return nil, fmt.Errorf("postgres did not accept connections within 30s: %w", err)
		}
	}
}

// credential is who runs the server: the current user, or "nobody" under
// root, who then gets dir.
func credential(dir string) (*syscall.Credential, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	u, err := user.Lookup("nobody")
	if err != nil {
		return nil, fmt.Errorf("running as root and there is no user nobody to run postgres as: %w", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	if err := os.Chown(dir, uid, gid); err != nil {
		return nil, err
	}
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}

func (s *Server) url(db string) string {
	return "postgres://meshd@/" + db + "?host=" + url.QueryEscape(s.dir) + "&sslmode=disable"
}

// CreateDatabase creates an empty database and returns its URL.
func (s *Server) CreateDatabase(ctx context.Context) (string, error) {
	name := fmt.Sprintf("t%d", s.next.Add(1))
	c, err := pgx.Connect(ctx, s.Admin)
	if err != nil {
		return "", err
	}
	defer c.Close(ctx)
	if _, err := c.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		return "", fmt.Errorf("create database %s: %w", name, err)
	}
	return s.url(name), nil
}

// DropDatabase drops the database at dbURL, ending its connections.
func (s *Server) DropDatabase(ctx context.Context, dbURL string) error {
	u, err := url.Parse(dbURL)
	if err != nil {
		return err
	}
	name := strings.TrimPrefix(u.Path, "/")
	c, err := pgx.Connect(ctx, s.Admin)
	if err != nil {
		return err
	}
	defer c.Close(ctx)
	_, err = c.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)")
	return err
}

// Database creates a database for t, dropped when t ends.
func (s *Server) Database(t testing.TB) string {
	t.Helper()
	ctx := context.Background()
	u, err := s.CreateDatabase(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.DropDatabase(ctx, u); err != nil {
			t.Errorf("drop test database: %v", err)
		}
	})
	return u
}

// Close stops the server and removes its directory.
func (s *Server) Close() error {
	if s.cmd != nil && s.cmd.Process != nil {
		// SIGINT is PostgreSQL's fast shutdown.
		s.cmd.Process.Signal(syscall.SIGINT)
		select {
		case <-s.done:
		case <-time.After(10 * time.Second):
			syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
			<-s.done
		}
	}
	return os.RemoveAll(s.dir)
}

// Dir is the server's directory (its socket and log are there).
func (s *Server) Dir() string { return s.dir }

// Main starts a server for a test binary's TestMain and stops it after
// run, which gets nil (and the reason) where PostgreSQL is not installed:
// tests then skip with that reason.
func Main(run func(s *Server, why error) int) int {
	s, err := Start(context.Background(), 200)
	if err != nil {
		return run(nil, err)
	}
	defer s.Close()
	return run(s, nil)
}
