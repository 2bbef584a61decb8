package control

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/control/store"
	"meshd.dev/meshd/netmap"
)

func hasPeer(id netmap.NodeID) func(*netmap.NetworkMap) bool {
	return func(m *netmap.NetworkMap) bool { return m.Peers[id] != nil }
}

func peerOnline(id netmap.NodeID, online bool) func(*netmap.NetworkMap) bool {
	return func(m *netmap.NetworkMap) bool { p := m.Peers[id]; return p != nil && p.Online == online }
}

func TestRegisterKeyKinds(t *testing.T) {
	ts := startServer(t, ServerOptions{RequireApproval: true, NodeKeyExpiry: time.Hour})
	ctx := context.Background()
	tests := []struct {
		name         string
		opts         AuthKeyOptions
		requestTags  []string
		wantUser     string
		wantTags     []string
		wantEph      bool
		wantApproval bool // node waits for approval
	}{
		{name: "tagged", opts: AuthKeyOptions{Tags: []string{"tag:b", "TAG:a"}, Preauthorized: true}, wantTags: []string{"tag:a", "tag:b"}},
		{name: "user", opts: AuthKeyOptions{User: "alice@example.com", Preauthorized: true}, wantUser: "alice@example.com"},
		{name: "user requesting tags becomes tagged", opts: AuthKeyOptions{User: "bob@example.com", Preauthorized: true}, requestTags: []string{"tag:ci"}, wantTags: []string{"tag:ci"}},
		{name: "tagged plus requested tags", opts: AuthKeyOptions{Tags: []string{"tag:a"}, Preauthorized: true}, requestTags: []string{"tag:z"}, wantTags: []string{"tag:a", "tag:z"}},
		{name: "reusable", opts: AuthKeyOptions{Tags: []string{"tag:r"}, Reusable: true, Preauthorized: true}, wantTags: []string{"tag:r"}},
		{name: "ephemeral", opts: AuthKeyOptions{Tags: []string{"tag:e"}, Ephemeral: true, Preauthorized: true}, wantTags: []string{"tag:e"}, wantEph: true},
		{name: "not preauthorized", opts: AuthKeyOptions{Tags: []string{"tag:p"}}, wantTags: []string{"tag:p"}, wantApproval: true},
		{name: "expiring key", opts: AuthKeyOptions{User: "carol@example.com", Expiry: time.Hour, Preauthorized: true}, wantUser: "carol@example.com"},
	}
	seen4 := map[netip.Addr]bool{}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			key := ts.key(t, tt.opts)
			n := newTestNode(t, ts.url, "")
			resp, err := n.register(ctx, key, "Host_"+strings.ReplaceAll(tt.name, " ", "."), tt.requestTags...)
			if err != nil {
				t.Fatal(err)
			}
			got := resp.Node
			if got.User != tt.wantUser || !slices.Equal(got.Tags, tt.wantTags) || got.Ephemeral != tt.wantEph {
				t.Errorf("node user=%q tags=%v ephemeral=%v; want %q %v %v", got.User, got.Tags, got.Ephemeral, tt.wantUser, tt.wantTags, tt.wantEph)
			}
			if len(tt.wantTags) > 0 && !got.KeyExpiry.IsZero() {
				t.Errorf("tagged node has key expiry %v; want never", got.KeyExpiry)
			}
			if len(tt.wantTags) == 0 && (got.KeyExpiry.IsZero() || got.KeyExpiry.After(time.Now().Add(time.Hour))) {
				t.Errorf("user node key expiry %v; want within the configured hour", got.KeyExpiry)
			}
			if got.Hostname == "" || strings.ContainsAny(got.Hostname, "_. ") {
				t.Errorf("hostname %q not sanitised", got.Hostname)
			}
			if len(got.Addresses) != 2 || !IPv4Pool.Contains(got.Addresses[0].Addr()) || !IPv6Pool.Contains(got.Addresses[1].Addr()) {
				t.Fatalf("addresses %v not in %v and %v", got.Addresses, IPv4Pool, IPv6Pool)
			}
			if seen4[got.Addresses[0].Addr()] {
				t.Errorf("address %v handed out twice", got.Addresses[0])
			}
			seen4[got.Addresses[0].Addr()] = true
			if v4 := got.Addresses[0].Addr().As4(); v4[3] == 0 || v4[3] == 255 {
				t.Errorf("address %v ends in .0 or .255", got.Addresses[0])
			}
			if resp.ServerKey != ts.Fingerprint() || n.c.ServerPin() != ts.Fingerprint() {
				t.Errorf("pin %q / server key %q; want %q", n.c.ServerPin(), resp.ServerKey, ts.Fingerprint())
			}
			err = n.c.Update(ctx, n.mapRequest())
			if tt.wantApproval {
				wantErr(t, err, controlclient.ErrNotAuthorized)
				if err := ts.ApproveNode(ctx, n.id); err != nil {
					t.Fatal(err)
				}
				err = n.c.Update(ctx, n.mapRequest())
			}
			if err != nil {
				t.Fatalf("update after registration: %v", err)
			}
		})
	}
	users, err := ts.Users(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var logins []string
	for _, u := range users {
		logins = append(logins, u.Login)
	}
	if !slices.Equal(logins, []string{"alice@example.com", "bob@example.com", "carol@example.com"}) {
		t.Errorf("users %v", logins)
	}
}

