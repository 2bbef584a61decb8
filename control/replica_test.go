package control

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/internal/pgtest"
	"meshd.dev/meshd/netmap"
)

// testPG is the PostgreSQL server of this test binary, started by the
// first test that needs one.
var testPG struct {
	once sync.Once
	s    *pgtest.Server
	err  error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if testPG.s != nil {
		testPG.s.Close()
	}
	os.Exit(code)
}

// pgDatabase returns the URL of a fresh PostgreSQL database for t,
// skipping t where PostgreSQL is not installed.
func pgDatabase(t testing.TB) string {
	t.Helper()
	testPG.once.Do(func() { testPG.s, testPG.err = pgtest.Start(context.Background(), 200) })
	switch {
	case errors.Is(testPG.err, pgtest.ErrNoPostgres):
		t.Skipf("skipping: %v", testPG.err)
	case testPG.err != nil:
		t.Fatalf("PostgreSQL is installed but did not start: %v", testPG.err)
	}
	return testPG.s.Database(t)
}

// startReplicas runs n coordinators on one new PostgreSQL database, each
// with a state dir of its own.
func startReplicas(t *testing.T, n int, opts ServerOptions) []*testServer {
	t.Helper()
	opts.DBURL = pgDatabase(t)
	var out []*testServer
	for range n {
		o := opts
		o.StateDir = t.TempDir()
		out = append(out, startServer(t, o))
	}
	return out
}

