package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"meshd.dev/meshd/netmap"
)

// regKeys registers machine mk with the given keys and hostname under a
// reusable key "r" (which the caller inserted).
func regKeys(s Store, mk netmap.MachinePublic, nk netmap.NodePublic, dk netmap.DiscoPublic, host string) (Node, error) {
	return s.Register(context.Background(), RegisterParams{
		MachineKey: mk, NodeKey: nk, DiscoKey: dk, Hostname: host, Now: time.Now(),
		Identity: &Identity{Tags: []string{"tag:x"}, Authorized: true, AuthKeyID: "r"}, ConsumeKey: true, Reusable: true,
	})
}

func bigPool(t *testing.T, bk backend) *sqlStore {
	t.Helper()
	s := newStore(t, bk, seqPool{})
	if err := s.InsertAuthKey(context.Background(), AuthKey{ID: "r", Hash: []byte{1}, Reusable: true, Created: time.Now()}); err != nil {
		t.Fatal(err)
	}
	return s
}

// seqPool hands out 100.64.x.y for as many nodes as a test needs.
type seqPool struct{}

func (seqPool) Size() int { return 1 << 16 }
func (seqPool) Next(prev netip.Addr) netip.Addr {
	if !prev.IsValid() {
		return netip.MustParseAddr("100.64.0.1")
	}
	return prev.Next()
}
func (seqPool) Addresses(v4 netip.Addr) []netip.Prefix {
	return []netip.Prefix{netip.PrefixFrom(v4, 32)}
}

func TestKeysHeldByAnotherNodeRefused(t *testing.T) {
	eachBackend(t, func(t *testing.T, bk backend) {
		ctx := context.Background()
		s := bigPool(t, bk)
		nkA, dkA := netmap.NodePublic{0xa}, netmap.DiscoPublic{0xa}
		a, err := regKeys(s, mkey(1), nkA, dkA, "a")
		if err != nil {
			t.Fatal(err)
		}
		b, err := regKeys(s, mkey(2), netmap.NodePublic{0xb}, netmap.DiscoPublic{0xb}, "b")
		if err != nil {
			t.Fatal(err)
		}
		for _, tc := range []struct {
			name string
			nk   netmap.NodePublic
			dk   netmap.DiscoPublic
		}{
			{"node key", nkA, netmap.DiscoPublic{0xc}},
			{"disco key", netmap.NodePublic{0xc}, dkA},
		} {
			t.Run(tc.name, func(t *testing.T) {
				if _, err := regKeys(s, mkey(3), tc.nk, tc.dk, "c"); !errors.Is(err, ErrKeyInUse) {
					t.Errorf("new machine registering with a held %s: %v, want ErrKeyInUse", tc.name, err)
				}
				if _, err := regKeys(s, mkey(2), tc.nk, tc.dk, "b"); !errors.Is(err, ErrKeyInUse) {
					t.Errorf("b re-registering with a's %s: %v, want ErrKeyInUse", tc.name, err)
				}
				nb := b
				nb.NodeKey, nb.DiscoKey = tc.nk, tc.dk
				if err := s.UpdateNode(ctx, nb); !errors.Is(err, ErrKeyInUse) {
					t.Errorf("b updated to a's %s: %v, want ErrKeyInUse", tc.name, err)
				}
				if got, _ := s.Node(ctx, b.ID); got.NodeKey != b.NodeKey || got.DiscoKey != b.DiscoKey {
					t.Errorf("refused update changed b: %+v", got.Node)
				}
			})
		}
		if _, err := s.NodeByMachine(ctx, mkey(3)); !errors.Is(err, ErrNotFound) {
			t.Fatalf("refused registration left a node: %v", err)
		}
		// The holder itself may re-register and update with its own keys, and
		// a key given up is free for another node.
		if _, err := regKeys(s, mkey(1), nkA, dkA, "a"); err != nil {
			t.Fatalf("a re-registering with its own keys: %v", err)
		}
		a.NodeKey, a.DiscoKey = netmap.NodePublic{0xd}, netmap.DiscoPublic{0xd}
		if err := s.UpdateNode(ctx, a); err != nil {
			t.Fatal(err)
		}
		if _, err := regKeys(s, mkey(3), nkA, dkA, "c"); err != nil {
			t.Fatalf("registering with keys a gave up: %v", err)
		}
		// Zero disco keys are not a shared key.
		if _, err := regKeys(s, mkey(4), netmap.NodePublic{0xe}, netmap.DiscoPublic{}, "e"); err != nil {
			t.Fatal(err)
		}
		if _, err := regKeys(s, mkey(5), netmap.NodePublic{0xf}, netmap.DiscoPublic{}, "f"); err != nil {
			t.Fatalf("second node without a disco key: %v", err)
		}
	})
}