func TestCreateAuthKeyRejects(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	for _, o := range []AuthKeyOptions{
		{},
		{User: "a@b", Tags: []string{"tag:x"}},
		{Tags: []string{"nottag"}},
		{Tags: []string{"tag:Bad!"}},
		{User: "has space"},
		{User: "a@b", Expiry: -time.Hour},
	} {
		if _, _, err := ts.CreateAuthKey(context.Background(), o); !errors.Is(err, controlclient.ErrBadRequest) {
			t.Errorf("CreateAuthKey(%+v) = %v; want controlclient.ErrBadRequest", o, err)
		}
	}
}

func TestSingleUseKeyRace(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	key := ts.key(t, AuthKeyOptions{Tags: []string{"tag:race"}})
	const n = 12
	nodes := make([]*testNode, n)
	for i := range nodes {
		nodes[i] = newTestNode(t, ts.url, "")
	}
	errs := make([]error, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			_, errs[i] = nodes[i].register(context.Background(), key, fmt.Sprintf("racer%d", i))
		}()
	}
	close(start)
	wg.Wait()
	wins := 0
	for i, err := range errs {
		switch {
		case err == nil:
			wins++
		case errors.Is(err, controlclient.ErrAuthKeyUsed):
		default:
			t.Errorf("racer %d: %v; want success or controlclient.ErrAuthKeyUsed", i, err)
		}
	}
	if wins != 1 {
		t.Fatalf("%d registrations won with a single-use key; want exactly 1", wins)
	}
	all, err := ts.Nodes(context.Background())
	if err != nil || len(all) != 1 {
		t.Fatalf("nodes after race: %d, %v", len(all), err)
	}
	// The winner retrying (a lost response) is not refused.
	for i, err := range errs {
		if err == nil {
			if _, err := nodes[i].register(context.Background(), key, "retry"); err != nil {
				t.Errorf("winner re-registering with its own single-use key: %v", err)
			}
		}
	}
}

