package control

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"database/sql"
	"encoding/json"
	"errors"
	"net/http"
	"net/netip"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/internal/clock/clocktest"
	"meshd.dev/meshd/netmap"
)

// impersonate makes n claim victim's node key, holding its private half
// too (a copied state dir, or a stolen key): only uniqueness stops it.
func (n *testNode) impersonate(victim *testNode) {
	n.nk = victim.nk
	n.c.SetNodeKey(victim.nk)
}

// TestKeyHeldByAnotherNodeRefused: no node can take a node key or disco
// key another node holds, at registration or in a map request, even
// holding the private key; the holder's entry in everyone's map is
// untouched.
func TestKeyHeldByAnotherNodeRefused(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	ctx := context.Background()
	key := ts.key(t, AuthKeyOptions{Tags: []string{"tag:x"}, Reusable: true})
	a, b := newTestNode(t, ts.url, ""), newTestNode(t, ts.url, "")
	a.mustRegister(t, key, "a")
	b.mustRegister(t, key, "b")
	a.follow(t, a.mapRequest())
	b.follow(t, b.mapRequest())
	b.waitMap(t, "a online", peerOnline(a.id, true))
	aKeys := func(m *netmap.NetworkMap) bool {
		p := m.Peers[a.id]
		return p != nil && p.NodeKey == a.nk.Public() && p.DiscoKey == a.dk.Public()
	}

	// A new machine registering with a's node key, then with a's disco key.
	c := newTestNode(t, ts.url, "")
	c.impersonate(a)
	_, err := c.register(ctx, key, "c")
	wantErr(t, err, controlclient.ErrKeyInUse)
	c2 := newTestNode(t, ts.url, "")
	c2.dk = a.dk
	_, err = c2.register(ctx, key, "c2")
	wantErr(t, err, controlclient.ErrKeyInUse)
	if !strings.Contains(err.Error(), "disco key") || strings.Contains(err.Error(), "node 1") {
		t.Errorf("refusal %q: want it to name the disco key and not the holder", err)
	}

	// b re-registering, or rotating in a map request, onto a's keys.
	bOwn := b.nk
	b.impersonate(a)
	_, err = b.register(ctx, "", "b")
	wantErr(t, err, controlclient.ErrKeyInUse)
	wantErr(t, b.c.Update(ctx, b.mapRequest()), controlclient.ErrKeyInUse)
	b.nk = bOwn
	b.c.SetNodeKey(bOwn)
	req := b.mapRequest()
	req.DiscoKey = a.dk.Public()
	wantErr(t, b.c.Update(ctx, req), controlclient.ErrKeyInUse)

	// Nothing changed: a is a's, b is b's, and the coordinator knows no
	// third node.
	if m := b.waitMap(t, "a's keys", aKeys); m.Peers[a.id].NodeKey == m.Self.NodeKey {
		t.Fatal("b shares a's node key")
	}
	nodes, err := ts.Nodes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(nodes) != 2 {
		t.Fatalf("%d nodes, want 2", len(nodes))
	}
	for _, n := range nodes {
		want := map[netmap.NodeID]netmap.NodePublic{a.id: a.nk.Public(), b.id: bOwn.Public()}[n.ID]
		if n.NodeKey != want {
			t.Errorf("node %d holds %s, want %s", n.ID, n.NodeKey.ShortString(), want.ShortString())
		}
	}
	// b still works with its own keys.
	if err := b.c.Update(ctx, b.mapRequest()); err != nil {
		t.Fatalf("b's own keys after the refusals: %v", err)
	}
}

// challengeFor asks the coordinator for a node key challenge as machine mk.
func challengeFor(t *testing.T, ts *testServer, mk ed25519.PrivateKey) *netmap.Challenge {
	t.Helper()
	var ch netmap.Challenge
	err := controlclient.DoJSON(context.Background(), machineHTTP(t, ts.Fingerprint(), mk), http.MethodPost,
		ts.url+controlclient.ChallengePath, "", netmap.ChallengeRequest{Version: netmap.ProtocolVersion}, &ch, nil)
	if err != nil {
		t.Fatal(err)
	}
	return &ch
}

