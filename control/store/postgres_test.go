package store

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"meshd.dev/meshd/netmap"
)

// TestOpenPostgresRefusesWhatIsNotOurs: an empty database is
// ErrNoDatabase and another program's is ErrNotMeshd, and neither is
// written to.
func TestOpenPostgresRefusesWhatIsNotOurs(t *testing.T) {
	needPostgres(t)
	ctx := context.Background()
	empty := pg.Database(t)
	if _, err := OpenPostgres(ctx, empty, tinyPool{}, PostgresOptions{}); !errors.Is(err, ErrNoDatabase) {
		t.Fatalf("empty database: %v, want ErrNoDatabase", err)
	}
	foreign := pg.Database(t)
	f, err := CreatePostgres(ctx, foreign, tinyPool{}, PostgresOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	// Make it someone else's: their table, no schema_migrations.
	for _, q := range []string{`DROP TABLE schema_migrations`, `CREATE TABLE photos (id INT)`} {
		if _, err := f.db.ExecContext(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	for _, open := range []func() error{
		func() error { _, err := OpenPostgres(ctx, foreign, tinyPool{}, PostgresOptions{}); return err },
		func() error { _, err := CreatePostgres(ctx, foreign, tinyPool{}, PostgresOptions{}, nil); return err },
	} {
		if err := open(); !errors.Is(err, ErrNotMeshd) {
			t.Fatalf("another program's database: %v, want ErrNotMeshd", err)
		}
	}
	if _, err := OpenPostgres(ctx, "postgres://meshd@/nonexistent?host=/nonexistent-dir", tinyPool{}, PostgresOptions{}); err == nil {
		t.Fatal("opened a database that cannot be reached")
	}
}

// replicas opens n Postgres stores on one fresh database, as n
// coordinators would, the first one creating it.
func replicas(t *testing.T, n int, pool AddrAllocator) []*Postgres {
	t.Helper()
	needPostgres(t)
	ctx := context.Background()
	url := pg.Database(t)
	var out []*Postgres
	for i := range n {
		var s *Postgres
		var err error
		if i == 0 {
			s, err = CreatePostgres(ctx, url, pool, PostgresOptions{Name: fmt.Sprintf("replica-%d", i)}, map[string]string{"owner": "first"})
		} else {
			s, err = OpenPostgres(ctx, url, pool, PostgresOptions{Name: fmt.Sprintf("replica-%d", i)})
		}
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		out = append(out, s)
	}
	return out
}

// TestReplicasCreateTogether: coordinators initialising one empty
// database at the same time migrate it once, and the first claim of a
// setting stands for all of them.
func TestReplicasCreateTogether(t *testing.T) {
	needPostgres(t)
	ctx := context.Background()
	url := pg.Database(t)
	const n = 4
	got := make([]string, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			s, err := CreatePostgres(ctx, url, tinyPool{}, PostgresOptions{}, map[string]string{"owner": fmt.Sprint(i)})
			if err != nil {
				errs[i] = err
				return
			}
			defer s.Close()
			got[i], errs[i] = s.Meta(ctx, "owner")
		})
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("replica %d: %v", i, errs[i])
		}
		if got[i] != got[0] {
			t.Fatalf("replicas disagree on the owner: %q", got)
		}
	}
}

