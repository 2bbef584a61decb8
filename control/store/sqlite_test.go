package store

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"meshd.dev/meshd/netmap"
)

// tinyPool is a 3-address pool, to test exhaustion and reuse.
type tinyPool struct{}

var tinyAddrs = []netip.Addr{netip.MustParseAddr("100.64.0.1"), netip.MustParseAddr("100.64.0.2"), netip.MustParseAddr("100.64.0.3")}

func (tinyPool) Size() int { return len(tinyAddrs) }
func (tinyPool) Next(prev netip.Addr) netip.Addr {
	for i, a := range tinyAddrs {
		if a == prev {
			return tinyAddrs[(i+1)%len(tinyAddrs)]
		}
	}
	return tinyAddrs[0]
}
func (tinyPool) Addresses(v4 netip.Addr) []netip.Prefix {
	return []netip.Prefix{netip.PrefixFrom(v4, 32)}
}

// open opens the database at path, creating it first if there is none.
func open(t *testing.T, path string) *SQLite {
	t.Helper()
	s, err := OpenSQLite(context.Background(), path, tinyPool{})
	if errors.Is(err, ErrNoDatabase) {
		s, err = CreateSQLite(context.Background(), path, tinyPool{}, nil)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func mkey(b byte) netmap.MachinePublic { return netmap.MachinePublic{b} }

func reg(s Store, mk netmap.MachinePublic, keyID string, reusable bool) (Node, error) {
	return s.Register(context.Background(), RegisterParams{
		MachineKey: mk, NodeKey: netmap.NodePublic{1, mk[0]}, Hostname: "h", Now: time.Now(),
		Identity: &Identity{Tags: []string{"tag:x"}, Authorized: true, AuthKeyID: keyID}, ConsumeKey: true, Reusable: reusable,
	})
}

func TestReopenKeepsStateAndMigratesOnce(t *testing.T) {
	eachBackend(t, func(t *testing.T, bk backend) {
		ctx := context.Background()
		s, reopen := bk.create(t, tinyPool{})
		if err := s.InsertAuthKey(ctx, AuthKey{ID: "k1", Hash: []byte{1}, Reusable: true, Tags: []string{"tag:x"}, Created: time.Now()}); err != nil {
			t.Fatal(err)
		}
		n, err := reg(s, mkey(1), "k1", true)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.SetMeta(ctx, "a", "b"); err != nil {
			t.Fatal(err)
		}
		s2 := mustReopen(t, reopen)
		var versions int
		if err := s2.q().QueryRowContext(ctx, `SELECT COUNT(*) FROM schema_migrations`).Scan(&versions); err != nil || versions != len(s2.d.migrations) {
			t.Fatalf("migrations recorded %d (%v); want %d", versions, err, len(s2.d.migrations))
		}
		got, err := s2.NodeByMachine(ctx, mkey(1))
		if err != nil || got.ID != n.ID || got.Addresses[0] != n.Addresses[0] {
			t.Fatalf("node after reopen: %+v %v", got, err)
		}
		k, err := s2.AuthKey(ctx, "k1")
		if err != nil || k.Uses != 1 || k.LastUsed.IsZero() {
			t.Fatalf("key after reopen: %+v %v", k, err)
		}
		if v, err := s2.Meta(ctx, "a"); err != nil || v != "b" {
			t.Fatalf("meta after reopen: %q %v", v, err)
		}
		if _, err := s2.Meta(ctx, "missing"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("missing meta: %v", err)
		}
	})
}

func TestNewerSchemaRefused(t *testing.T) {
	eachBackend(t, func(t *testing.T, bk backend) {
		s, reopen := bk.create(t, tinyPool{})
		rawExec(t, s, same(`INSERT INTO schema_migrations (version, applied) VALUES (999, 0)`))
		if _, err := reopen(t); err == nil || !strings.Contains(err.Error(), "newer than this build") {
			t.Fatalf("opened a database from a newer build: %v", err)
		}
	})
}

func TestSingleUseConsumedOnce(t *testing.T) {
	eachBackend(t, func(t *testing.T, bk backend) {
		s := newStore(t, bk, tinyPool{})
		ctx := context.Background()
		if err := s.InsertAuthKey(ctx, AuthKey{ID: "once", Hash: []byte{1}, Created: time.Now()}); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		errs := make([]error, 3)
		for i := range errs {
			wg.Add(1)
			go func() { defer wg.Done(); _, errs[i] = reg(s, mkey(byte(i+1)), "once", false) }()
		}
		wg.Wait()
		ok := 0
		for _, err := range errs {
			if err == nil {
				ok++
			} else if !errors.Is(err, ErrKeyUnusable) {
				t.Errorf("unexpected error %v", err)
			}
		}
		if ok != 1 {
			t.Fatalf("%d registrations consumed a single-use key", ok)
		}
		if err := s.RevokeAuthKey(ctx, "once", time.Now()); err != nil {
			t.Fatal(err)
		}
		if err := s.RevokeAuthKey(ctx, "nope", time.Now()); !errors.Is(err, ErrNotFound) {
			t.Fatalf("revoke unknown: %v", err)
		}
	})
}

func TestAllocationExhaustsAndReuses(t *testing.T) {
	eachBackend(t, func(t *testing.T, bk backend) {
		s := newStore(t, bk, tinyPool{})
		ctx := context.Background()
		if err := s.InsertAuthKey(ctx, AuthKey{ID: "r", Hash: []byte{1}, Reusable: true, Created: time.Now()}); err != nil {
			t.Fatal(err)
		}
		var nodes []Node
		for i := range 3 {
			n, err := reg(s, mkey(byte(i+1)), "r", true)
			if err != nil {
				t.Fatal(err)
			}
			nodes = append(nodes, n)
		}
		if _, err := reg(s, mkey(9), "r", true); !errors.Is(err, ErrPoolExhausted) {
			t.Fatalf("fourth node in a 3-address pool: %v", err)
		}
		// Re-registering an existing machine needs no new address.
		if n, err := reg(s, mkey(2), "r", true); err != nil || n.Addresses[0] != nodes[1].Addresses[0] {
			t.Fatalf("re-register: %v %v", n.Addresses, err)
		}
		if err := s.DeleteNode(ctx, nodes[1].ID); err != nil {
			t.Fatal(err)
		}
		n, err := reg(s, mkey(9), "r", true)
		if err != nil || n.Addresses[0] != nodes[1].Addresses[0] || n.ID <= nodes[2].ID {
			t.Fatalf("after delete: id %d addrs %v err %v; want the freed address and a fresh id", n.ID, n.Addresses, err)
		}
		if err := s.DeleteNode(ctx, 1<<63); !errors.Is(err, ErrNotFound) {
			t.Fatalf("delete an id beyond int64: %v", err)
		}
		if err := s.DeleteNode(ctx, 12345); !errors.Is(err, ErrNotFound) {
			t.Fatalf("delete unknown: %v", err)
		}
	})
}

func TestUpdateNodeKeepsIdentityColumns(t *testing.T) {
	eachBackend(t, func(t *testing.T, bk backend) {
		s := newStore(t, bk, tinyPool{})
		ctx := context.Background()
		s.InsertAuthKey(ctx, AuthKey{ID: "r", Hash: []byte{1}, Reusable: true, Created: time.Now()})
		n, err := reg(s, mkey(1), "r", true)
		if err != nil {
			t.Fatal(err)
		}
		n.Addresses = nil
		n.MachineKey = mkey(7)
		n.Endpoints = []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:1")}
		if err := s.UpdateNode(ctx, n); err != nil {
			t.Fatal(err)
		}
		got, err := s.Node(ctx, n.ID)
		if err != nil || got.MachineKey != mkey(1) || len(got.Addresses) != 1 || len(got.Endpoints) != 1 {
			t.Fatalf("after update: %+v %v", got, err)
		}
		if err := s.UpdateNode(ctx, Node{Node: netmap.Node{ID: 99}}); !errors.Is(err, ErrNotFound) {
			t.Fatalf("update unknown: %v", err)
		}
		if _, err := s.Register(ctx, RegisterParams{MachineKey: mkey(5), Now: time.Now()}); !errors.Is(err, ErrNotFound) {
			t.Fatalf("re-register unknown machine without identity: %v", err)
		}
	})
}