func machinePublic(mk ed25519.PrivateKey) netmap.MachinePublic {
	pub, _ := netmap.MachinePublicFromEd25519(mk.Public().(ed25519.PublicKey))
	return pub
}

// TestNodeKeyProofRequired: the coordinator publishes a node key only
// when the sender proves it holds its private half, for its own machine
// key, against a fresh challenge. Map requests that keep the key need no
// proof, and old clients are told to upgrade.
func TestNodeKeyProofRequired(t *testing.T) {
	clk := newClock()
	ts := startServer(t, ServerOptions{clock: clk})
	ctx := context.Background()
	key := ts.key(t, AuthKeyOptions{Tags: []string{"tag:x"}, Reusable: true})
	a := newTestNode(t, ts.url, "")
	a.mustRegister(t, key, "a")
	a.follow(t, a.mapRequest())

	_, mk, _ := ed25519.GenerateKey(rand.Reader)
	hc := machineHTTP(t, ts.Fingerprint(), mk)
	victim := netmap.NewNodePrivate() // a key the attacker does not hold
	register := func(version int, nk netmap.NodePublic, proof *netmap.NodeKeyProof) error {
		body, _ := json.Marshal(netmap.RegisterRequest{Version: version, NodeKey: nk, Hostname: "x", AuthKey: key, NodeKeyProof: proof})
		return doRaw(ctx, hc, ts.url, "/machine/register", body)
	}
	own := netmap.NewNodePrivate()
	goodCh := challengeFor(t, ts, mk)
	ownProof, err := controlclient.SealNodeKeyProof(own, machinePublic(mk), goodCh)
	if err != nil {
		t.Fatal(err)
	}
	aProof, _ := controlclient.SealNodeKeyProof(a.nk, machinePublic(a.mk), challengeFor(t, ts, a.mk))
	otherMachineCh := challengeFor(t, ts, a.mk)
	attackerKey := netmap.NewNodePrivate()
	forged, _ := controlclient.SealNodeKeyProof(attackerKey, machinePublic(mk), goodCh) // sealed with the wrong node key
	lowOrder := netmap.NodePublic{}                                                     // the all-zero point
	lowProof := &netmap.NodeKeyProof{Challenge: goodCh.Challenge, Nonce: make([]byte, 24), Box: make([]byte, 80)}
	tampered := *ownProof
	tampered.Challenge = append([]byte(nil), ownProof.Challenge...)
	tampered.Challenge[10] ^= 1
	wrongMachine, _ := controlclient.SealNodeKeyProof(own, machinePublic(mk), otherMachineCh)

	for _, tc := range []struct {
		name    string
		version int
		nk      netmap.NodePublic
		proof   *netmap.NodeKeyProof
		want    error
		message string
	}{
		{"old client", 1, own.Public(), nil, controlclient.ErrTooOld, "upgrade meshd"},
		{"no proof", netmap.ProtocolVersion, victim.Public(), nil, controlclient.ErrKeyProof, "no proof"},
		{"sealed with another node key", netmap.ProtocolVersion, victim.Public(), forged, controlclient.ErrKeyProof, "does not hold that key"},
		{"another machine's proof replayed", netmap.ProtocolVersion, a.nk.Public(), aProof, controlclient.ErrKeyProof, "not issued to this machine"},
		{"challenge of another machine", netmap.ProtocolVersion, own.Public(), wrongMachine, controlclient.ErrKeyProof, "not issued to this machine"},
		{"tampered challenge", netmap.ProtocolVersion, own.Public(), &tampered, controlclient.ErrKeyProof, "not issued"},
		{"low-order node key", netmap.ProtocolVersion, lowOrder, lowProof, controlclient.ErrBadRequest, "node_key is missing"},
		{"malformed proof", netmap.ProtocolVersion, own.Public(), &netmap.NodeKeyProof{Challenge: goodCh.Challenge, Nonce: []byte{1}}, controlclient.ErrKeyProof, "malformed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := register(tc.version, tc.nk, tc.proof)
			wantErr(t, err, tc.want)
			if !strings.Contains(err.Error(), tc.message) {
				t.Errorf("error %q does not say %q", err, tc.message)
			}
		})
	}
	// A low-order point other than zero (u=1), or 2^255-19+9 (a
	// non-canonical encoding of the base point) never proves anything.
	nonCanonical := netmap.NodePublic{0xf6}
	for i := 1; i < 31; i++ {
		nonCanonical[i] = 0xff
	}
	nonCanonical[31] = 0x7f
	for _, k := range []netmap.NodePublic{{1}, nonCanonical} {
		p := &netmap.NodeKeyProof{Challenge: goodCh.Challenge, Nonce: make([]byte, 24), Box: make([]byte, 80)}
		if err := register(netmap.ProtocolVersion, k, p); !errors.Is(err, controlclient.ErrKeyProof) || !strings.Contains(err.Error(), "not a valid Curve25519") {
			t.Errorf("key %x: %v, want an invalid-key refusal", k[:], err)
		}
	}
	nodes, _ := ts.Nodes(ctx)
	if len(nodes) != 1 {
		t.Fatalf("refused registrations left %d nodes, want 1", len(nodes))
	}

	// An expired challenge is refused; a fresh one with a true proof is
	// accepted.
	clk.Advance(challengeTTL + time.Second)
	err = register(netmap.ProtocolVersion, own.Public(), ownProof)
	wantErr(t, err, controlclient.ErrKeyProof)
	if !strings.Contains(err.Error(), "expired") {
		t.Errorf("expired challenge refused with %q", err)
	}
	fresh, _ := controlclient.SealNodeKeyProof(own, machinePublic(mk), challengeFor(t, ts, mk))
	if err := register(netmap.ProtocolVersion, own.Public(), fresh); err != nil {
		t.Fatalf("registration with a valid proof: %v", err)
	}

	// A rotation to a key the node does not hold is refused and changes
	// nothing; reporting endpoints under the known key needs no proof,
	// even from an old client.
	req := a.mapRequest()
	req.NodeKey = victim.Public()
	wantErr(t, a.c.Update(ctx, req), controlclient.ErrKeyProof)
	req = a.mapRequest()
	req.Version = 1
	req.Endpoints = []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:41641")}
	if err := a.c.Update(ctx, req); err != nil {
		t.Fatalf("endpoint report under the known key: %v", err)
	}
	req = a.mapRequest()
	req.Version = 1
	req.NodeKey = netmap.NewNodePrivate().Public()
	wantErr(t, a.c.Update(ctx, req), controlclient.ErrTooOld)
	a.waitMap(t, "a's endpoint under its own key", func(m *netmap.NetworkMap) bool {
		return m.Self.NodeKey == a.nk.Public() && len(m.Self.Endpoints) == 1
	})
	if ts.NodeKeyKnown(victim.Public()) || !ts.NodeKeyKnown(a.nk.Public()) {
		t.Fatal("the refused rotation changed the known keys")
	}
	// A rotation the node proves goes through (the client proves it by
	// itself when the coordinator asks).
	a.rotate()
	if err := a.c.Update(ctx, a.mapRequest()); err != nil {
		t.Fatalf("proven rotation: %v", err)
	}
	a.waitMap(t, "a's rotated key", func(m *netmap.NetworkMap) bool { return m.Self.NodeKey == a.nk.Public() })

	// A stream opened under a new key is proven the same way.
	d := newTestNode(t, ts.url, "")
	d.mustRegister(t, key, "d")
	d.rotate()
	d.follow(t, d.mapRequest())
	d.waitMap(t, "d's stream under its rotated key", func(m *netmap.NetworkMap) bool { return m.Self.NodeKey == d.nk.Public() })
}