func TestAuthKeyRefusals(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	other := startServer(t, ServerOptions{})
	ctx := context.Background()

	expired, expiredID := ts.expiredKey(t, "tag:x")
	expiring := ts.key(t, AuthKeyOptions{Tags: []string{"tag:x"}, Expiry: time.Hour})
	revoked, rk, err := ts.CreateAuthKey(ctx, AuthKeyOptions{Tags: []string{"tag:x"}, Reusable: true})
	if err != nil {
		t.Fatal(err)
	}
	used := ts.key(t, AuthKeyOptions{Tags: []string{"tag:x"}})
	newTestNode(t, ts.url, "").mustRegister(t, used, "first")
	// A syntactically valid key with this coordinator's fingerprint but an
	// id that does not exist, and a real id with the wrong secret.
	pk, _ := controlclient.ParseAuthKey(used)
	unknown := controlclient.AuthKey{ID: "0123456789ab", Secret: pk.Secret, Fingerprint: pk.Fingerprint}.String()
	wrongSecret := controlclient.AuthKey{ID: pk.ID, Secret: strings.Repeat("a", 32), Fingerprint: pk.Fingerprint}.String()
	if err := ts.RevokeAuthKey(ctx, rk.ID); err != nil {
		t.Fatal(err)
	}
	// A key of another coordinator whose node already pins this one.
	foreign := other.key(t, AuthKeyOptions{Tags: []string{"tag:x"}})

	tests := []struct {
		name, key, pin string
		want           error
		msg            string
	}{
		{"expired", expired, "", controlclient.ErrAuthKeyExpired, "expired"},
		{"revoked", revoked, "", controlclient.ErrAuthKeyRevoked, "revoked"},
		{"used", used, "", controlclient.ErrAuthKeyUsed, "single-use"},
		{"unknown id", unknown, "", controlclient.ErrAuthKeyUnknown, "no auth key"},
		{"wrong secret", wrongSecret, "", controlclient.ErrAuthKeyUnknown, "no auth key"},
		{"malformed", "mskey-nope", "", controlclient.ErrAuthKeyUnknown, "malformed"},
		{"other coordinator's key", foreign, ts.Fingerprint(), controlclient.ErrAuthKeyUnknown, "different coordinator"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := newTestNode(t, ts.url, tt.pin).register(ctx, tt.key, "n")
			wantErr(t, err, tt.want)
			if !strings.Contains(err.Error(), tt.msg) {
				t.Errorf("error %q does not say %q", err, tt.msg)
			}
		})
	}
	keys, err := ts.AuthKeys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	states := map[string]string{}
	ek, _ := controlclient.ParseAuthKey(expiring)
	for _, k := range keys {
		states[k.ID] = k.State
		// A key's expiry is counted from its creation.
		if k.ID == ek.ID && k.Expires.Sub(k.Created) != time.Hour {
			t.Errorf("key created with a 1h expiry: created %v, expires %v", k.Created, k.Expires)
		}
	}
	if states[rk.ID] != "revoked" || states[pk.ID] != "used" || states[expiredID] != "expired" || states[ek.ID] != "valid" {
		t.Errorf("key states %v", states)
	}
}

// expiredKey stores a tagged auth key that expired an hour ago, as
// CreateAuthKey stores one whose Expiry has since run out, so that no test
// waits for a key to expire. It returns the key and its id.
func (ts *testServer) expiredKey(t testing.TB, tags ...string) (string, string) {
	t.Helper()
	pk := controlclient.AuthKey{ID: randomKeyID(), Secret: randomSecret(), Fingerprint: ts.Fingerprint()}
	created := time.Now().UTC().Add(-2 * time.Hour)
	err := ts.store.InsertAuthKey(context.Background(), store.AuthKey{
		ID: pk.ID, Hash: hashSecret(pk.Secret), Tags: tags, Created: created, Expires: created.Add(time.Hour),
	})
	if err != nil {
		t.Fatal(err)
	}
	return pk.String(), pk.ID
}

func TestPinMismatch(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	other := startServer(t, ServerOptions{})
	key := ts.key(t, AuthKeyOptions{Tags: []string{"tag:x"}})
	// Pinned to another coordinator (a stale pin in the state dir).
	n := newTestNode(t, ts.url, other.Fingerprint())
	_, err := n.register(context.Background(), key, "n")
	wantErr(t, err, controlclient.ErrPinMismatch)
	if !strings.Contains(err.Error(), "--coordinator") {
		t.Errorf("pin mismatch error does not say what to do: %v", err)
	}
	// An auth key from the coordinator the URL does not point to.
	okey := other.key(t, AuthKeyOptions{Tags: []string{"tag:x"}})
	_, err = newTestNode(t, ts.url, "").register(context.Background(), okey, "n")
	wantErr(t, err, controlclient.ErrPinMismatch)
	// Admin client with a token of another coordinator.
	tok := "msadm-" + strings.Repeat("a", 32) + "-" + other.Fingerprint()
	ac, err := NewAdminClient(ts.url, tok)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ac.Nodes(context.Background()); !errors.Is(err, controlclient.ErrPinMismatch) {
		t.Errorf("admin client with a foreign token: %v; want controlclient.ErrPinMismatch", err)
	}
}

