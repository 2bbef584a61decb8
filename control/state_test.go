package control

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"meshd.dev/meshd/control/store"
	"meshd.dev/meshd/netmap"
)

// populatedState makes a coordinator state dir with a stored policy and two
// enrolled nodes, and returns it with the admin token it issued.
func populatedState(t *testing.T) (dir, token string) {
	t.Helper()
	dir = t.TempDir()
	ts := startServer(t, ServerOptions{StateDir: dir})
	if _, err := ts.ApplyPolicy(context.Background(), "ab.hujson", []byte(abPolicy)); err != nil {
		t.Fatal(err)
	}
	k := ts.key(t, AuthKeyOptions{Tags: []string{"tag:a"}, Reusable: true})
	for _, h := range []string{"a1", "a2"} {
		newTestNode(t, ts.url, "").mustRegister(t, k, h)
	}
	ts.stop(t)
	return dir, mustRead(t, filepath.Join(dir, adminTokenFile))
}

func mustRead(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// removeDB deletes the database and its companions.
func removeDB(t *testing.T, path string) {
	t.Helper()
	for _, p := range []string{path, path + "-wal", path + "-shm"} {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
	}
}

// unusableStates break a stopped coordinator's database the ways an
// operator (or an attacker with the disk) can.
var unusableStates = []struct {
	name  string
	want  error // what the refusal wraps
	apply func(t *testing.T, db string)
}{
	{"deleted", store.ErrNoDatabase, func(t *testing.T, db string) { removeDB(t, db) }},
	{"truncated to 0 bytes", store.ErrNoDatabase, func(t *testing.T, db string) {
		removeDB(t, db)
		if err := os.WriteFile(db, nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}},
	{"another coordinator's", ErrForeignDatabase, func(t *testing.T, db string) {
		other := t.TempDir()
		ts := startServer(t, ServerOptions{StateDir: other})
		ts.stop(t)
		removeDB(t, db)
		if err := os.WriteFile(db, []byte(mustRead(t, filepath.Join(other, dbFile))), 0o600); err != nil {
			t.Fatal(err)
		}
	}},
	{"not a database", store.ErrNotMeshd, func(t *testing.T, db string) {
		removeDB(t, db)
		if err := os.WriteFile(db, bytes.Repeat([]byte("backup tape label\n"), 512), 0o600); err != nil {
			t.Fatal(err)
		}
	}},
	{"another program's database", store.ErrNotMeshd, func(t *testing.T, db string) {
		removeDB(t, db)
		sdb, err := sql.Open("sqlite", "file:"+db)
		if err != nil {
			t.Fatal(err)
		}
		defer sdb.Close()
		if _, err := sdb.Exec(`CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)`); err != nil {
			t.Fatal(err)
		}
	}},
}

// TestStartRefusesUnusableState: a missing, empty, foreign or non-meshd
// database next to an existing coordinator.key stops the start with a
// message saying how to restore or re-initialise, and changes nothing: no
// new admin token, no new database, no allow-all bootstrap in force.
func TestStartRefusesUnusableState(t *testing.T) {
	for _, tc := range unusableStates {
		t.Run(tc.name, func(t *testing.T) {
			dir, token := populatedState(t)
			db := filepath.Join(dir, dbFile)
			tc.apply(t, db)
			before := dirState(t, dir)
			s, err := NewServer(context.Background(), ServerOptions{StateDir: dir, Logger: testLogger(t)})
			if err == nil {
				bootstrap := s.CurrentPolicy().Bootstrap
				s.Close()
				t.Fatalf("started (bootstrap policy in force: %v)", bootstrap)
			}
			msg := err.Error()
			for _, want := range []string{"refusing to start", "--init-state", "estore"} {
				if !strings.Contains(msg, want) {
					t.Errorf("message lacks %q: %s", want, msg)
				}
			}
			if !errors.Is(err, tc.want) {
				t.Errorf("error does not wrap %v: %v", tc.want, err)
			}
			if got := mustRead(t, filepath.Join(dir, adminTokenFile)); got != token {
				t.Error("a refused start issued a new admin token")
			}
			if after := dirState(t, dir); !maps.Equal(before, after) {
				t.Errorf("a refused start changed the state dir:\nbefore %v\nafter  %v", before, after)
			}
		})
	}
}

// TestInitStateReinitialises: --init-state moves the unusable database
// aside (keeping it) and starts an empty tailnet under the same key; on an
// intact database it refuses to do anything.
func TestInitStateReinitialises(t *testing.T) {
	for _, tc := range unusableStates {
		t.Run(tc.name, func(t *testing.T) {
			dir, token := populatedState(t)
			db := filepath.Join(dir, dbFile)
			tc.apply(t, db)
			fp := mustRead(t, filepath.Join(dir, keyFile))
			ts := startServer(t, ServerOptions{StateDir: dir, InitState: true})
			if nodes, err := ts.Nodes(context.Background()); err != nil || len(nodes) != 0 {
				t.Fatalf("after --init-state: nodes %v, %v; want an empty tailnet", nodes, err)
			}
			if got := mustRead(t, filepath.Join(dir, adminTokenFile)); got == token {
				t.Error("--init-state kept the old admin token")
			}
			if got := mustRead(t, filepath.Join(dir, keyFile)); got != fp {
				t.Error("--init-state replaced the coordinator key")
			}
			aside, _ := filepath.Glob(db + ".*-*")
			if tc.name != "deleted" && len(aside) == 0 {
				t.Error("the unusable database was not kept aside")
			}
			ts.stop(t)
			// The new database is the coordinator's own: a plain restart works.
			startServer(t, ServerOptions{StateDir: dir}).stop(t)
		})
	}

	dir, _ := populatedState(t)
	before := dirState(t, dir)
	_, err := NewServer(context.Background(), ServerOptions{StateDir: dir, Logger: testLogger(t), InitState: true})
	if err == nil || !strings.Contains(err.Error(), "intact") {
		t.Fatalf("--init-state on an intact database: %v", err)
	}
	if after := dirState(t, dir); !maps.Equal(before, after) {
		t.Errorf("--init-state on an intact database changed the state dir")
	}
}

// TestStartRefusesDatabaseWithoutKey: a database whose coordinator.key is
// gone is not a first start: no new key is made for it.
func TestStartRefusesDatabaseWithoutKey(t *testing.T) {
	dir, _ := populatedState(t)
	if err := os.Remove(filepath.Join(dir, keyFile)); err != nil {
		t.Fatal(err)
	}
	_, err := NewServer(context.Background(), ServerOptions{StateDir: dir, Logger: testLogger(t)})
	if err == nil || !strings.Contains(err.Error(), "restore "+keyFile) || !strings.Contains(err.Error(), "--init-state") {
		t.Fatalf("start without the key: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, keyFile)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a new coordinator key was written: %v", err)
	}
}

// dirState maps each file of dir to its mode and content.
func dirState(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		fi, err := e.Info()
		if err != nil {
			t.Fatal(err)
		}
		b, _ := os.ReadFile(filepath.Join(dir, e.Name()))
		out[e.Name()] = fi.Mode().String() + " " + string(b)
	}
	return out
}

// logBuffer is a slog handler target that tests can read.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

func (l *logBuffer) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(io.MultiWriter(l), nil))
}