// TestChallengeEndpoint: challenges need a machine key, are bound to it,
// and bad requests get clear errors.
func TestChallengeEndpoint(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	ctx := context.Background()
	_, mk, _ := ed25519.GenerateKey(rand.Reader)
	ch := challengeFor(t, ts, mk)
	if len(ch.Challenge) != challengeLen || ch.ServerKey.IsZero() || time.Until(ch.Expires) > challengeTTL || time.Until(ch.Expires) < challengeTTL-5*time.Second {
		t.Fatalf("challenge %+v", ch)
	}
	if ch2 := challengeFor(t, ts, mk); string(ch2.Challenge) == string(ch.Challenge) {
		t.Fatal("two challenges are equal")
	}
	// Without a client certificate (the admin client's transport).
	ac := noCertClient(t, ts)
	err := controlclient.DoJSON(ctx, ac, http.MethodPost, ts.url+controlclient.ChallengePath, "", netmap.ChallengeRequest{Version: 2}, nil, nil)
	wantErr(t, err, controlclient.ErrBadRequest)
	hc := machineHTTP(t, ts.Fingerprint(), mk)
	wantErr(t, doRaw(ctx, hc, ts.url, controlclient.ChallengePath, []byte(`{"version":0}`)), controlclient.ErrTooOld)
	wantErr(t, doRaw(ctx, hc, ts.url, controlclient.ChallengePath, []byte(`{"version":2}x`)), controlclient.ErrBadRequest)
	// The key survives a restart, so does a challenge issued before.
	ts.stop(t)
	ts2 := startServer(t, ServerOptions{StateDir: ts.dir})
	ch3 := challengeFor(t, ts2, mk)
	if ch3.ServerKey != ch.ServerKey {
		t.Fatal("challenge key changed across a restart")
	}
	nk := netmap.NewNodePrivate()
	p, _ := controlclient.SealNodeKeyProof(nk, machinePublic(mk), ch)
	if err := ts2.chal.check(machinePublic(mk), nk.Public(), p, time.Now()); err != nil {
		t.Fatalf("proof against a challenge issued before the restart: %v", err)
	}
}