// TestRacingRegistrationsOneKey: machines racing to register one node key
// (each in its own transaction) end with exactly one holder.
func TestRacingRegistrationsOneKey(t *testing.T) {
	eachBackend(t, func(t *testing.T, bk backend) {
		s := bigPool(t, bk)
		nk := netmap.NodePublic{0x42}
		errs := make([]error, 8)
		var wg sync.WaitGroup
		for i := range errs {
			wg.Go(func() { _, errs[i] = regKeys(s, mkey(byte(i+1)), nk, netmap.DiscoPublic{byte(i + 1)}, "racer") })
		}
		wg.Wait()
		won := 0
		for _, err := range errs {
			switch {
			case err == nil:
				won++
			case !errors.Is(err, ErrKeyInUse):
				t.Errorf("unexpected error: %v", err)
			}
		}
		if won != 1 {
			t.Fatalf("%d machines registered one node key, want 1", won)
		}
	})
}

func TestHostnamesUniqueWithSuffix(t *testing.T) {
	eachBackend(t, func(t *testing.T, bk backend) {
		ctx := context.Background()
		s := bigPool(t, bk)
		var ids []netmap.NodeID
		for i, want := range []string{"gpu-3", "gpu-3-1", "gpu-3-2", "gpu-3-3"} {
			host := "gpu-3"
			if i == 3 {
				host = "GPU-3" // names compare lowercased
			}
			n, err := regKeys(s, mkey(byte(i+1)), netmap.NodePublic{byte(i + 1)}, netmap.DiscoPublic{byte(i + 1)}, host)
			if err != nil {
				t.Fatal(err)
			}
			if n.Hostname != want && !(i == 3 && n.Hostname == "GPU-3-3") {
				t.Fatalf("registration %d of gpu-3: named %q, want %q", i, n.Hostname, want)
			}
			ids = append(ids, n.ID)
		}
		// Re-registering keeps a node's own name even when it asks for one
		// another node holds; an empty name keeps it too.
		for _, host := range []string{"gpu-3", ""} {
			n, err := regKeys(s, mkey(2), netmap.NodePublic{2}, netmap.DiscoPublic{2}, host)
			if err != nil || n.Hostname != "gpu-3-1" {
				t.Fatalf("node 2 re-registering as %q: named %q (%v), want its own gpu-3-1", host, n.Hostname, err)
			}
		}
		// Asking for a free name renames; asking for a held one suffixes.
		if n, err := regKeys(s, mkey(2), netmap.NodePublic{2}, netmap.DiscoPublic{2}, "box"); err != nil || n.Hostname != "box" {
			t.Fatalf("rename to a free name: %q %v", n.Hostname, err)
		}
		if n, err := regKeys(s, mkey(2), netmap.NodePublic{2}, netmap.DiscoPublic{2}, "gpu-3"); err != nil || n.Hostname != "gpu-3-1" {
			t.Fatalf("rename onto a held name: %q %v, want the first free suffix gpu-3-1", n.Hostname, err)
		}
		// An update cannot take another node's name.
		n3, _ := s.Node(ctx, ids[2])
		n3.Hostname = "GPU-3"
		if err := s.UpdateNode(ctx, n3); !errors.Is(err, ErrNameInUse) {
			t.Fatalf("update onto node 1's name: %v, want ErrNameInUse", err)
		}
	})
}

func TestHostnameCandidate(t *testing.T) {
	long := strings.Repeat("a", 62) + "b" // 63 bytes
	for _, tc := range []struct {
		base string
		i    int
		want string
	}{
		{"gpu-3", 0, "gpu-3"},
		{"gpu-3", 1, "gpu-3-1"},
		{"gpu-3", 12, "gpu-3-12"},
		{long, 0, long},
		{long, 1, strings.Repeat("a", 61) + "-1"},
		{long, 100, strings.Repeat("a", 59) + "-100"},
		{strings.Repeat("a", 60) + "-xyz", 7, strings.Repeat("a", 60) + "-7"}, // no "--"
	} {
		got := HostnameCandidate(tc.base, tc.i)
		if got != tc.want || len(got) > 63 {
			t.Errorf("HostnameCandidate(%q, %d) = %q, want %q", tc.base, tc.i, got, tc.want)
		}
	}
}