// TestReplicasRegisterExactlyOnce: machines racing to register on two
// coordinators sharing one database consume a single-use key once, never
// share an address, a hostname or a node key.
func TestReplicasRegisterExactlyOnce(t *testing.T) {
	ctx := context.Background()
	rs := replicas(t, 2, seqPool{})
	hash := make([]byte, 32)
	if err := rs[0].InsertAuthKey(ctx, AuthKey{ID: "once", Hash: hash, Created: time.Now()}); err != nil {
		t.Fatal(err)
	}
	if err := rs[0].InsertAuthKey(ctx, AuthKey{ID: "many", Hash: hash, Reusable: true, Created: time.Now()}); err != nil {
		t.Fatal(err)
	}
	const machines = 40
	type result struct {
		n   Node
		err error
	}
	res := make([]result, machines)
	var wg sync.WaitGroup
	for i := range machines {
		wg.Go(func() {
			key, reusable := "many", true
			if i%4 == 0 {
				key, reusable = "once", false
			}
			nk := netmap.NodePublic{byte(i), 1}
			if i%10 == 9 {
				nk = netmap.NodePublic{0xee} // every tenth machine claims one key
			}
			n, err := rs[i%2].Register(ctx, RegisterParams{
				MachineKey: netmap.MachinePublic{byte(i), 2}, NodeKey: nk, DiscoKey: netmap.DiscoPublic{byte(i), 3},
				Hostname: "gpu", Now: time.Now(),
				Identity:   &Identity{Tags: []string{"tag:x"}, Authorized: true, AuthKeyID: key},
				ConsumeKey: true, Reusable: reusable,
			})
			res[i] = result{n, err}
		})
	}
	wg.Wait()
	onceWon, sharedKeyWon := 0, 0
	addrs := map[netip.Addr]int{}
	names := map[string]int{}
	for i, r := range res {
		switch {
		case r.err == nil:
		case errors.Is(r.err, ErrKeyUnusable) && i%4 == 0:
			continue
		case errors.Is(r.err, ErrKeyInUse) && i%10 == 9:
			continue
		default:
			t.Fatalf("machine %d: %v", i, r.err)
		}
		if i%4 == 0 {
			onceWon++
		}
		if i%10 == 9 {
			sharedKeyWon++
		}
		addrs[r.n.Addresses[0].Addr()]++
		names[r.n.Hostname]++
	}
	if onceWon != 1 {
		t.Errorf("%d registrations consumed the single-use key, want 1", onceWon)
	}
	if sharedKeyWon > 1 {
		t.Errorf("%d machines hold one node key", sharedKeyWon)
	}
	for a, c := range addrs {
		if c > 1 {
			t.Errorf("address %v handed out %d times", a, c)
		}
	}
	for h, c := range names {
		if c > 1 {
			t.Errorf("hostname %q given %d times", h, c)
		}
	}
	nodes, err := rs[1].Nodes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(nodes) != len(addrs) {
		t.Errorf("%d nodes stored, %d registrations succeeded", len(nodes), len(addrs))
	}
	k, err := rs[1].AuthKey(ctx, "once")
	if err != nil || k.Uses != 1 {
		t.Errorf("single-use key: %d uses (%v), want 1", k.Uses, err)
	}
}