func TestMapStreamJoinLeaveEndpoints(t *testing.T) {
	ts := startServer(t, ServerOptions{KeepAliveInterval: 50 * time.Millisecond})
	ctx := context.Background()
	key := ts.key(t, AuthKeyOptions{Tags: []string{"tag:x"}, Reusable: true})
	a, b := newTestNode(t, ts.url, ""), newTestNode(t, ts.url, "")
	a.mustRegister(t, key, "a")
	a.follow(t, a.mapRequest())
	m := a.waitMap(t, "first map", func(m *netmap.NetworkMap) bool { return true })
	if len(m.Peers) != 0 || m.Self.ID != a.id || !m.Self.Online || !m.PolicyBootstrap || len(m.PacketFilter) != 1 || m.Epoch != ts.Epoch() {
		t.Fatalf("first map: %+v", m)
	}
	b.mustRegister(t, key, "b")
	a.waitMap(t, "b joined (offline)", peerOnline(b.id, false))
	req := b.mapRequest()
	req.Endpoints = []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:41641")}
	req.HomeDERP = 1
	stopB := b.follow(t, req)
	a.waitMap(t, "b online with endpoints", func(m *netmap.NetworkMap) bool {
		p := m.Peers[b.id]
		return p != nil && p.Online && len(p.Endpoints) == 1 && p.HomeDERP == 1
	})
	b.waitMap(t, "b sees a", peerOnline(a.id, true))

	// Endpoint change and node-key rotation over Update.
	newKey := netmap.NewNodePrivate()
	b.c.SetNodeKey(newKey)
	req.Endpoints = append(req.Endpoints, netip.MustParseAddrPort("[::1]:41641"))
	req.NodeKey = newKey.Public()
	if err := b.c.Update(ctx, req); err != nil {
		t.Fatal(err)
	}
	a.waitMap(t, "b's new endpoints and node key", func(m *netmap.NetworkMap) bool {
		p := m.Peers[b.id]
		return p != nil && len(p.Endpoints) == 2 && p.NodeKey == newKey.Public()
	})
	b.waitMap(t, "b's own new key", func(m *netmap.NetworkMap) bool { return m.Self.NodeKey == newKey.Public() })
	if !ts.NodeKeyKnown(newKey.Public()) || ts.NodeKeyKnown(b.nk.Public()) {
		t.Error("NodeKeyKnown does not follow the rotation")
	}

	stopB()
	a.waitMap(t, "b offline", peerOnline(b.id, false))
	if p := a.current().Peers[b.id]; p.LastSeen.IsZero() {
		t.Error("offline peer has no last-seen time")
	}
	if err := ts.DeleteNode(ctx, b.id); err != nil {
		t.Fatal(err)
	}
	a.waitMap(t, "b removed", func(m *netmap.NetworkMap) bool { return m.Peers[b.id] == nil })
	if ts.NodeKeyKnown(newKey.Public()) {
		t.Error("deleted node's key still known")
	}
	// A deleted machine is told so.
	wantErr(t, b.c.Update(ctx, b.mapRequest()), controlclient.ErrNotRegistered)
}