// TestReplicasShareOneTailnet: two coordinators on one database are one
// tailnet. They have one key (a node pinned to one trusts the other) and
// one admin token; a node registered on one streams from the other;
// joins, policy changes, deletions and online state made on one reach
// the nodes streaming from the other within a second.
func TestReplicasShareOneTailnet(t *testing.T) {
	ctx := context.Background()
	rs := startReplicas(t, 2, ServerOptions{})
	a, b := rs[0], rs[1]
	if a.Fingerprint() != b.Fingerprint() {
		t.Fatalf("replicas have different keys: %s and %s", a.Fingerprint(), b.Fingerprint())
	}
	if !a.TLSCA().Equal(b.TLSCA()) {
		t.Fatal("replicas have different tailnet CAs")
	}
	// The admin token is in the state dir of the replica that made it,
	// and works on the other.
	if _, err := os.Stat(b.AdminTokenPath()); err == nil {
		t.Fatal("the second replica wrote an admin token of its own")
	}
	tok, err := readFile(a.AdminTokenPath())
	if err != nil {
		t.Fatal(err)
	}
	adminB, err := NewAdminClient(b.url, tok)
	if err != nil {
		t.Fatal(err)
	}
	nk, err := adminB.CreateAuthKey(ctx, AuthKeyOptions{Tags: []string{"tag:a"}, Reusable: true, Preauthorized: true})
	k := nk.Key
	if err != nil {
		t.Fatalf("admin token of replica A on replica B: %v", err)
	}

	// n1 registers on A and streams from A; n2 the same on B.
	n1 := newTestNode(t, a.url, "")
	n1.mustRegister(t, k, "one")
	n1.follow(t, n1.mapRequest())
	n1.waitMap(t, "n1's first map", func(m *netmap.NetworkMap) bool { return m != nil })
	n2 := newTestNode(t, b.url, "")
	start := time.Now()
	n2.mustRegister(t, k, "two")
	n2.follow(t, n2.mapRequest())
	n1.waitMap(t, "n2 (registered on B) in n1's map (from A), online", func(m *netmap.NetworkMap) bool {
		p := m.Peers[n2.id]
		return p != nil && p.Online
	})
	if d := time.Since(start); d > time.Second {
		t.Errorf("a join on B took %v to reach a node on A", d)
	}
	n2.waitMap(t, "n1 online in n2's map", func(m *netmap.NetworkMap) bool {
		p := m.Peers[n1.id]
		return p != nil && p.Online
	})

	// A policy set on B is in force on A.
	start = time.Now()
	if _, err := b.ApplyPolicy(ctx, "ab.hujson", []byte(abPolicy)); err != nil {
		t.Fatal(err)
	}
	n1.waitMap(t, "B's policy in n1's map", func(m *netmap.NetworkMap) bool { return !m.PolicyBootstrap })
	if d := time.Since(start); d > time.Second {
		t.Errorf("a policy change on B took %v to reach a node on A", d)
	}
	if cur := a.CurrentPolicy(); cur.Text != abPolicy {
		t.Fatalf("A's policy after B set one: %+v", cur)
	}

	// An endpoint report to A reaches n2 on B.
	ep := netip.MustParseAddrPort("192.0.2.7:41641")
	req := n1.mapRequest()
	req.Endpoints = []netip.AddrPort{ep}
	if err := n1.c.Update(ctx, req); err != nil {
		t.Fatal(err)
	}
	n2.waitMap(t, "n1's endpoint reported to A", func(m *netmap.NetworkMap) bool {
		p := m.Peers[n1.id]
		return p != nil && slices.Contains(p.Endpoints, ep)
	})

	// Deleting n2 through A removes it from n1's map and ends its
	// stream on B.
	adminA := adminClient(t, a)
	if err := adminA.DeleteNode(ctx, n2.id); err != nil {
		t.Fatal(err)
	}
	n1.waitMap(t, "n2 gone from n1's map", func(m *netmap.NetworkMap) bool { return m.Peers[n2.id] == nil })
	select {
	case err := <-n2.fdone:
		n2.fdone <- err
		if !errors.Is(err, controlclient.ErrNotRegistered) {
			t.Fatalf("n2's stream on B ended with %v, want not registered", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("n2's stream on B outlived its deletion on A")
	}
}

// TestReplicasRegisterConcurrently: machines racing to enrol with one
// single-use key, half on each replica, get exactly one node; machines
// asking for one hostname on both replicas get distinct names and
// addresses.
func TestReplicasRegisterConcurrently(t *testing.T) {
	ctx := context.Background()
	rs := startReplicas(t, 2, ServerOptions{})
	once := rs[0].key(t, AuthKeyOptions{Tags: []string{"tag:a"}})
	many := rs[1].key(t, AuthKeyOptions{Tags: []string{"tag:a"}, Reusable: true})
	const machines = 16
	var wg sync.WaitGroup
	onceErrs := make([]error, machines)
	nodes := make([]*testNode, machines)
	manyErrs := make([]error, machines)
	for i := range machines {
		r := rs[i%2]
		wg.Go(func() {
			_, onceErrs[i] = newTestNode(t, r.url, "").register(ctx, once, "single")
		})
		nodes[i] = newTestNode(t, r.url, "")
		wg.Go(func() {
			_, manyErrs[i] = nodes[i].register(ctx, many, "gpu")
		})
	}
	wg.Wait()
	won := 0
	for _, err := range onceErrs {
		switch {
		case err == nil:
			won++
		case !errors.Is(err, controlclient.ErrAuthKeyUsed):
			t.Errorf("single-use key: %v", err)
		}
	}
	if won != 1 {
		t.Fatalf("%d machines enrolled with one single-use key across two replicas, want 1", won)
	}
	names := map[string]bool{}
	addrs := map[netip.Prefix]bool{}
	for i, n := range nodes {
		if manyErrs[i] != nil {
			t.Fatalf("machine %d: %v", i, manyErrs[i])
		}
		if names[n.self.Hostname] || addrs[n.self.Addresses[0]] {
			t.Fatalf("machine %d got %s %v, which another machine holds", i, n.self.Hostname, n.self.Addresses[0])
		}
		names[n.self.Hostname], addrs[n.self.Addresses[0]] = true, true
	}
	// Both replicas list the same tailnet.
	tok, err := readFile(rs[0].AdminTokenPath())
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rs {
		ac, err := NewAdminClient(r.url, tok)
		if err != nil {
			t.Fatal(err)
		}
		infos, err := ac.Nodes(ctx)
		if err == nil && len(infos) != machines+1 {
			err = errors.New("wrong count")
		}
		if err != nil {
			t.Fatalf("%s lists %d nodes (%v), want %d", r.url, len(infos), err, machines+1)
		}
	}
}

// replicaFleet registers n nodes of one tag, half streaming from a (the
// even ones, given a's URL first) and half from b, and waits until every
// node sees every other online.
func replicaFleet(t *testing.T, a, b *testServer, n int) []*testNode {
	t.Helper()
	k := a.key(t, AuthKeyOptions{Tags: []string{"tag:a"}, Reusable: true})
	var nodes []*testNode
	for i := range n {
		urls := a.url + "," + b.url
		if i%2 == 1 {
			urls = b.url + "," + a.url
		}
		nd := newTestNode(t, urls, "")
		nd.mustRegister(t, k, "node")
		nd.follow(t, nd.mapRequest())
		nodes = append(nodes, nd)
	}
	for _, nd := range nodes {
		nd.waitMap(t, "every peer online", func(m *netmap.NetworkMap) bool {
			if len(m.Peers) != n-1 {
				return false
			}
			for _, p := range m.Peers {
				if !p.Online {
					return false
				}
			}
			return true
		})
	}
	return nodes
}

// TestFailoverKeepsPeers: when a replica dies and nothing else changes,
// the nodes that streamed from it start again on the survivor with a full
// map that keeps the peers they hold (protocol 5): the survivor sends none
// of their entries, and every node still ends with its full map.
func TestFailoverKeepsPeers(t *testing.T) {
	rs := startReplicas(t, 2, ServerOptions{})
	a, b := rs[0], rs[1]
	const n = 6
	nodes := replicaFleet(t, a, b, n)
	full := b.hub.stats.full.Load()
	a.stop(t)
	waitFor(t, "every stream on B", func() bool { return b.hub.connected() == n })
	if got := b.hub.stats.peersKept.Load(); got != n/2 {
		t.Errorf("%d streams on B kept their peers, want the %d that failed over (%d full maps)", got, n/2, b.hub.stats.full.Load()-full)
	}
	for _, nd := range nodes {
		nd.waitMap(t, "B's full map", func(m *netmap.NetworkMap) bool {
			b.hub.mu.Lock()
			want := b.hub.fullLocked(b.hub.nodes[nd.id])
			b.hub.mu.Unlock()
			resp := decodeMsg(t, want)
			if len(m.Peers) != len(resp.Peers) {
				return false
			}
			for _, p := range resp.Peers {
				if q := m.Peers[p.ID]; q == nil || q.Online != p.Online || !slices.Equal(q.Endpoints, p.Endpoints) || q.NodeKey != p.NodeKey {
					return false
				}
			}
			return true
		})
	}
}

// TestNodesFailOverBetweenReplicas: nodes given both replicas' URLs keep
// their map when the replica they stream from is killed in the middle of
// a policy change: every stream resumes on the other within seconds, and
// every node ends with the tailnet as the database has it (the change
// either happened or not, the same for every node).
func TestNodesFailOverBetweenReplicas(t *testing.T) {
	ctx := context.Background()
	rs := startReplicas(t, 2, ServerOptions{})
	a, b := rs[0], rs[1]
	const n = 8
	nodes := replicaFleet(t, a, b, n)
	if got := a.hub.connected(); got != n/2 {
		t.Fatalf("%d nodes stream from A, want %d (the first URL)", got, n/2)
	}

	// Kill A while it applies a policy.
	done := make(chan error, 1)
	go func() {
		_, err := a.ApplyPolicy(ctx, "ab.hujson", []byte(abPolicy))
		done <- err
	}()
	killed := time.Now()
	a.stop(t)
	<-done // stored and in force, or cut short: either is fine

	waitFor(t, "every stream on B", func() bool { return b.hub.connected() == n })
	if d := time.Since(killed); d > 5*time.Second {
		t.Errorf("streams took %v to fail over", d)
	}
	t.Logf("all %d streams on B %v after A was killed", n, time.Since(killed).Round(time.Millisecond))
	// The nodes that moved resumed the TLS sessions A had issued: the
	// replicas share their ticket keys (tickets.go).
	if got := b.hub.stats.tlsResumed.Load(); got < n/2 {
		t.Errorf("%d map streams on B resumed a TLS session, want the %d that failed over", got, n/2)
	}
	want := b.CurrentPolicy()
	stored, err := b.store.Policy(ctx)
	if err == nil && stored.File != want.File {
		t.Fatalf("B has %q in force, the database %q", want.File, stored.File)
	}
	for _, nd := range nodes {
		nd.waitMap(t, "the database's policy and every peer online", func(m *netmap.NetworkMap) bool {
			if m.PolicyBootstrap != want.Bootstrap || len(m.Peers) != n-1 {
				return false
			}
			for _, p := range m.Peers {
				if !p.Online {
					return false
				}
			}
			return true
		})
	}
	// B goes on serving changes: a new node reaches them all.
	late := newTestNode(t, b.url, "")
	late.mustRegister(t, b.key(t, AuthKeyOptions{Tags: []string{"tag:a"}}), "late")
	for _, nd := range nodes {
		nd.waitMap(t, "the late node", func(m *netmap.NetworkMap) bool { return m.Peers[late.id] != nil })
	}
}

// TestReplicaGoneTakesItsNodesOffline: a node that streams only from a
// replica that is stopped shows as offline on the other replica (which
// notices that the dead one left the database), but only after the grace
// period; a node that fails over within it is never shown offline, so its
// peers get no frame for the move. The moving node reconnects 4-8 s
// after the stop, after the survivor has noticed (livenessInterval).
func TestReplicaGoneTakesItsNodesOffline(t *testing.T) {
	const grace = 10 * time.Second
	rs := startReplicas(t, 2, ServerOptions{goneGrace: grace})
	a, b := rs[0], rs[1]
	k := a.key(t, AuthKeyOptions{Tags: []string{"tag:a"}, Reusable: true})
	stuck := newTestNode(t, a.url, "") // knows only A
	stuck.mustRegister(t, k, "stuck")
	stuck.follow(t, stuck.mapRequest())
	moving := newTestNodeOpts(t, controlclient.ClientOptions{URL: a.url + "," + b.url, MinBackoff: 8 * time.Second, MaxBackoff: 8 * time.Second})
	moving.mustRegister(t, k, "moving")
	moving.follow(t, moving.mapRequest())
	watcher := newTestNode(t, b.url, "")
	watcher.mustRegister(t, k, "watcher")
	var (
		mu           sync.Mutex
		killed       time.Time
		movingOff    bool
		stuckOffSeen time.Time
	)
	watcher.onMap = func(m *netmap.NetworkMap) {
		mu.Lock()
		defer mu.Unlock()
		if killed.IsZero() {
			return
		}
		if p := m.Peers[moving.id]; p == nil || !p.Online {
			movingOff = true
		}
		if p := m.Peers[stuck.id]; p != nil && !p.Online && stuckOffSeen.IsZero() {
			stuckOffSeen = time.Now()
		}
	}
	watcher.follow(t, watcher.mapRequest())
	watcher.waitMap(t, "both nodes on A online", func(m *netmap.NetworkMap) bool {
		s, mv := m.Peers[stuck.id], m.Peers[moving.id]
		return s != nil && s.Online && mv != nil && mv.Online
	})
	mu.Lock()
	killed = time.Now()
	mu.Unlock()
	a.stop(t)
	waitFor(t, "the moving node on B", func() bool { return b.hub.online(moving.id) })
	watcher.waitMap(t, "the node stuck on A offline, the other online", func(m *netmap.NetworkMap) bool {
		s, mv := m.Peers[stuck.id], m.Peers[moving.id]
		return s != nil && !s.Online && mv != nil && mv.Online
	})
	mu.Lock()
	defer mu.Unlock()
	if movingOff {
		t.Error("the node that failed over was shown offline (or removed) in between")
	}
	if d := stuckOffSeen.Sub(killed); d < grace {
		t.Errorf("the node stuck on A was shown offline %v after A stopped, before the %v grace", d, grace)
	}
}

// TestReplicasShareEmbeddedRelays: replicas running embedded relays hand
// out one region holding every live replica's relay, the oldest first, so
// that nodes streaming from different replicas use the same relay; when
// that replica is gone, its relay leaves the map the others send, and the
// nodes move to the next one.
func TestReplicasShareEmbeddedRelays(t *testing.T) {
	rs := startReplicas(t, 2, ServerOptions{})
	a, b := rs[0], rs[1]
	relayA := EmbeddedDERPMap("192.0.2.1", 8443, 3478, a.Fingerprint())
	relayB := EmbeddedDERPMap("192.0.2.2", 9443, -1, b.Fingerprint())
	if err := a.SetEmbeddedDERPMap(relayA); err != nil {
		t.Fatal(err)
	}
	k := a.key(t, AuthKeyOptions{Tags: []string{"tag:a"}, Reusable: true})
	onB := newTestNode(t, b.url, "")
	onB.mustRegister(t, k, "on-b")
	onB.follow(t, onB.mapRequest())
	// B's own map until it has a relay: A's relay is not B's to hand out
	// when B was given a --derp-map (here: none).
	if m := onB.waitMap(t, "a first map", func(*netmap.NetworkMap) bool { return true }); len(m.DERPMap.Regions) != 0 {
		t.Fatalf("B, which has no embedded relay, handed out %+v", m.DERPMap)
	}
	if err := b.SetEmbeddedDERPMap(relayB); err != nil {
		t.Fatal(err)
	}
	hosts := func(m *netmap.DERPMap) []string {
		var out []string
		for _, r := range m.Regions {
			if r.ID != EmbeddedDERPRegionID {
				return []string{"unexpected region " + r.Code}
			}
			for _, n := range r.Nodes {
				out = append(out, n.Host)
			}
		}
		return out
	}
	both := []string{"192.0.2.1", "192.0.2.2"}
	onB.waitMap(t, "both relays, A's first (a stream open before the region grew)", func(m *netmap.NetworkMap) bool {
		return slices.Equal(hosts(&m.DERPMap), both)
	})
	onA := newTestNode(t, a.url, "")
	onA.mustRegister(t, k, "on-a")
	onA.follow(t, onA.mapRequest())
	m := onA.waitMap(t, "both relays, A's first", func(m *netmap.NetworkMap) bool {
		return slices.Equal(hosts(&m.DERPMap), both)
	})
	if n := m.DERPMap.Regions[0].Nodes[1]; n.DERPPort != 9443 || n.STUNPort != -1 || n.CertFingerprint != b.Fingerprint() {
		t.Fatalf("B's relay as A hands it out: %+v", n)
	}
	for _, ts := range rs {
		if got := hosts(ts.DERPMap()); !slices.Equal(got, both) {
			t.Fatalf("%s serves relays %v at %s, want %v", ts.url, got, DERPMapPath, both)
		}
	}

	a.stop(t)
	onB.waitMap(t, "only B's relay once A is gone", func(m *netmap.NetworkMap) bool {
		return slices.Equal(hosts(&m.DERPMap), []string{"192.0.2.2"})
	})
	// A node that resumes on B after A's end gets the new map too.
	late := newTestNode(t, b.url, "")
	late.mustRegister(t, b.key(t, AuthKeyOptions{Tags: []string{"tag:a"}}), "late")
	late.follow(t, late.mapRequest())
	late.waitMap(t, "only B's relay", func(m *netmap.NetworkMap) bool {
		return slices.Equal(hosts(&m.DERPMap), []string{"192.0.2.2"})
	})
}

// TestSetEmbeddedDERPMapRefusesOtherMaps: only the one-region map of an
// embedded relay is shared as one.
func TestSetEmbeddedDERPMapRefusesOtherMaps(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	two := EmbeddedDERPMap("192.0.2.1", 443, 0, "")
	two.Regions[0].Nodes = append(two.Regions[0].Nodes, two.Regions[0].Nodes[0])
	other := EmbeddedDERPMap("192.0.2.1", 443, 0, "")
	other.Regions[0].ID = 7
	for _, m := range []*netmap.DERPMap{nil, two, other, {}} {
		if err := ts.SetEmbeddedDERPMap(m); err == nil {
			t.Errorf("SetEmbeddedDERPMap(%+v) accepted", m)
		}
	}
	if ts.DERPMap() != nil {
		t.Fatalf("a refused map is in force: %+v", ts.DERPMap())
	}
}

// TestTokenRotationReachesReplicas: an admin or relay token rotated on one
// replica is the only one every replica accepts, within a second or so.
func TestTokenRotationReachesReplicas(t *testing.T) {
	ctx := context.Background()
	rs := startReplicas(t, 2, ServerOptions{})
	a, b := rs[0], rs[1]
	relayPath, err := a.EnableRelayVerify()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.EnableRelayVerify(); err != nil {
		t.Fatal(err)
	}
	oldRelay := mustReadToken(t, relayPath)
	oldAdmin := mustReadToken(t, a.AdminTokenPath())
	acA, err := NewAdminClient(a.url, oldAdmin)
	if err != nil {
		t.Fatal(err)
	}
	rr, err := acA.RotateToken(ctx, TokenRelay)
	if err != nil {
		t.Fatal(err)
	}
	ar, err := acA.RotateToken(ctx, TokenAdmin)
	if err != nil {
		t.Fatal(err)
	}
	acBOld, _ := NewAdminClient(b.url, oldAdmin)
	acBNew, _ := NewAdminClient(b.url, ar.Token)
	waitFor(t, "B to accept only the new tokens", func() bool {
		_, errOld := acBOld.Nodes(ctx)
		_, errNew := acBNew.Nodes(ctx)
		return errors.Is(errOld, controlclient.ErrUnauthorized) && errNew == nil &&
			relayRequest(t, b, "POST", relayVerifyPath, oldRelay).StatusCode == 401 &&
			relayRequest(t, b, "POST", relayVerifyPath, rr.Token).StatusCode == 200
	})
}