// noCertClient is an HTTP client for ts without a client certificate.
func noCertClient(t *testing.T, ts *testServer) *http.Client {
	tr := controlclient.PinnedTransport(ts.Fingerprint())
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

// TestClaimingAnotherNodesKeyRevokesNothing: node b claims a's node key in
// a map request and then rotates away from it; a's relay connection stays
// open (the claim is refused, and a key is only revoked by its owner).
func TestClaimingAnotherNodesKeyRevokesNothing(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	ds := newRelay(t, ts.VerifyNodeKey)
	ts.Handle("/derp", ds)
	enforceRevocations(t, ts, ds)

	key := ts.key(t, AuthKeyOptions{Reusable: true, Tags: []string{"tag:gpu"}})
	a, b, c := newTestNode(t, ts.url, ts.Fingerprint()), newTestNode(t, ts.url, ts.Fingerprint()), newTestNode(t, ts.url, ts.Fingerprint())
	a.mustRegister(t, key, "a")
	b.mustRegister(t, key, "b")
	c.mustRegister(t, key, "c")
	conns := map[string]<-chan error{}
	for name, n := range map[string]*testNode{"a": a, "b": b, "c": c} {
		dc, err := dialRelay(t, ts.url+"/derp", ts.Fingerprint(), n.nk)
		if err != nil {
			t.Fatal(err)
		}
		conns[name] = connClosed(dc)
	}

	// b claims a's key (the wire request an attacker would send: the
	// client even holds a's private key here), then rotates to a key of
	// its own.
	bOwn := b.nk
	b.impersonate(a)
	if err := b.c.Update(context.Background(), b.mapRequest()); !errors.Is(err, controlclient.ErrKeyInUse) {
		t.Errorf("claiming a's key: %v, want ErrKeyInUse", err)
	}
	b.nk = bOwn
	b.c.SetNodeKey(bOwn)
	b.rotate()
	if err := b.c.Update(context.Background(), b.mapRequest()); err != nil {
		t.Fatal(err)
	}
	wantClosedWithin(t, conns["b"], "b's own old key")
	// Revocations reach the relay in order: once c's deletion has, any
	// revocation of a's key would have too.
	if err := ts.DeleteNode(context.Background(), c.id); err != nil {
		t.Fatal(err)
	}
	wantClosedWithin(t, conns["c"], "deleted c")
	wantOpen(t, conns["a"], "a, whose key b claimed and rotated away from")
	if !ts.NodeKeyKnown(a.nk.Public()) {
		t.Fatal("a's key is no longer known")
	}
}

// TestHubKeyOwnerKeepsKey: even if the coordinator's checks were bypassed
// and two nodes reached the hub with one key, the first keeps it: the
// second can neither take its relay identity nor get it revoked by
// rotating away.
func TestHubKeyOwnerKeepsKey(t *testing.T) {
	h := newHub("e", nil, 0, time.Now)
	var revoked []netmap.NodePublic
	h.revoked = func(k netmap.NodePublic) { revoked = append(revoked, k) }
	a, b := hubNode(1), hubNode(2)
	h.upsert(a)
	h.upsert(b)
	claim := *b
	claim.NodeKey = a.NodeKey
	h.upsert(&claim)
	away := claim
	away.NodeKey = netmap.NewNodePrivate().Public()
	h.upsert(&away)
	for _, k := range revoked {
		if k == a.NodeKey {
			t.Fatal("b got a's key revoked by rotating away from it")
		}
	}
	h.mu.Lock()
	owner := h.byKey[a.NodeKey]
	h.mu.Unlock()
	if owner != a.ID {
		t.Fatalf("a's key belongs to node %d, want %d", owner, a.ID)
	}
	h.remove(b.ID, errors.New("gone"))
	if !h.nodeKeyKnown(a.NodeKey) {
		t.Fatal("removing b dropped a's key")
	}
}

// TestHostnamesUniqueInTailnet: a hostname clash at registration gets a
// suffix (gpu-3, gpu-3-1, gpu-3-2), a node cannot rename itself onto a
// name another node holds, and keeps its own.
func TestHostnamesUniqueInTailnet(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	ctx := context.Background()
	key := ts.key(t, AuthKeyOptions{Tags: []string{"tag:x"}, Reusable: true})
	var nodes []*testNode
	for i, want := range []string{"gpu-3", "gpu-3-1", "gpu-3-2"} {
		n := newTestNode(t, ts.url, "")
		asked := []string{"gpu-3", "GPU_3", "gpu-3.example.com"}[i]
		r := n.mustRegister(t, key, asked)
		if r.Node.Hostname != want {
			t.Fatalf("registration %d as %q: named %q, want %q", i, asked, r.Node.Hostname, want)
		}
		nodes = append(nodes, n)
	}
	// Re-registering (new process, no auth key) as a held name keeps the
	// node's own; as a free one renames it.
	n1 := nodes[1]
	for _, tc := range []struct{ ask, want string }{{"gpu-3", "gpu-3-1"}, {"gpu-3-2", "gpu-3-2-1"}, {"gpu-3", "gpu-3-1"}, {"box", "box"}, {"gpu-3", "gpu-3-1"}} {
		r, err := n1.register(ctx, "", tc.ask)
		if err != nil {
			t.Fatal(err)
		}
		if r.Node.Hostname != tc.want {
			t.Errorf("re-registering as %q: named %q, want %q", tc.ask, r.Node.Hostname, tc.want)
		}
	}
	all, err := ts.Nodes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, n := range all {
		if seen[n.Hostname] {
			t.Errorf("hostname %q held twice", n.Hostname)
		}
		seen[n.Hostname] = true
	}
}

// TestSingleUseKeyReplay: a consumed single-use key is accepted again
// from the machine that used it only for a prompt retry: never after an
// administrator expired, deleted, tagged or approved its node, and not
// after the retry window; the administrator's action stays in force.
func TestSingleUseKeyReplay(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name  string
		admin func(t *testing.T, ts *testServer, clk *clocktest.Clock, id netmap.NodeID)
		// after checks the node once the replay was refused.
		after func(t *testing.T, ts *testServer, id netmap.NodeID)
		ok    bool
	}{
		{name: "retry within the window", ok: true,
			admin: func(t *testing.T, ts *testServer, clk *clocktest.Clock, id netmap.NodeID) {
				clk.Advance(authKeyRetryWindow - time.Minute)
			}},
		{name: "after expire",
			admin: func(t *testing.T, ts *testServer, _ *clocktest.Clock, id netmap.NodeID) {
				if err := ts.ExpireNode(ctx, id); err != nil {
					t.Fatal(err)
				}
			},
			after: func(t *testing.T, ts *testServer, id netmap.NodeID) {
				if n, _ := ts.storeNode(ctx, id); n.KeyExpiry.IsZero() || n.KeyExpiry.After(ts.now()) {
					t.Errorf("the replay undid the expiry: %v", n.KeyExpiry)
				}
			}},
		{name: "after delete",
			admin: func(t *testing.T, ts *testServer, _ *clocktest.Clock, id netmap.NodeID) {
				if err := ts.DeleteNode(ctx, id); err != nil {
					t.Fatal(err)
				}
			},
			after: func(t *testing.T, ts *testServer, id netmap.NodeID) {
				if nodes, _ := ts.Nodes(ctx); len(nodes) != 0 {
					t.Errorf("the replay brought a deleted node back: %+v", nodes)
				}
			}},
		{name: "after tag",
			admin: func(t *testing.T, ts *testServer, _ *clocktest.Clock, id netmap.NodeID) {
				if err := ts.TagNode(ctx, id, []string{"tag:quarantine"}); err != nil {
					t.Fatal(err)
				}
			},
			after: func(t *testing.T, ts *testServer, id netmap.NodeID) {
				if n, _ := ts.storeNode(ctx, id); !slices.Equal(n.Tags, []string{"tag:quarantine"}) {
					t.Errorf("the replay undid the re-tag: %v", n.Tags)
				}
			}},
		{name: "after approve",
			admin: func(t *testing.T, ts *testServer, _ *clocktest.Clock, id netmap.NodeID) {
				if err := ts.ApproveNode(ctx, id); err != nil {
					t.Fatal(err)
				}
			},
			after: func(t *testing.T, ts *testServer, id netmap.NodeID) {
				if n, _ := ts.storeNode(ctx, id); !n.Authorized {
					t.Error("the replay undid the approval")
				}
			}},
		{name: "after the window",
			admin: func(t *testing.T, ts *testServer, clk *clocktest.Clock, id netmap.NodeID) {
				clk.Advance(authKeyRetryWindow)
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clk := newClock()
			ts := startServer(t, ServerOptions{clock: clk, RequireApproval: true})
			key := ts.key(t, AuthKeyOptions{User: "alice@example.com"}) // single-use, needs approval
			n := newTestNode(t, ts.url, "")
			r := n.mustRegister(t, key, "laptop")
			tc.admin(t, ts, clk, r.Node.ID)
			// The same machine, a new process (new client), the same key.
			again := newTestNodeKey(t, ts.url, ts.Fingerprint(), n.mk)
			r2, err := again.register(ctx, key, "laptop")
			if tc.ok {
				if err != nil || r2.Node.ID != r.Node.ID {
					t.Fatalf("prompt retry: %v (node %v), want the same node back", err, r2)
				}
				ks, _ := ts.AuthKeys(ctx)
				if len(ks) != 1 || ks[0].Uses != 1 {
					t.Fatalf("the retry used the key again: %+v", ks)
				}
				return
			}
			wantErr(t, err, controlclient.ErrAuthKeyUsed)
			if tc.after != nil {
				tc.after(t, ts, r.Node.ID)
			}
		})
	}
}