func TestExpireAndTagNode(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	ctx := context.Background()
	ukey := ts.key(t, AuthKeyOptions{User: "alice@example.com", Reusable: true})
	a, b := newTestNode(t, ts.url, ""), newTestNode(t, ts.url, "")
	ra := a.mustRegister(t, ukey, "a")
	b.mustRegister(t, ukey, "b")
	a.follow(t, a.mapRequest())
	b.follow(t, b.mapRequest())
	a.waitMap(t, "b", peerOnline(b.id, true))

	if err := ts.TagNode(ctx, a.id, []string{"tag:gpu"}); err != nil {
		t.Fatal(err)
	}
	b.waitMap(t, "a tagged", func(m *netmap.NetworkMap) bool {
		p := m.Peers[a.id]
		return p != nil && slices.Equal(p.Tags, []string{"tag:gpu"}) && p.User == "" && p.KeyExpiry.IsZero() && p.Online
	})
	if got := b.current().Peers[a.id].Addresses; !slices.Equal(got, ra.Node.Addresses) {
		t.Errorf("re-tagged node addresses %v; want %v", got, ra.Node.Addresses)
	}
	wantErr(t, ts.TagNode(ctx, a.id, nil), controlclient.ErrBadRequest)

	if err := ts.ExpireNode(ctx, b.id); err != nil {
		t.Fatal(err)
	}
	a.waitMap(t, "expired b removed", func(m *netmap.NetworkMap) bool { return m.Peers[b.id] == nil })
	// b's own stream ends, and Follow gives up: only a new key helps.
	select {
	case err := <-b.fdone:
		b.fdone <- err
		wantErr(t, err, controlclient.ErrNodeExpired)
	case <-time.After(20 * time.Second):
		t.Fatal("Follow of an expired node did not return")
	}
	wantErr(t, b.c.Update(ctx, b.mapRequest()), controlclient.ErrNodeExpired)
	_, err := b.register(ctx, "", "b")
	wantErr(t, err, controlclient.ErrNodeExpired)
	// Re-authenticating with a key brings it back with the same addresses.
	rb, err := b.register(ctx, ukey, "b")
	if err != nil {
		t.Fatal(err)
	}
	a.waitMap(t, "b back", hasPeer(b.id))
	if rb.Node.ID != b.id {
		t.Errorf("re-authenticated node got id %d; want %d", rb.Node.ID, b.id)
	}
	wantErr(t, ts.ExpireNode(ctx, 9999), controlclient.ErrNotFound)
}

func TestReRegisterKeepsAddresses(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	key := ts.key(t, AuthKeyOptions{Tags: []string{"tag:x"}, Reusable: true})
	_, mk, _ := ed25519.GenerateKey(rand.Reader)
	n1 := newTestNodeKey(t, ts.url, "", mk)
	r1 := n1.mustRegister(t, key, "box")
	// Other machines register in between.
	for range 3 {
		newTestNode(t, ts.url, "").mustRegister(t, key, "other")
	}
	// Same machine, new process: new node and disco keys, with and without
	// an auth key.
	n2 := newTestNodeKey(t, ts.url, ts.Fingerprint(), mk)
	r2 := n2.mustRegister(t, key, "box")
	n3 := newTestNodeKey(t, ts.url, ts.Fingerprint(), mk)
	r3 := n3.mustRegister(t, "", "box-renamed")
	for _, r := range []*netmap.RegisterResponse{r2, r3} {
		if r.Node.ID != r1.Node.ID || !slices.Equal(r.Node.Addresses, r1.Node.Addresses) {
			t.Errorf("re-registration: id %d addrs %v; want %d %v", r.Node.ID, r.Node.Addresses, r1.Node.ID, r1.Node.Addresses)
		}
	}
	if r3.Node.NodeKey != n3.nk.Public() || r3.Node.Hostname != "box-renamed" {
		t.Errorf("re-registration did not update key/hostname: %+v", r3.Node)
	}
	// A different machine never gets those addresses.
	r4 := newTestNode(t, ts.url, "").mustRegister(t, key, "new")
	if r4.Node.Addresses[0] == r1.Node.Addresses[0] {
		t.Error("a new machine got an existing node's address")
	}
	// Unknown machine without a key.
	_, err := newTestNode(t, ts.url, ts.Fingerprint()).register(context.Background(), "", "x")
	wantErr(t, err, controlclient.ErrNotRegistered)
}