// TestCorruptRowQuarantined: a node row broken with raw SQL is logged by
// id and moved to the quarantine table; the rest of the tailnet and the
// stored policy load, and the other nodes get their maps.
func TestCorruptRowQuarantined(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	ts := startServer(t, ServerOptions{StateDir: dir})
	if _, err := ts.ApplyPolicy(ctx, "bc.hujson", []byte(bcPolicy)); err != nil {
		t.Fatal(err)
	}
	ka := ts.key(t, AuthKeyOptions{Tags: []string{"tag:a"}, Reusable: true})
	kb := ts.key(t, AuthKeyOptions{Tags: []string{"tag:b"}, Reusable: true})
	a, bad, b := newTestNode(t, ts.url, ""), newTestNode(t, ts.url, ""), newTestNode(t, ts.url, "")
	a.mustRegister(t, ka, "a")
	bad.mustRegister(t, kb, "bad")
	b.mustRegister(t, kb, "b")
	addr := ts.addr
	ts.stop(t)

	sdb, err := sql.Open("sqlite", "file:"+filepath.Join(dir, dbFile))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sdb.Exec(`UPDATE nodes SET data = substr(data, 1, 40) WHERE id = ?`, bad.id); err != nil {
		t.Fatal(err)
	}
	sdb.Close()

	var logs logBuffer
	ts = startServerAt(t, ServerOptions{StateDir: dir, Logger: logs.logger()}, addr)
	if line := grepLine(logs.String(), "quarantine"); !strings.Contains(line, "table=nodes") || !strings.Contains(line, fmt.Sprintf("id=%d", bad.id)) {
		t.Fatalf("no log line naming the quarantined row:\n%s", logs.String())
	}
	if p := ts.CurrentPolicy(); p.Bootstrap || p.File != "bc.hujson" {
		t.Fatalf("policy after the quarantine: %+v, want the stored bc.hujson", p)
	}
	nodes, err := ts.Nodes(ctx)
	if err != nil || len(nodes) != 2 {
		t.Fatalf("nodes: %v, %v; want the two intact ones", nodes, err)
	}
	a.follow(t, a.mapRequest())
	a.waitMap(t, "a sees b under the stored policy", func(m *netmap.NetworkMap) bool {
		return !m.PolicyBootstrap && m.Peers[b.id] != nil && m.Peers[bad.id] == nil
	})
}

func grepLine(text, sub string) string {
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, sub) {
			return l
		}
	}
	return ""
}

// TestDatabaseMode0600: with a permissive umask the database and its
// -wal and -shm are still 0600 (they hold auth key and token hashes).
func TestDatabaseMode0600(t *testing.T) {
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	dir := t.TempDir()
	ts := startServer(t, ServerOptions{StateDir: dir})
	ts.key(t, AuthKeyOptions{Tags: []string{"tag:x"}}) // a write, so the WAL exists
	for _, name := range []string{dbFile, dbFile + "-wal", dbFile + "-shm", keyFile, adminTokenFile} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %v, want 0600", name, fi.Mode().Perm())
		}
	}
}
