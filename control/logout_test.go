package control

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"net/http"
	"slices"
	"testing"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
)

// TestLogout: a node logs itself out. An ephemeral node is deleted at
// once (no deletion timer left armed, its peers get one removal); any
// other node has its key expired, leaves its peers' maps and comes back,
// with its id and addresses, only by registering with an auth key. Each
// logout is audited with the node as the actor, and a second one says
// there is nothing left to log out.
func TestLogout(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	ctx := context.Background()
	key := ts.key(t, AuthKeyOptions{Tags: []string{"tag:x"}, Reusable: true})
	ekey := ts.key(t, AuthKeyOptions{Tags: []string{"tag:ci"}, Ephemeral: true})
	watcher := newTestNode(t, ts.url, "")
	watcher.mustRegister(t, key, "watcher")
	watcher.follow(t, watcher.mapRequest())

	t.Run("ephemeral", func(t *testing.T) {
		e := newTestNode(t, ts.url, "")
		e.mustRegister(t, ekey, "job")
		e.follow(t, e.mapRequest())
		watcher.waitMap(t, "the job online", peerOnline(e.id, true))
		resp, err := e.c.Logout(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if !resp.Deleted || resp.Expired || resp.NodeID != e.id {
			t.Fatalf("logout of an ephemeral node: %+v, want node %d deleted", resp, e.id)
		}
		if _, err := ts.store.Node(ctx, e.id); err == nil {
			t.Fatal("ephemeral node still stored after its logout")
		}
		ts.mu.Lock()
		armed := ts.ephemeral[e.id] != nil
		ts.mu.Unlock()
		if armed {
			t.Fatal("a deletion timer is armed for a node deleted already")
		}
		watcher.waitMap(t, "the job removed", func(m *netmap.NetworkMap) bool { return m.Peers[e.id] == nil })
		select {
		case err := <-e.fdone:
			e.fdone <- err // for the cleanup's stop
			wantErr(t, err, controlclient.ErrNotRegistered)
		case <-time.After(10 * time.Second):
			t.Fatal("the logged-out node's map stream did not end")
		}
		_, err = e.c.Logout(ctx)
		wantErr(t, err, controlclient.ErrNotRegistered)
	})

	t.Run("expires others", func(t *testing.T) {
		n := newTestNode(t, ts.url, "")
		reg := n.mustRegister(t, key, "server")
		n.follow(t, n.mapRequest())
		watcher.waitMap(t, "the server online", peerOnline(n.id, true))
		resp, err := n.c.Logout(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if resp.Deleted || !resp.Expired || resp.NodeID != n.id {
			t.Fatalf("logout: %+v, want node %d expired", resp, n.id)
		}
		sn, err := ts.store.Node(ctx, n.id)
		if err != nil {
			t.Fatalf("a logged-out node that is not ephemeral is kept: %v", err)
		}
		if sn.KeyExpiry.IsZero() || sn.KeyExpiry.After(time.Now()) {
			t.Fatalf("key expiry after logout %v, want now", sn.KeyExpiry)
		}
		watcher.waitMap(t, "the server gone from the map", func(m *netmap.NetworkMap) bool { return m.Peers[n.id] == nil })
		select {
		case err := <-n.fdone:
			n.fdone <- err
			wantErr(t, err, controlclient.ErrNodeExpired)
		case <-time.After(10 * time.Second):
			t.Fatal("the logged-out node's map stream did not end")
		}
		_, err = n.c.Logout(ctx)
		wantErr(t, err, controlclient.ErrNodeExpired)
		// Back with an auth key: the same node, the same addresses.
		again := n.mustRegister(t, key, "server")
		if again.Node.ID != n.id || !slices.Equal(again.Node.Addresses, reg.Node.Addresses) {
			t.Fatalf("re-registered as node %d %v, want node %d %v", again.Node.ID, again.Node.Addresses, n.id, reg.Node.Addresses)
		}
	})

	evs, err := ts.AuditLog(ctx, time.Time{}, 1000)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range evs {
		var d map[string]string
		_ = json.Unmarshal(e.Details, &d)
		if d["reason"] == "logout" {
			if e.Actor.Kind != ActorNode {
				t.Errorf("%s by %v: want the node as the actor", e.Action, e.Actor)
			}
			got = append(got, e.Action)
		}
	}
	if len(got) != 2 || got[0] != AuditNodeDelete || got[1] != AuditNodeExpire {
		t.Fatalf("audited logouts %v, want [%s %s]", got, AuditNodeDelete, AuditNodeExpire)
	}
}

// TestLogoutRefusals: what other parties can do with the logout endpoint.
// A client without a machine certificate, a machine that is not enrolled,
// and a request naming a node key that is not the node's current one (a
// rotated-away key, or another node's) are refused, and no node changes.
func TestLogoutRefusals(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	ctx := context.Background()
	key := ts.key(t, AuthKeyOptions{Tags: []string{"tag:x"}, Reusable: true})
	a, b := newTestNode(t, ts.url, ""), newTestNode(t, ts.url, "")
	a.mustRegister(t, key, "a")
	b.mustRegister(t, key, "b")
	body := func(nk netmap.NodePublic) []byte {
		j, _ := json.Marshal(netmap.LogoutRequest{Version: netmap.ProtocolVersion, NodeKey: nk})
		return j
	}
	_, stranger, _ := ed25519.GenerateKey(rand.Reader)
	oldKey := a.rotate()
	if err := a.c.Update(ctx, a.mapRequest()); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		err  error
		do   func() error
	}{
		{"no client certificate", controlclient.ErrBadRequest, func() error {
			tr := controlclient.PinnedTransport(ts.Fingerprint())
			defer tr.CloseIdleConnections()
			return doRaw(ctx, &http.Client{Transport: tr}, ts.url, controlclient.LogoutPath, body(b.nk.Public()))
		}},
		{"machine not enrolled", controlclient.ErrNotRegistered, func() error {
			return doRaw(ctx, machineHTTP(t, ts.Fingerprint(), stranger), ts.url, controlclient.LogoutPath, body(b.nk.Public()))
		}},
		{"another node's key", controlclient.ErrBadRequest, func() error {
			return doRaw(ctx, machineHTTP(t, ts.Fingerprint(), a.mk), ts.url, controlclient.LogoutPath, body(b.nk.Public()))
		}},
		{"its own rotated-away key", controlclient.ErrBadRequest, func() error {
			return doRaw(ctx, machineHTTP(t, ts.Fingerprint(), a.mk), ts.url, controlclient.LogoutPath, body(oldKey.Public()))
		}},
		{"no node key", controlclient.ErrBadRequest, func() error {
			return doRaw(ctx, machineHTTP(t, ts.Fingerprint(), a.mk), ts.url, controlclient.LogoutPath, []byte(`{"version":5}`))
		}},
		{"old protocol", controlclient.ErrTooOld, func() error {
			return doRaw(ctx, machineHTTP(t, ts.Fingerprint(), a.mk), ts.url, controlclient.LogoutPath, []byte(`{"version":0,"node_key":"`+a.nk.Public().String()+`"}`))
		}},
		{"malformed", controlclient.ErrBadRequest, func() error {
			return doRaw(ctx, machineHTTP(t, ts.Fingerprint(), a.mk), ts.url, controlclient.LogoutPath, []byte(`{"version":5,"node_key":"nodekey:zz"`))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wantErr(t, tc.do(), tc.err)
			for _, n := range []*testNode{a, b} {
				sn, err := ts.store.Node(ctx, n.id)
				if err != nil {
					t.Fatalf("node %d gone after a refused logout: %v", n.id, err)
				}
				if !sn.KeyExpiry.IsZero() && !sn.KeyExpiry.After(time.Now()) {
					t.Fatalf("node %d expired by a refused logout", n.id)
				}
			}
		})
	}
}

// TestLogoutOnOtherReplica: an ephemeral node streaming from replica B
// logs out through replica A (its client failed over, or a load balancer
// sent the request there): B's watchers drop it within a second and B
// does not keep a deletion timer for it.
func TestLogoutOnOtherReplica(t *testing.T) {
	ctx := context.Background()
	rs := startReplicas(t, 2, ServerOptions{})
	a, b := rs[0], rs[1]
	key := a.key(t, AuthKeyOptions{Tags: []string{"tag:x"}, Reusable: true, Preauthorized: true})
	ekey := a.key(t, AuthKeyOptions{Tags: []string{"tag:ci"}, Ephemeral: true, Preauthorized: true})
	w := newTestNode(t, b.url, "")
	w.mustRegister(t, key, "watcher")
	w.follow(t, w.mapRequest())
	e := newTestNode(t, b.url, "")
	e.mustRegister(t, ekey, "job")
	e.follow(t, e.mapRequest())
	w.waitMap(t, "the job online", peerOnline(e.id, true))
	viaA := newTestNodeKey(t, a.url, a.Fingerprint(), e.mk)
	viaA.c.SetNodeKey(e.nk)
	start := time.Now()
	resp, err := viaA.c.Logout(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !resp.Deleted {
		t.Fatalf("logout on the other replica: %+v, want deleted", resp)
	}
	w.waitMap(t, "the job removed on B", func(m *netmap.NetworkMap) bool { return m.Peers[e.id] == nil })
	if d := time.Since(start); d > time.Second {
		t.Errorf("a logout on A took %v to reach a node on B", d)
	}
	waitFor(t, "B to have no deletion timer for the job", func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		return b.ephemeral[e.id] == nil
	})
}
