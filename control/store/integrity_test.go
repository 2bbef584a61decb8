package store

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"meshd.dev/meshd/netmap"
)

// TestOpenRefusesWhatIsNotADatabase: OpenSQLite never creates a database
// and never writes to a file that is not one of ours.
func TestOpenRefusesWhatIsNotADatabase(t *testing.T) {
	foreign := func(t *testing.T, path string) {
		db, err := sql.Open("sqlite", "file:"+path)
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		if _, err := db.Exec(`CREATE TABLE photos (id INTEGER PRIMARY KEY, name TEXT); INSERT INTO photos (name) VALUES ('cat')`); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name    string
		prepare func(t *testing.T, path string)
		want    error
	}{
		{"missing", func(*testing.T, string) {}, ErrNoDatabase},
		{"zero bytes", func(t *testing.T, path string) { os.WriteFile(path, nil, 0o600) }, ErrNoDatabase},
		{"not sqlite", func(t *testing.T, path string) {
			os.WriteFile(path, bytes.Repeat([]byte("not a database at all\n"), 300), 0o600)
		}, ErrNotMeshd},
		{"another program's sqlite", foreign, ErrNotMeshd},
		{"a directory", func(t *testing.T, path string) { os.Mkdir(path, 0o700) }, ErrNotMeshd},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "coordinator.db")
			tc.prepare(t, path)
			before := snapshotDir(t, dir)
			s, err := OpenSQLite(context.Background(), path, tinyPool{})
			if err == nil {
				s.Close()
				t.Fatal("opened")
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if after := snapshotDir(t, dir); !maps.Equal(before, after) {
				t.Fatalf("refused open changed the directory:\nbefore %v\nafter  %v", before, after)
			}
		})
	}
}

// snapshotDir maps each file in dir to its content and mode.
func snapshotDir(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		fi, _ := e.Info()
		b, _ := os.ReadFile(filepath.Join(dir, e.Name()))
		out[e.Name()] = fi.Mode().String() + " " + string(b)
	}
	return out
}

