package control

import (
	"context"
	"crypto/tls"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
)

func TestHTTP2OverTLS13(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	n := newTestNode(t, ts.url, ts.Fingerprint())
	resp, err := machineHTTP(t, ts.Fingerprint(), n.mk).Post(ts.url+"/machine/map", "application/json", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.ProtoMajor != 2 || resp.TLS == nil || resp.TLS.Version != tls.VersionTLS13 {
		t.Fatalf("proto %s, TLS %+v; want HTTP/2 over TLS 1.3", resp.Proto, resp.TLS)
	}
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("empty map request: status %d", resp.StatusCode)
	}
}

func TestHandleMountsExtraHandlers(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	// Registered after Serve started is fine too: the mux is shared.
	ts.Handle("GET /derp", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("relay")) }))
	n := newTestNode(t, ts.url, ts.Fingerprint())
	resp, err := machineHTTP(t, ts.Fingerprint(), n.mk).Get(ts.url + "/derp")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || string(body) != "relay" {
		t.Fatalf("mounted handler: %d %q", resp.StatusCode, body)
	}
}

func TestStateFilesAndAdminTokenRotation(t *testing.T) {
	dir := t.TempDir()
	ts := startServer(t, ServerOptions{StateDir: dir})
	for _, f := range []string{keyFile, adminTokenFile} {
		fi, err := os.Stat(filepath.Join(dir, f))
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("%s: %v %v; want mode 0600", f, fi, err)
		}
	}
	old, _ := os.ReadFile(filepath.Join(dir, adminTokenFile))
	ts.stop(t)
	// Deleting the token file and restarting issues a new one; the old one
	// stops working.
	os.Remove(filepath.Join(dir, adminTokenFile))
	ts2 := startServer(t, ServerOptions{StateDir: dir})
	tok, _ := os.ReadFile(filepath.Join(dir, adminTokenFile))
	if string(tok) == string(old) {
		t.Fatal("admin token not rotated")
	}
	ac, _ := NewAdminClient(ts2.url, string(old))
	if _, err := ac.Users(context.Background()); err == nil {
		t.Fatal("old admin token still accepted")
	}
	ac, _ = NewAdminClient(ts2.url, string(tok))
	if _, err := ac.Users(context.Background()); err != nil {
		t.Fatalf("new admin token: %v", err)
	}
}

// TestNodeKeyExpiresOverTime: a user's node key is valid for
// NodeKeyExpiry; at the first sweep after that the node leaves its peers'
// maps, and its requests are refused. A tagged node's key never expires.
func TestNodeKeyExpiresOverTime(t *testing.T) {
	const expiry, sweep = 24 * time.Hour, 30 * time.Second
	clk := newClock()
	ts := startServer(t, ServerOptions{NodeKeyExpiry: expiry, SweepInterval: sweep, clock: clk})
	ukey := ts.key(t, AuthKeyOptions{User: "alice@example.com", Reusable: true})
	tkey := ts.key(t, AuthKeyOptions{Tags: []string{"tag:srv"}})
	u, srv := newTestNode(t, ts.url, ""), newTestNode(t, ts.url, "")
	u.mustRegister(t, ukey, "laptop")
	srv.mustRegister(t, tkey, "server")
	u.follow(t, u.mapRequest())
	srv.follow(t, srv.mapRequest())
	srv.waitMap(t, "laptop online", peerOnline(u.id, true))
	clk.Advance(expiry - time.Second)
	if err := u.c.Update(context.Background(), u.mapRequest()); err != nil {
		t.Fatalf("a second before the key expires: %v", err)
	}
	// The user's node key expires (the sweep ticks at that very time);
	// the tagged server's never does.
	clk.Advance(time.Second)
	srv.waitMap(t, "expired laptop gone", func(m *netmap.NetworkMap) bool { return m.Peers[u.id] == nil })
	wantErr(t, u.c.Update(context.Background(), u.mapRequest()), controlclient.ErrNodeExpired)
	if err := srv.c.Update(context.Background(), srv.mapRequest()); err != nil {
		t.Fatalf("tagged node after the user's expiry: %v", err)
	}
}

// TestEphemeralCleanedUpAfterRestart: an ephemeral node that never comes
// back after the coordinator restarts is deleted EphemeralTimeout after
// the start.
func TestEphemeralCleanedUpAfterRestart(t *testing.T) {
	const timeout = 5 * time.Minute
	ctx := context.Background()
	dir := t.TempDir()
	ts := startServer(t, ServerOptions{StateDir: dir})
	e := newTestNode(t, ts.url, "")
	e.mustRegister(t, ts.key(t, AuthKeyOptions{Tags: []string{"tag:ci"}, Ephemeral: true}), "job")
	ts.stop(t)
	clk := newClock()
	ts2 := startServer(t, ServerOptions{StateDir: dir, EphemeralTimeout: timeout, clock: clk})
	// The deletion timers are armed by the start; they run inside Advance.
	clk.Advance(timeout - time.Nanosecond)
	if nodes, err := ts2.Nodes(ctx); err != nil || len(nodes) != 1 {
		t.Fatalf("before the timeout: nodes %+v, %v; want the ephemeral node", nodes, err)
	}
	clk.Advance(time.Nanosecond)
	if nodes, err := ts2.Nodes(ctx); err != nil || len(nodes) != 0 {
		t.Fatalf("at the timeout: nodes %+v, %v; want none", nodes, err)
	}
}

func TestPolicyHooks(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	ctx := context.Background()
	ts.SetPolicy(tagPolicy{refuse: "tag:evil"})
	key := ts.key(t, AuthKeyOptions{User: "bob@example.com", Reusable: true})
	n := newTestNode(t, ts.url, "")
	_, err := n.register(ctx, key, "x", "tag:evil")
	wantErr(t, err, controlclient.ErrTagsForbidden)

	a, b := newTestNode(t, ts.url, ""), newTestNode(t, ts.url, "")
	a.register(ctx, key, "a", "tag:red")
	b.register(ctx, key, "b", "tag:blue")
	a.follow(t, a.mapRequest())
	m := a.waitMap(t, "first map", func(*netmap.NetworkMap) bool { return true })
	if m.PolicyBootstrap || len(m.Peers) != 0 {
		t.Fatalf("under the tag policy a sees %v (bootstrap=%v)", peerIDs(m), m.PolicyBootstrap)
	}
	ts.SetPolicy(nil)
	a.waitMap(t, "b visible under bootstrap", func(m *netmap.NetworkMap) bool { return m.PolicyBootstrap && m.Peers[b.id] != nil })
}

func TestDBURL(t *testing.T) {
	dir := t.TempDir()
	elsewhere := filepath.Join(t.TempDir(), "meshd.db")
	s, err := NewServer(context.Background(), ServerOptions{StateDir: dir, DBURL: "sqlite:" + elsewhere})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	if _, err := os.Stat(elsewhere); err != nil {
		t.Errorf("sqlite:PATH did not create the database there: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, dbFile)); err == nil {
		t.Error("database created in the state dir despite --db")
	}
	for _, u := range []string{"postgres://db/meshd", "mysql://x", "file.db"} {
		if _, err := NewServer(context.Background(), ServerOptions{StateDir: dir, DBURL: u}); err == nil {
			t.Errorf("DBURL %q accepted", u)
		}
	}
}