// TestEphemeralCleanup: an ephemeral node stays while its map stream is
// open and is deleted EphemeralTimeout after the stream closed; other
// nodes stay.
func TestEphemeralCleanup(t *testing.T) {
	const timeout = 5 * time.Minute
	clk := newClock()
	ts := startServer(t, ServerOptions{EphemeralTimeout: timeout, clock: clk})
	ctx := context.Background()
	key := ts.key(t, AuthKeyOptions{Tags: []string{"tag:x"}, Reusable: true})
	ekey := ts.key(t, AuthKeyOptions{Tags: []string{"tag:ci"}, Ephemeral: true})
	a, e := newTestNode(t, ts.url, ""), newTestNode(t, ts.url, "")
	a.mustRegister(t, key, "a")
	a.follow(t, a.mapRequest())
	// Registration arms the deletion timer; the stream disarms it.
	e.mustRegister(t, ekey, "job")
	stopE := e.follow(t, e.mapRequest())
	a.waitMap(t, "ephemeral peer online", peerOnline(e.id, true))
	// While the stream is open the node stays: no deletion is pending once
	// the stream has served its first map, the timeout passing changes
	// nothing, and neither does a timer that fired as the stream opened.
	e.waitMap(t, "its first map", func(*netmap.NetworkMap) bool { return true })
	ts.mu.Lock()
	pending := ts.ephemeral[e.id] != nil
	ts.mu.Unlock()
	if pending {
		t.Fatal("ephemeral node's deletion scheduled while its stream is open")
	}
	clk.Advance(2 * timeout)
	ts.reapEphemeral(e.id)
	if _, err := ts.store.Node(ctx, e.id); err != nil {
		t.Fatalf("ephemeral node deleted while its stream was open: %v", err)
	}
	// The stream closes: the deletion is armed when the coordinator sees
	// it end, and runs when the timeout has passed.
	armed := clk.Started()
	stopE()
	awaitTimer(t, clk, armed+1, "the ephemeral node's deletion timer")
	// Another timer may be the one that started first (a CI run under
	// -race saw the deletion not yet armed here); the clock stands still,
	// so the deletion, when armed, still runs exactly at the timeout.
	waitFor(t, "the node's deletion armed after the stream closed", func() bool {
		ts.mu.Lock()
		defer ts.mu.Unlock()
		return ts.ephemeral[e.id] != nil
	})
	clk.Advance(timeout - time.Nanosecond)
	if _, err := ts.store.Node(ctx, e.id); err != nil {
		t.Fatalf("ephemeral node deleted before the timeout: %v", err)
	}
	clk.Advance(time.Nanosecond) // the deletion runs inside Advance
	if _, err := ts.store.Node(ctx, e.id); err == nil {
		t.Fatal("ephemeral node still stored at the timeout")
	}
	a.waitMap(t, "ephemeral peer deleted", func(m *netmap.NetworkMap) bool { return m.Peers[e.id] == nil })
	nodes, err := ts.Nodes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		if n.ID == e.id {
			t.Fatal("ephemeral node still in the store")
		}
	}
	// A non-ephemeral node that goes offline stays.
	if len(nodes) != 1 || nodes[0].ID != a.id {
		t.Errorf("nodes after cleanup: %+v", nodes)
	}
}

func TestRestartKeepsStateAndResumes(t *testing.T) {
	dir := t.TempDir()
	ts := startServer(t, ServerOptions{StateDir: dir})
	ctx := context.Background()
	key := ts.key(t, AuthKeyOptions{Tags: []string{"tag:x"}, Reusable: true})
	nodes := make([]*testNode, 3)
	for i := range nodes {
		nodes[i] = newTestNode(t, ts.url, "")
		nodes[i].mustRegister(t, key, fmt.Sprintf("n%d", i))
		nodes[i].follow(t, nodes[i].mapRequest())
	}
	for _, n := range nodes {
		n.waitMap(t, "all peers online", func(m *netmap.NetworkMap) bool {
			return len(m.Peers) == 2 && !slices.ContainsFunc(m.SortedPeers(), func(p *netmap.Node) bool { return !p.Online })
		})
	}
	oldEpoch, fp := ts.Epoch(), ts.Fingerprint()
	tokBefore, _ := readFile(dir + "/admin.token")
	ts.stop(t)

	ts2 := startServerAt(t, ServerOptions{StateDir: dir, Logger: testLogger(t)}, ts.addr)
	if ts2.Fingerprint() != fp {
		t.Fatalf("fingerprint changed across restart: %s -> %s", fp, ts2.Fingerprint())
	}
	if tokAfter, _ := readFile(dir + "/admin.token"); tokAfter != tokBefore {
		t.Error("admin token changed across restart")
	}
	// Every node reconnects on its own and gets the new epoch's full map.
	for _, n := range nodes {
		n.waitMap(t, "reconnected to the new epoch", func(m *netmap.NetworkMap) bool {
			return m.Epoch == ts2.Epoch() && m.Epoch != oldEpoch && len(m.Peers) == 2 &&
				!slices.ContainsFunc(m.SortedPeers(), func(p *netmap.Node) bool { return !p.Online })
		})
	}
	// Keys, nodes and their addresses survived.
	if _, err := newTestNode(t, ts2.url, "").register(ctx, key, "late"); err != nil {
		t.Fatalf("reusable key after restart: %v", err)
	}
	all, err := ts2.Nodes(ctx)
	if err != nil || len(all) != 4 {
		t.Fatalf("nodes after restart: %d %v", len(all), err)
	}
	for _, n := range nodes {
		if m := n.current(); !slices.Equal(m.Self.Addresses, n.self.Addresses) || m.Self.ID != n.id {
			t.Errorf("node %d: addresses %v after restart; want %v", n.id, m.Self.Addresses, n.self.Addresses)
		}
	}
}