// TestMigrationRepairsSharedKeysAndNames opens a database an older meshd
// left with two nodes sharing a node key, two sharing a disco key and
// three sharing a hostname: the shared keys are cleared on every holder,
// the later names are suffixed, each repair is reported, and the unique
// indexes hold afterwards.
func TestMigrationRepairsSharedKeysAndNames(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "db")
	db, err := sql.Open("sqlite", "file:"+path)
	if err != nil {
		t.Fatal(err)
	}
	exec := func(q string, args ...any) {
		t.Helper()
		if _, err := db.ExecContext(ctx, q, args...); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	exec(`CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied INTEGER NOT NULL)`)
	for v := 1; v <= 2; v++ {
		exec(migrations[v-1].sql)
		exec(`INSERT INTO schema_migrations (version, applied) VALUES (?, 0)`, v)
	}
	shared := netmap.NodePublic{0x5}
	sharedDisco := netmap.DiscoPublic{0x5}
	old := []Node{
		{Node: netmap.Node{ID: 1, Hostname: "gpu", NodeKey: shared, DiscoKey: netmap.DiscoPublic{1}}},
		{Node: netmap.Node{ID: 2, Hostname: "gpu", NodeKey: netmap.NodePublic{2}, DiscoKey: sharedDisco}},
		{Node: netmap.Node{ID: 3, Hostname: "gpu-1", NodeKey: shared, DiscoKey: sharedDisco}},
		{Node: netmap.Node{ID: 4, Hostname: "gpu", NodeKey: netmap.NodePublic{4}, DiscoKey: netmap.DiscoPublic{4}}},
		{Node: netmap.Node{ID: 5, Hostname: "solo", NodeKey: netmap.NodePublic{0x55}, DiscoKey: netmap.DiscoPublic{0x55}}},
	}
	for i, n := range old {
		n.MachineKey = mkey(byte(i + 1))
		data, _ := json.Marshal(n)
		exec(`INSERT INTO nodes (id, machine_key, ipv4, data) VALUES (?, ?, ?, ?)`, n.ID, n.MachineKey.String(), fmt.Sprintf("100.64.0.%d", i+1), string(data))
	}
	exec(`INSERT INTO nodes (id, machine_key, ipv4, data) VALUES (6, 'mkey:corrupt', '100.64.0.6', '{not json')`)
	db.Close()

	s, err := OpenSQLite(ctx, path, seqPool{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	want := map[netmap.NodeID]struct {
		host string
		nk   netmap.NodePublic
		dk   netmap.DiscoPublic
	}{
		1: {"gpu", netmap.NodePublic{}, netmap.DiscoPublic{1}},
		2: {"gpu-2", netmap.NodePublic{2}, netmap.DiscoPublic{}}, // gpu-1 is node 3's
		3: {"gpu-1", netmap.NodePublic{}, netmap.DiscoPublic{}},
		4: {"gpu-3", netmap.NodePublic{4}, netmap.DiscoPublic{4}},
		5: {"solo", netmap.NodePublic{0x55}, netmap.DiscoPublic{0x55}},
	}
	for id, w := range want {
		n, err := s.Node(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if n.Hostname != w.host || n.NodeKey != w.nk || n.DiscoKey != w.dk {
			t.Errorf("node %d after migration: %q %s %s, want %q %s %s", id, n.Hostname, n.NodeKey.ShortString(), n.DiscoKey.ShortString(), w.host, w.nk.ShortString(), w.dk.ShortString())
		}
	}
	rep := strings.Join(s.Repairs(), "\n")
	for _, sub := range []string{"node 1 (gpu) shared node key", "node 3 (gpu-1) shared node key", "node 2 (gpu) shared disco key",
		`node 2 renamed from "gpu" to "gpu-2"`, `node 4 renamed from "gpu" to "gpu-3"`, "node row 6 does not decode"} {
		if !strings.Contains(rep, sub) {
			t.Errorf("repairs do not mention %q:\n%s", sub, rep)
		}
	}
	if strings.Contains(rep, "node 5") {
		t.Errorf("repairs mention an untouched node:\n%s", rep)
	}
	// The indexes hold even against a write that skips the checks.
	if _, err := s.db.ExecContext(ctx, `UPDATE nodes SET node_key = ? WHERE id = 5`, netmap.NodePublic{4}.String()); err == nil {
		t.Error("the database took a second holder of a node key")
	}
	// A second open repairs nothing.
	s.Close()
	s2 := open(t, path)
	if r := s2.Repairs(); len(r) != 0 {
		t.Errorf("reopen repaired again: %q", r)
	}
}