// TestDatabaseFilesAre0600 runs with umask 0: the database, its -wal and
// its -shm are 0600 anyway, and an old 0644 database is tightened.
func TestDatabaseFilesAre0600(t *testing.T) {
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "coordinator.db")
	s, err := CreateSQLite(ctx, path, tinyPool{}, map[string]string{"owner": "me"})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.SetMeta(ctx, "x", "y"); err != nil { // something in the WAL
		t.Fatal(err)
	}
	checkModes := func(when string) {
		t.Helper()
		for _, p := range []string{path, path + "-wal", path + "-shm"} {
			fi, err := os.Stat(p)
			if err != nil {
				t.Fatalf("%s: %v", when, err)
			}
			if fi.Mode().Perm() != 0o600 {
				t.Errorf("%s: %s has mode %v, want 0600", when, filepath.Base(p), fi.Mode().Perm())
			}
		}
	}
	checkModes("created")
	if v, err := s.Meta(ctx, "owner"); err != nil || v != "me" {
		t.Fatalf("meta written at creation: %q, %v", v, err)
	}
	s.Close()
	leftovers, _ := filepath.Glob(path + ".init-*")
	if len(leftovers) != 0 {
		t.Errorf("temporary files left behind: %v", leftovers)
	}
	if _, err := CreateSQLite(ctx, path, tinyPool{}, nil); err == nil {
		t.Fatal("CreateSQLite replaced an existing database")
	}

	// A database an earlier build left 0644.
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	s, err = OpenSQLite(ctx, path, tinyPool{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.SetMeta(ctx, "x", "z"); err != nil {
		t.Fatal(err)
	}
	checkModes("reopened")
}

// TestQuarantineCorrupt: rows broken with raw SQL are moved to the
// quarantine table, named, and the rest still loads.
func TestQuarantineCorrupt(t *testing.T) {
	eachBackend(t, func(t *testing.T, bk backend) {
		ctx := context.Background()
		s := newStore(t, bk, tinyPool{})
		hash := bytes.Repeat([]byte{1}, 32)
		for _, id := range []string{"good", "badtags", "shorthash"} {
			if err := s.InsertAuthKey(ctx, AuthKey{ID: id, Hash: hash, Reusable: true, Tags: []string{"tag:x"}, Created: time.Now()}); err != nil {
				t.Fatal(err)
			}
		}
		var nodes []Node
		for i := range 3 {
			n, err := reg(s, mkey(byte(i+1)), "good", true)
			if err != nil {
				t.Fatal(err)
			}
			nodes = append(nodes, n)
		}
		for _, q := range []map[string]string{
			same(`UPDATE nodes SET data = '{"id": 1, "hostname": ' WHERE id = 1`), // not JSON
			{ // another node's id
				"sqlite":   `UPDATE nodes SET data = json_set(data, '$.id', 77) WHERE id = 3`,
				"postgres": `UPDATE nodes SET data = jsonb_set(data::jsonb, '{id}', '77')::text WHERE id = 3`,
			},
			same(`UPDATE auth_keys SET tags = 'tag:x' WHERE id = 'badtags'`), // not a JSON list
			{ // no SHA-256
				"sqlite":   `UPDATE auth_keys SET hash = x'01' WHERE id = 'shorthash'`,
				"postgres": `UPDATE auth_keys SET hash = '\x01' WHERE id = 'shorthash'`,
			},
		} {
			rawExec(t, s, q)
		}
		if _, err := s.Nodes(ctx); err == nil {
			t.Fatal("Nodes loaded a table with a corrupt row: the test corrupts nothing")
		}
		got, err := s.QuarantineCorrupt(ctx, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, q := range got {
			if q.Reason == "" {
				t.Errorf("%s %s quarantined without a reason", q.Source, q.Key)
			}
			names = append(names, q.Source+"/"+q.Key)
		}
		if want := []string{"nodes/1", "nodes/3", "auth_keys/badtags", "auth_keys/shorthash"}; !slices.Equal(names, want) {
			t.Fatalf("quarantined %v, want %v", names, want)
		}
		left, err := s.Nodes(ctx)
		if err != nil || len(left) != 1 || left[0].ID != nodes[1].ID {
			t.Fatalf("nodes after quarantine: %v, %v; want node %d only", left, err, nodes[1].ID)
		}
		keys, err := s.AuthKeys(ctx)
		if err != nil || len(keys) != 1 || keys[0].ID != "good" {
			t.Fatalf("keys after quarantine: %v, %v", keys, err)
		}
		var kept int
		if err := s.db.QueryRow(`SELECT COUNT(*) FROM quarantine WHERE data != ''`).Scan(&kept); err != nil || kept != 4 {
			t.Fatalf("quarantine holds %d rows with their data (%v), want 4", kept, err)
		}
		if again, err := s.QuarantineCorrupt(ctx, time.Now()); err != nil || len(again) != 0 {
			t.Fatalf("second pass: %v, %v", again, err)
		}
	})
}

// TestRegisterRecordsSelfTags: tags beyond the auth key's are recorded as
// asked for by the node; a new registration replaces them and clears the
// node's notices.
func TestRegisterRecordsSelfTags(t *testing.T) {
	eachBackend(t, func(t *testing.T, bk backend) {
		ctx := context.Background()
		s := newStore(t, bk, tinyPool{})
		hash := bytes.Repeat([]byte{1}, 32)
		s.InsertAuthKey(ctx, AuthKey{ID: "tagged", Hash: hash, Reusable: true, Tags: []string{"tag:a"}, Created: time.Now()})
		s.InsertAuthKey(ctx, AuthKey{ID: "user", Hash: hash, Reusable: true, User: "alice@example.com", Created: time.Now()})
		register := func(key string, tags ...string) Node {
			t.Helper()
			n, err := s.Register(ctx, RegisterParams{MachineKey: mkey(1), NodeKey: netmap.NodePublic{1}, Hostname: "h", Now: time.Now(),
				Identity: &Identity{Tags: tags, Authorized: true, AuthKeyID: key}, ConsumeKey: true, Reusable: true})
			if err != nil {
				t.Fatal(err)
			}
			got, err := s.Node(ctx, n.ID)
			if err != nil {
				t.Fatal(err)
			}
			return got
		}
		if n := register("tagged", "tag:a", "tag:b"); !slices.Equal(n.SelfTags, []string{"tag:b"}) {
			t.Fatalf("tagged key + tag:b: self tags %v", n.SelfTags)
		}
		n := register("user", "tag:c")
		if !slices.Equal(n.SelfTags, []string{"tag:c"}) {
			t.Fatalf("user key + tag:c: self tags %v", n.SelfTags)
		}
		n.Notices = []string{"tags removed"}
		if err := s.UpdateNode(ctx, n); err != nil {
			t.Fatal(err)
		}
		if n := register("tagged", "tag:a"); len(n.SelfTags) != 0 || len(n.Notices) != 0 {
			t.Fatalf("re-registered with the key's tags only: self tags %v, notices %v", n.SelfTags, n.Notices)
		}
	})
}

// TestMigrationBackfillsSelfTags: rows from before self_tags count every
// tag not on their auth key as asked for, and a row that is not JSON does
// not stop the migration (it is left for the quarantine check).
func TestMigrationBackfillsSelfTags(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "db")
	s := open(t, path)
	hash := bytes.Repeat([]byte{1}, 32)
	s.InsertAuthKey(ctx, AuthKey{ID: "tagged", Hash: hash, Reusable: true, Tags: []string{"tag:a"}, Created: time.Now()})
	s.InsertAuthKey(ctx, AuthKey{ID: "broken", Hash: hash, Reusable: true, Created: time.Now()})
	for i, tags := range [][]string{{"tag:a", "tag:b"}, {"tag:a"}, nil} {
		if _, err := s.Register(ctx, RegisterParams{MachineKey: mkey(byte(i + 1)), NodeKey: netmap.NodePublic{byte(i + 1)}, Now: time.Now(),
			Identity: &Identity{Tags: tags, Authorized: true, AuthKeyID: "tagged"}, ConsumeKey: true, Reusable: true}); err != nil {
			t.Fatal(err)
		}
	}
	// Back to schema 4: rows without self_tags, plus a corrupt row and a
	// key whose tags are not JSON.
	for _, q := range []string{
		`UPDATE nodes SET data = json_remove(data, '$.self_tags')`,
		`UPDATE nodes SET data = json_set(data, '$.tags', json('["tag:z"]'), '$.auth_key_id', 'broken') WHERE id = 3`,
		`UPDATE auth_keys SET tags = 'garbage' WHERE id = 'broken'`,
		`INSERT INTO nodes (machine_key, ipv4, data) VALUES ('mkey:junk', '100.64.9.9', 'not json')`,
		`DROP TABLE audit`, `DROP TABLE ssh_checks`, `DROP TABLE ssh_grants`, // migrations 6 and 7, after the one under test
		`DELETE FROM schema_migrations WHERE version >= 5`,
	} {
		if _, err := s.db.Exec(q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	s.Close()
	s = open(t, path)
	want := map[netmap.NodeID][]string{1: {"tag:b"}, 2: nil, 3: {"tag:z"}}
	for id, w := range want {
		n, err := s.Node(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(n.SelfTags, w) {
			t.Errorf("node %d (tags %v): self tags %v, want %v", id, n.Tags, n.SelfTags, w)
		}
	}
}

// TestNodesWithSelfTags: exactly the nodes that gave themselves tags, by
// id, on both backends; text that looks like the key elsewhere in a node
// does not count.
func TestNodesWithSelfTags(t *testing.T) {
	eachBackend(t, func(t *testing.T, bk backend) {
		ctx := context.Background()
		s := bigPool(t, bk)
		hash := bytes.Repeat([]byte{1}, 32)
		s.InsertAuthKey(ctx, AuthKey{ID: "k", Hash: hash, Reusable: true, Tags: []string{"tag:a"}, Created: time.Now()})
		var want []netmap.NodeID
		for i := range 6 {
			tags := []string{"tag:a"}
			if i%2 == 1 {
				tags = append(tags, "tag:self")
			}
			n, err := s.Register(ctx, RegisterParams{MachineKey: mkey(byte(i + 1)), NodeKey: netmap.NodePublic{byte(i + 1)}, Hostname: fmt.Sprintf("h%d", i), Now: time.Now(),
				Identity: &Identity{Tags: tags, Authorized: true, AuthKeyID: "k"}, ConsumeKey: true, Reusable: true})
			if err != nil {
				t.Fatal(err)
			}
			if i%2 == 1 {
				want = append(want, n.ID)
			}
			if i == 2 {
				n.Notices = []string{`"self_tags":["tag:x"]`}
				if err := s.UpdateNode(ctx, n); err != nil {
					t.Fatal(err)
				}
			}
		}
		got, err := s.NodesWithSelfTags(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var ids []netmap.NodeID
		for _, n := range got {
			if !slices.Equal(n.SelfTags, []string{"tag:self"}) {
				t.Fatalf("node %d: self tags %v", n.ID, n.SelfTags)
			}
			ids = append(ids, n.ID)
		}
		if !slices.Equal(ids, want) {
			t.Fatalf("nodes with self tags %v; want %v", ids, want)
		}
	})
}

// TestNodesWithSelfTagsUsesIndex: the database answers NodesWithSelfTags
// from the partial index, on both backends, not by reading every node.
func TestNodesWithSelfTagsUsesIndex(t *testing.T) {
	eachBackend(t, func(t *testing.T, bk backend) {
		ctx := context.Background()
		s := newStore(t, bk, nil)
		conn, err := s.db.Conn(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		explain := `EXPLAIN QUERY PLAN `
		if s.d.name == "postgres" {
			// An empty table is read whole whatever its indexes; forbid
			// that to see whether the index can answer.
			if _, err := conn.ExecContext(ctx, `SET enable_seqscan = off`); err != nil {
				t.Fatal(err)
			}
			explain = `EXPLAIN `
		}
		rows, err := conn.QueryContext(ctx, explain+`SELECT data FROM nodes WHERE `+selfTaggedWhere+` ORDER BY id`)
		if err != nil {
			t.Fatal(err)
		}
		defer rows.Close()
		cols, _ := rows.Columns()
		var plan []string
		for rows.Next() {
			vals := make([]any, len(cols))
			ptrs := make([]any, len(cols))
			for i := range vals {
				ptrs[i] = &vals[i]
			}
			if err := rows.Scan(ptrs...); err != nil {
				t.Fatal(err)
			}
			plan = append(plan, fmt.Sprint(vals...))
		}
		if err := rows.Err(); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(strings.Join(plan, "\n"), "nodes_self_tagged") {
			t.Fatalf("the query does not use the index nodes_self_tagged:\n%s", strings.Join(plan, "\n"))
		}
	})
}