func TestReconnectAfterDropResumes(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	key := ts.key(t, AuthKeyOptions{Tags: []string{"tag:x"}, Reusable: true})
	a, b := newTestNode(t, ts.url, ""), newTestNode(t, ts.url, "")
	a.mustRegister(t, key, "a")
	b.mustRegister(t, key, "b")
	reqA := a.mapRequest()
	reqA.Endpoints = []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:1001")}
	a.follow(t, reqA)
	b.follow(t, b.mapRequest())
	a.waitMap(t, "b online", peerOnline(b.id, true))
	// a's endpoints move after its stream opened.
	reqA.Endpoints = []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:2002")}
	if err := a.c.Update(context.Background(), reqA); err != nil {
		t.Fatal(err)
	}
	b.waitMap(t, "a online at its new endpoint", func(m *netmap.NetworkMap) bool {
		p := m.Peers[a.id]
		return p != nil && p.Online && len(p.Endpoints) == 1 && p.Endpoints[0].Port() == 2002
	})
	fullBefore := ts.hub.stats.full.Load()

	// The coordinator drops a's stream (as it does for a slow reader), and
	// a change happens while a is away.
	ts.hub.mu.Lock()
	for _, s := range ts.hub.sessions[a.id] {
		ts.hub.dropLocked(s, errSlowConsumer)
	}
	ts.hub.mu.Unlock()
	c := newTestNode(t, ts.url, "")
	c.mustRegister(t, key, "c")
	a.waitMap(t, "c after reconnect", hasPeer(c.id))
	waitFor(t, "a resumed", func() bool { return ts.hub.stats.resumed.Load() >= 1 })
	if got := ts.hub.stats.full.Load(); got != fullBefore {
		t.Errorf("reconnect sent %d full maps; want a resume delta", got-fullBefore)
	}
	if !a.current().Peers[b.id].Online {
		t.Error("b not online in a's resumed map")
	}
	// Reconnecting did not report the stale endpoint the stream opened with.
	waitFor(t, "a online again", func() bool { return ts.hub.online(a.id) })
	if eps := ts.hub.get(a.id).Endpoints; len(eps) != 1 || eps[0].Port() != 2002 {
		t.Errorf("a's endpoints after reconnect %v; want the updated 127.0.0.1:2002", eps)
	}
}