// TestChangeFeed: what one coordinator commits reaches another's
// listener, in commit order, and nothing of a rolled-back transaction.
func TestChangeFeed(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	rs := replicas(t, 2, seqPool{})
	l, err := rs[1].Listen(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan Change, 16)
	done := make(chan struct{})
	go func() {
		defer close(done)
		l.Run(ctx, func(c Change) { got <- c }, func(err error) { t.Log(err) })
	}()
	defer func() { cancel(); <-done }()
	next := func() Change {
		t.Helper()
		select {
		case c := <-got:
			return c
		case <-time.After(10 * time.Second):
			t.Fatal("no change within 10s")
			return Change{}
		}
	}
	w := rs[0]
	if err := w.InsertAuthKey(ctx, AuthKey{ID: "r", Hash: make([]byte, 32), Reusable: true, Created: time.Now()}); err != nil {
		t.Fatal(err)
	}
	n, err := regKeys(w, mkey(1), netmap.NodePublic{1}, netmap.DiscoPublic{1}, "a")
	if err != nil {
		t.Fatal(err)
	}
	if c := next(); c.Kind != ChangeNode || c.Node != n.ID {
		t.Fatalf("after a registration: %+v, want node %d", c, n.ID)
	}
	// A refused registration (rolled back) announces nothing.
	if _, err := regKeys(w, mkey(2), netmap.NodePublic{1}, netmap.DiscoPublic{2}, "b"); !errors.Is(err, ErrKeyInUse) {
		t.Fatalf("second holder of a node key: %v", err)
	}
	if err := w.SetPolicy(ctx, Policy{File: "p", Data: []byte("{}"), Updated: time.Now()}); err != nil {
		t.Fatal(err)
	}
	if c := next(); c.Kind != ChangePolicy {
		t.Fatalf("after a rolled-back registration and a policy: %+v, want the policy", c)
	}
	if err := w.SetMeta(ctx, "admin_token_sha256", "x"); err != nil {
		t.Fatal(err)
	}
	if c := next(); c.Kind != ChangeMeta || c.Key != "admin_token_sha256" {
		t.Fatalf("after a setting: %+v", c)
	}
	if err := w.Announce(ctx, "o:replica-0:1"); err != nil {
		t.Fatal(err)
	}
	if c := next(); c.Kind != ChangeAnnounce || c.Msg != "o:replica-0:1" {
		t.Fatalf("after an announcement: %+v", c)
	}
	// An SSH approval is announced, its adding is not.
	now := time.Now()
	if err := w.AddSSHCheck(ctx, sshCheck("chk", 1, 2, now, 0), 10, now); err != nil {
		t.Fatal(err)
	}
	if _, err := w.ApproveSSHCheck(ctx, "chk", now); err != nil {
		t.Fatal(err)
	}
	if c := next(); c.Kind != ChangeSSHApproved || c.Key != "chk" {
		t.Fatalf("after an ssh approval: %+v", c)
	}
	if err := w.DeleteNode(ctx, n.ID); err != nil {
		t.Fatal(err)
	}
	if c := next(); c.Kind != ChangeNode || c.Node != n.ID {
		t.Fatalf("after a delete: %+v", c)
	}
	// The feed's connection is cut: the listener reconnects and says
	// that it may have missed changes.
	if _, err := w.db.ExecContext(ctx, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()`); err != nil {
		t.Fatal(err)
	}
	if c := next(); c.Kind != ChangeResync {
		t.Fatalf("after the feed's connection was cut: %+v, want a resync", c)
	}
	if err := w.SetPolicy(ctx, Policy{File: "q", Data: []byte("{}"), Updated: time.Now()}); err != nil {
		t.Fatal(err)
	}
	if c := next(); c.Kind != ChangePolicy {
		t.Fatalf("after reconnecting: %+v", c)
	}
}

func TestParseChange(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Change
		bad  bool
	}{
		{"p", Change{Kind: ChangePolicy}, false},
		{"n:42", Change{Kind: ChangeNode, Node: 42}, false},
		{"m:k", Change{Kind: ChangeMeta, Key: "k"}, false},
		{"o:x", Change{Kind: ChangeAnnounce, Msg: "o:x"}, false},
		{"s:abc", Change{Kind: ChangeSSHApproved, Key: "abc"}, false},
		{"s:", Change{}, true},
		{"n:", Change{}, true},
		{"n:0", Change{}, true},
		{"n:-1", Change{}, true},
		{"n:99999999999999999999999", Change{}, true},
	} {
		got, err := parseChange(tc.in)
		if (err != nil) != tc.bad || got != tc.want {
			t.Errorf("parseChange(%q) = %+v, %v", tc.in, got, err)
		}
	}
}

func TestNodesByID(t *testing.T) {
	ctx := context.Background()
	rs := replicas(t, 1, seqPool{})
	s := rs[0]
	if err := s.InsertAuthKey(ctx, AuthKey{ID: "r", Hash: make([]byte, 32), Reusable: true, Created: time.Now()}); err != nil {
		t.Fatal(err)
	}
	var want []netmap.NodeID
	for i := range 3 {
		n, err := regKeys(s, mkey(byte(i+1)), netmap.NodePublic{byte(i + 1)}, netmap.DiscoPublic{byte(i + 1)}, "h")
		if err != nil {
			t.Fatal(err)
		}
		want = append(want, n.ID)
	}
	got, err := s.NodesByID(ctx, []netmap.NodeID{want[0], want[2], 999, 1 << 63})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].ID+got[1].ID != want[0]+want[2] {
		t.Fatalf("NodesByID: %v, want nodes %d and %d", got, want[0], want[2])
	}
}