// TestUpgradeClearsSharedKeyUntilProven: a database from a version that
// let node b take node a's key is repaired on start by clearing the key on
// both; neither is in anyone's map until it proves a key of its own, which
// the genuine holder's client does by itself when it reconnects, and the
// impostor cannot do for a's key.
func TestUpgradeClearsSharedKeyUntilProven(t *testing.T) {
	dir := t.TempDir()
	ts := startServer(t, ServerOptions{StateDir: dir})
	ctx := context.Background()
	key := ts.key(t, AuthKeyOptions{Tags: []string{"tag:x"}, Reusable: true})
	a, b, w := newTestNode(t, ts.url, ""), newTestNode(t, ts.url, ""), newTestNode(t, ts.url, "")
	a.mustRegister(t, key, "a")
	b.mustRegister(t, key, "b")
	w.mustRegister(t, key, "watcher")
	ts.stop(t)

	// Turn the database into what an older version could leave: schema 2,
	// no unique columns, b holding a's node key.
	db, err := sql.Open("sqlite", "file:"+filepath.Join(dir, dbFile))
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{
		`DROP INDEX nodes_node_key`, `DROP INDEX nodes_disco_key`, `DROP INDEX nodes_hostname`,
		`ALTER TABLE nodes DROP COLUMN node_key`, `ALTER TABLE nodes DROP COLUMN disco_key`, `ALTER TABLE nodes DROP COLUMN hostname`,
		`DROP TABLE quarantine`, `DROP TABLE audit`, `DROP TABLE ssh_checks`, `DROP TABLE ssh_grants`, `DELETE FROM schema_migrations WHERE version >= 3`,
		`UPDATE nodes SET data = json_set(data, '$.node_key', '` + a.nk.Public().String() + `') WHERE id = ` + strconv.Itoa(int(b.id)),
	} {
		if _, err := db.Exec(q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	db.Close()

	ts2 := startServerAt(t, ServerOptions{StateDir: dir, Logger: testLogger(t)}, "127.0.0.1:0")
	if ts2.NodeKeyKnown(a.nk.Public()) {
		t.Fatal("a key two nodes held is still published after the upgrade")
	}
	w2 := newTestNodeKey(t, ts2.url, ts2.Fingerprint(), w.mk)
	w2.nk = w.nk
	w2.c.SetNodeKey(w.nk)
	w2.follow(t, w2.mapRequest())
	w2.waitMap(t, "neither a nor b", func(m *netmap.NetworkMap) bool { return m.Peers[a.id] == nil && m.Peers[b.id] == nil })

	// The impostor claims a's key again: it cannot prove it.
	bi := newTestNodeKey(t, ts2.url, ts2.Fingerprint(), b.mk)
	req := netmap.MapRequest{NodeKey: a.nk.Public(), DiscoKey: b.dk.Public()}
	wantErr(t, bi.c.Update(ctx, req), controlclient.ErrKeyProof)
	// a reconnects as usual; its client proves its key when asked.
	a2 := newTestNodeKey(t, ts2.url, ts2.Fingerprint(), a.mk)
	a2.nk = a.nk
	a2.c.SetNodeKey(a.nk)
	a2.follow(t, a2.mapRequest())
	w2.waitMap(t, "a back under its key", func(m *netmap.NetworkMap) bool {
		p := m.Peers[a.id]
		return p != nil && p.NodeKey == a.nk.Public()
	})
	if m := w2.current(); m.Peers[b.id] != nil {
		t.Fatalf("b is back without proving a key: %+v", m.Peers[b.id])
	}
}