func TestBadRequestsDoNotHurtOthers(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	ctx := context.Background()
	key := ts.key(t, AuthKeyOptions{Tags: []string{"tag:x"}, Reusable: true})
	a, b := newTestNode(t, ts.url, ""), newTestNode(t, ts.url, "")
	a.mustRegister(t, key, "a")
	b.mustRegister(t, key, "b")
	a.follow(t, a.mapRequest())
	b.follow(t, b.mapRequest())
	a.waitMap(t, "b online", peerOnline(b.id, true))

	// Raw requests with the right machine credentials but bad bodies.
	hc := machineHTTP(t, b.c.ServerPin(), b.mk)
	raw := func(path string, body []byte) error {
		return doRaw(ctx, hc, ts.url, path, body)
	}
	bad := []struct {
		name, path string
		body       []byte
	}{
		{"garbage", "/machine/map", []byte("\x00\xffnot json")},
		{"trailing data", "/machine/map", []byte(`{"version":1}{}`)},
		{"oversized", "/machine/register", append([]byte(`{"hostname":"`), make([]byte, 100<<10)...)},
		{"wrong types", "/machine/register", []byte(`{"version":"one","node_key":7}`)},
		{"bad key text", "/machine/map", []byte(`{"version":1,"node_key":"nodekey:zz"}`)},
		{"zero node key", "/machine/map", []byte(`{"version":1}`)},
		{"old protocol", "/machine/map", []byte(`{"version":0,"node_key":"` + b.nk.Public().String() + `"}`)},
		{"bad endpoint", "/machine/map", []byte(`{"version":1,"node_key":"` + b.nk.Public().String() + `","endpoints":["0.0.0.0:0"]}`)},
		{"bad tag", "/machine/register", []byte(`{"version":1,"node_key":"` + b.nk.Public().String() + `","request_tags":["evil"]}`)},
	}
	for _, tt := range bad {
		err := raw(tt.path, tt.body)
		var ae *controlclient.APIError
		if !errors.As(err, &ae) || ae.Status/100 != 4 || ae.Message == "" {
			t.Errorf("%s: %v; want a 4xx error with a message", tt.name, err)
		}
	}
	// No client certificate at all on a machine endpoint; no token on admin.
	ac, _ := NewAdminClient(ts.url, "msadm-"+strings.Repeat("b", 32)+"-"+ts.Fingerprint())
	if _, err := ac.Nodes(ctx); !errors.Is(err, controlclient.ErrUnauthorized) {
		t.Errorf("admin with a wrong token: %v", err)
	}
	if err := controlclient.DoJSON(ctx, ac.hc, "POST", ts.url+"/machine/map", "", netmap.MapRequest{Version: 1}, nil, nil); !errors.Is(err, controlclient.ErrBadRequest) {
		t.Errorf("machine request without a client certificate: %v", err)
	}
	// The honest nodes still get updates.
	req := b.mapRequest()
	req.Endpoints = []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:9")}
	if err := b.c.Update(ctx, req); err != nil {
		t.Fatal(err)
	}
	a.waitMap(t, "b's endpoint after the garbage", func(m *netmap.NetworkMap) bool {
		p := m.Peers[b.id]
		return p != nil && len(p.Endpoints) == 1
	})
}

func Test200Nodes(t *testing.T) {
	if testing.Short() {
		t.Skip("200-node test skipped in -short mode")
	}
	ts := startServer(t, ServerOptions{})
	key := ts.key(t, AuthKeyOptions{Tags: []string{"tag:fleet"}, Reusable: true})
	const n = 200
	nodes := make([]*testNode, n)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range nodes {
		nodes[i] = newTestNode(t, ts.url, "")
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := nodes[i].register(context.Background(), key, fmt.Sprintf("gpu%03d", i)); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for _, nd := range nodes {
		req := nd.mapRequest()
		req.Endpoints = []netip.AddrPort{netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(10000+nd.id))}
		nd.follow(t, req)
	}
	var lastBad string
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(lastBad)
		}
	})
	for _, nd := range nodes {
		nd.waitMap(t, "all 199 peers online with endpoints", func(m *netmap.NetworkMap) bool {
			if len(m.Peers) != n-1 {
				return false
			}
			for _, p := range m.Peers {
				if !p.Online || len(p.Endpoints) != 1 || p.Endpoints[0].Port() != uint16(10000+p.ID) {
					lastBad = fmt.Sprintf("node %d sees peer %d online=%v endpoints=%v", nd.id, p.ID, p.Online, p.Endpoints)
					return false
				}
			}
			return true
		})
	}
}

func readFile(p string) (string, error) {
	b, err := osReadFile(p)
	return string(b), err
}
