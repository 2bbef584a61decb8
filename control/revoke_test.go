package control

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/derp"
	"meshd.dev/meshd/internal/clock"
	"meshd.dev/meshd/netmap"
)

// revocationBound is how long a revoked client's relay connection may
// outlive the revocation. The push takes a round trip on loopback; the
// bound is generous for a loaded CI machine, not a figure of merit.
const revocationBound = 5 * time.Second

// connClosed returns a channel that yields the error that ends c's
// receive loop.
func connClosed(c *derp.Client) <-chan error {
	done := make(chan error, 1)
	go func() {
		for {
			if _, err := c.Recv(); err != nil {
				done <- err
				return
			}
		}
	}()
	return done
}

func wantClosedWithin(t *testing.T, done <-chan error, what string) {
	t.Helper()
	select {
	case <-done:
	case <-time.After(revocationBound):
		t.Fatalf("%s: relay connection still open %v after the revocation", what, revocationBound)
	}
}

func wantOpen(t *testing.T, done <-chan error, what string) {
	t.Helper()
	select {
	case err := <-done:
		t.Fatalf("%s: relay connection closed: %v", what, err)
	default:
	}
}

// revocations are the ways a node key stops being valid while the node is
// connected to a relay.
var revocations = []struct {
	name string
	// revoke ends n's key; it returns the key that must now be refused.
	revoke func(t *testing.T, ts *testServer, n *testNode) netmap.NodePrivate
	// reconnect is the key the node may still connect with (zero: none).
	reconnect func(n *testNode) netmap.NodePrivate
}{
	{
		name: "node deleted",
		revoke: func(t *testing.T, ts *testServer, n *testNode) netmap.NodePrivate {
			if err := ts.DeleteNode(context.Background(), n.id); err != nil {
				t.Fatal(err)
			}
			return n.nk
		},
	},
	{
		name: "node expired",
		revoke: func(t *testing.T, ts *testServer, n *testNode) netmap.NodePrivate {
			if err := ts.ExpireNode(context.Background(), n.id); err != nil {
				t.Fatal(err)
			}
			return n.nk
		},
	},
	{
		name: "node key rotated",
		revoke: func(t *testing.T, ts *testServer, n *testNode) netmap.NodePrivate {
			old := n.rotate()
			if err := n.c.Update(context.Background(), n.mapRequest()); err != nil {
				t.Fatal(err)
			}
			return old
		},
		reconnect: func(n *testNode) netmap.NodePrivate { return n.nk },
	},
}

// TestEmbeddedRelayRevocation: the coordinator's own relay drops a client
// as soon as its key is revoked, refuses it afterwards, and leaves other
// clients alone.
func TestEmbeddedRelayRevocation(t *testing.T) {
	for _, tc := range revocations {
		t.Run(tc.name, func(t *testing.T) {
			ts := startServer(t, ServerOptions{})
			ds := newRelay(t, ts.VerifyNodeKey)
			ts.Handle("/derp", ds)
			enforceRevocations(t, ts, ds)

			key := ts.key(t, AuthKeyOptions{Reusable: true, Tags: []string{"tag:gpu"}})
			a := newTestNode(t, ts.url, ts.Fingerprint())
			a.mustRegister(t, key, "a")
			b := newTestNode(t, ts.url, ts.Fingerprint())
			b.mustRegister(t, key, "b")
			ca, err := dialRelay(t, ts.url+"/derp", ts.Fingerprint(), a.nk)
			if err != nil {
				t.Fatal(err)
			}
			cb, err := dialRelay(t, ts.url+"/derp", ts.Fingerprint(), b.nk)
			if err != nil {
				t.Fatal(err)
			}
			aDone, bDone := connClosed(ca), connClosed(cb)

			revoked := tc.revoke(t, ts, a)
			wantClosedWithin(t, aDone, "revoked node")
			_, err = dialRelay(t, ts.url+"/derp", ts.Fingerprint(), revoked)
			wantRefused(t, err, "reconnect with the revoked key")
			if tc.reconnect != nil {
				if _, err := dialRelay(t, ts.url+"/derp", ts.Fingerprint(), tc.reconnect(a)); err != nil {
					t.Fatalf("reconnect with the node's new key: %v", err)
				}
			}
			wantOpen(t, bDone, "the other node")
			if got := ds.Stats().Revoked; got != 1 {
				t.Fatalf("relay counted %d revocations, want 1", got)
			}
		})
	}
}

// TestEmbeddedRelayRevokesClientsConnectedBefore: clients connected before
// enforcement started are checked when it starts.
func TestEmbeddedRelayRevokesClientsConnectedBefore(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	ds := newRelay(t, ts.VerifyNodeKey)
	ts.Handle("/derp", ds)
	key := ts.key(t, AuthKeyOptions{Reusable: true, Tags: []string{"tag:gpu"}})
	a := newTestNode(t, ts.url, ts.Fingerprint())
	a.mustRegister(t, key, "a")
	ca, err := dialRelay(t, ts.url+"/derp", ts.Fingerprint(), a.nk)
	if err != nil {
		t.Fatal(err)
	}
	done := connClosed(ca)
	if err := ts.DeleteNode(context.Background(), a.id); err != nil {
		t.Fatal(err)
	}
	wantOpen(t, done, "before enforcement") // the gap this test closes

	enforceRevocations(t, ts, ds)
	wantClosedWithin(t, done, "deleted before enforcement started")
}

// standaloneRelay runs a relay on its own listener that checks clients
// with ts through the relay token, as `meshd derp --coordinator` does.
// Its verifier runs on clk (nil: the wall clock).
func standaloneRelay(t *testing.T, ts *testServer, clk clock.Clock) (*RelayVerifier, *derp.Server, string) {
	t.Helper()
	path, err := ts.EnableRelayVerify()
	if err != nil {
		t.Fatal(err)
	}
	tok, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	// Default TTLs: a cached "known" would let a revoked node back in for
	// 30s if the revocation did not also reach the cache.
	v, err := NewRelayVerifier(ts.url, string(tok), RelayVerifierOptions{Logger: testLogger(t), clock: clk})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(v.Close)
	ds := newRelay(t, v.Verify)
	hs := httptest.NewServer(ds)
	t.Cleanup(hs.Close)
	return v, ds, hs.URL
}

func startWatch(t *testing.T, v *RelayVerifier, ds *derp.Server) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- v.Watch(ctx, ds) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("Watch returned %v, want context.Canceled", err)
		}
	})
}

// TestStandaloneRelayRevocation: a standalone relay learns revocations
// from the coordinator's stream and drops the client at once; the
// reconnect is refused even though the relay cached the key as known.
func TestStandaloneRelayRevocation(t *testing.T) {
	for _, tc := range revocations {
		t.Run(tc.name, func(t *testing.T) {
			ts := startServer(t, ServerOptions{})
			v, ds, relayURL := standaloneRelay(t, ts, nil)
			startWatch(t, v, ds)

			key := ts.key(t, AuthKeyOptions{Reusable: true, Tags: []string{"tag:gpu"}})
			a := newTestNode(t, ts.url, ts.Fingerprint())
			a.mustRegister(t, key, "a")
			b := newTestNode(t, ts.url, ts.Fingerprint())
			b.mustRegister(t, key, "b")
			ca, err := dialRelay(t, relayURL, "", a.nk)
			if err != nil {
				t.Fatal(err)
			}
			cb, err := dialRelay(t, relayURL, "", b.nk)
			if err != nil {
				t.Fatal(err)
			}
			aDone, bDone := connClosed(ca), connClosed(cb)

			revoked := tc.revoke(t, ts, a)
			wantClosedWithin(t, aDone, "revoked node")
			_, err = dialRelay(t, relayURL, "", revoked)
			wantRefused(t, err, "reconnect with the revoked key")
			if tc.reconnect != nil {
				if _, err := dialRelay(t, relayURL, "", tc.reconnect(a)); err != nil {
					t.Fatalf("reconnect with the node's new key: %v", err)
				}
			}
			wantOpen(t, bDone, "the other node")
		})
	}
}

// TestStandaloneRelayResync: revocations made while the relay's stream is
// down (here: before it first opens, and across a coordinator restart)
// are caught up by the batch re-check when the stream opens.
func TestStandaloneRelayResync(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	clk := newClock() // the relay's: its reconnect delay passes when the test says
	v, ds, relayURL := standaloneRelay(t, ts, clk)
	key := ts.key(t, AuthKeyOptions{Reusable: true, Tags: []string{"tag:gpu"}})
	var nodes []*testNode
	var done []<-chan error
	for _, host := range []string{"a", "b", "c"} {
		n := newTestNode(t, ts.url, ts.Fingerprint())
		n.mustRegister(t, key, host)
		c, err := dialRelay(t, relayURL, "", n.nk)
		if err != nil {
			t.Fatal(err)
		}
		nodes, done = append(nodes, n), append(done, connClosed(c))
	}
	if err := ts.DeleteNode(context.Background(), nodes[0].id); err != nil {
		t.Fatal(err)
	}
	startWatch(t, v, ds)
	wantClosedWithin(t, done[0], "deleted before the stream opened")

	// The coordinator restarts on the same port and node b is deleted
	// while the relay waits to reconnect: the re-check catches it up.
	armed := clk.Started()
	ts.stop(t)
	awaitTimer(t, clk, armed+1, "the relay's reconnect delay")
	ts2 := startServerAt(t, ServerOptions{StateDir: ts.dir}, ts.addr)
	if err := ts2.DeleteNode(context.Background(), nodes[1].id); err != nil {
		t.Fatal(err)
	}
	if _, err := ts2.EnableRelayVerify(); err != nil {
		t.Fatal(err)
	}
	wantOpen(t, done[1], "before the relay reconnected")
	clk.Advance(time.Second) // the first delay is at most backoff's Min, 1s
	wantClosedWithin(t, done[1], "deleted while the coordinator restarted")
	wantOpen(t, done[2], "node c, still registered")
	_, err := dialRelay(t, relayURL, "", nodes[1].nk)
	wantRefused(t, err, "reconnect of the node deleted during the restart")
}

// TestKeyFeedDropsLaggingWatcher: a watcher that does not keep up is cut
// off (so it resynchronises) and never blocks the publisher.
func TestKeyFeedDropsLaggingWatcher(t *testing.T) {
	var f keyFeed
	slow, fast := f.subscribe(), f.subscribe()
	got := 0
	for i := 0; i < keyFeedBuffer+1; i++ {
		f.publish(netmap.NewNodePrivate().Public())
		select {
		case <-fast.ch:
			got++
		default:
		}
	}
	select {
	case <-slow.lost:
	default:
		t.Fatal("lagging watcher not dropped")
	}
	select {
	case <-fast.lost:
		t.Fatal("watcher that kept up was dropped")
	default:
	}
	if got != keyFeedBuffer+1 {
		t.Fatalf("fast watcher got %d keys, want %d", got, keyFeedBuffer+1)
	}
	f.publish(netmap.NewNodePrivate().Public()) // no panic on a dropped watcher
	f.unsubscribe(slow)
	f.unsubscribe(fast)
}

// TestRelayVerifyBatch: the batch check answers per key, needs the relay
// token and bounds the request.
func TestRelayVerifyBatch(t *testing.T) {
	ctx := context.Background()
	ts := startServer(t, ServerOptions{})
	path, err := ts.EnableRelayVerify()
	if err != nil {
		t.Fatal(err)
	}
	tok, _ := os.ReadFile(path)
	v, err := NewRelayVerifier(ts.url, string(tok), RelayVerifierOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(v.Close)
	key := ts.key(t, AuthKeyOptions{Reusable: true, Tags: []string{"tag:gpu"}})
	a := newTestNode(t, ts.url, ts.Fingerprint())
	a.mustRegister(t, key, "a")
	stranger := netmap.NewNodePrivate().Public()
	u := v.base().JoinPath(relayVerifyPath).String()

	many := make([]netmap.NodePublic, maxVerifyBatch+1)
	for i := range many {
		many[i] = netmap.NewNodePrivate().Public()
	}
	for _, tc := range []struct {
		name    string
		token   string
		keys    []netmap.NodePublic
		want    []bool
		wantErr string
	}{
		{name: "mixed", token: v.token, keys: []netmap.NodePublic{a.nk.Public(), stranger}, want: []bool{true, false}},
		{name: "empty", token: v.token, keys: nil, want: []bool{}},
		{name: "no token", token: "", keys: []netmap.NodePublic{a.nk.Public()}, wantErr: "relay token missing or wrong"},
		{name: "too many", token: v.token, keys: many, wantErr: "at most 512"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out RelayVerifyBatchResponse
			err := controlclient.DoJSON(ctx, v.hc, "POST", u, tc.token, RelayVerifyBatchRequest{Keys: tc.keys}, &out, nil)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(out.Known) != len(tc.want) {
				t.Fatalf("known %v, want %v", out.Known, tc.want)
			}
			for i := range tc.want {
				if out.Known[i] != tc.want[i] {
					t.Fatalf("known %v, want %v", out.Known, tc.want)
				}
			}
		})
	}
}

// recordingRelay is a relay with no clients that records disconnects:
// enough to see what a revocation stream makes a relay do.
type recordingRelay struct{ disconnected []netmap.NodePublic }

func (*recordingRelay) ClientKeys() []netmap.NodePublic { return nil }
func (r *recordingRelay) DisconnectClient(k netmap.NodePublic) bool {
	r.disconnected = append(r.disconnected, k)
	return true
}

// FuzzRevocationStream feeds arbitrary bytes to the relay's reader of the
// coordinator's revocation stream: it must not panic, and it may act only
// on keys that lines of the input name, each then refused from the cache.
func FuzzRevocationStream(f *testing.F) {
	k := netmap.NewNodePrivate().Public()
	f.Add([]byte("{\"ready\":true}\n{\"revoked\":\"" + k.String() + "\"}\n{}\n"))
	f.Add([]byte("{\"revoked\":\"nodekey:00\"}\n"))
	f.Add([]byte("{\"ready\":true,\"revoked\":\"" + k.String() + "\"}\n\n"))
	f.Add([]byte("not json\n"))
	f.Add([]byte(strings.Repeat("x", 5000)))
	tok := "msrly-" + strings.Repeat("A", 32) + "-" + strings.Repeat("ab", 32)
	f.Fuzz(func(t *testing.T, data []byte) {
		v, err := NewRelayVerifier("https://127.0.0.1:1", tok, RelayVerifierOptions{})
		if err != nil {
			t.Fatal(err)
		}
		defer v.Close()
		relay := &recordingRelay{}
		lines := 0
		err = v.readRevocations(context.Background(), bytes.NewReader(data), relay, func() { lines++ })
		if err == nil {
			t.Fatal("stream ended without an error")
		}
		// Every key revoked must be the key of one line of the input, in
		// input order.
		var named []netmap.NodePublic
		for _, line := range bytes.Split(data, []byte("\n")) {
			var r RelayRevocation
			if json.Unmarshal(line, &r) == nil && r.Revoked != nil {
				named = append(named, *r.Revoked)
			}
		}
		for i, k := range relay.disconnected {
			if i >= len(named) || named[i] != k {
				t.Fatalf("disconnect %d is %v; the input's lines name %v", i, k, named)
			}
			if err := v.Verify(context.Background(), k); !errors.Is(err, ErrUnknownNodeKey) {
				t.Fatalf("revoked key %v not refused from the cache: %v", k, err)
			}
		}
		if len(relay.disconnected) > lines {
			t.Fatalf("%d disconnects from %d lines", len(relay.disconnected), lines)
		}
	})
}

// TestRevocationBeatsAnswerInFlight: a "known" answer asked for before a
// revocation arrived (the coordinator answered, then deleted the node) must
// not overwrite the revocation in the relay's cache.
func TestRevocationBeatsAnswerInFlight(t *testing.T) {
	tok := "msrly-" + strings.Repeat("A", 32) + "-" + strings.Repeat("ab", 32)
	v, err := NewRelayVerifier("https://127.0.0.1:1", tok, RelayVerifierOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	k, other := netmap.NewNodePrivate().Public(), netmap.NewNodePrivate().Public()
	now := time.Now()
	v.mu.Lock()
	before := v.revGen
	v.mu.Unlock()
	v.markRevoked(k, now)
	if v.store(k, true, now, before) {
		t.Fatal("answer from before the revocation overrode it")
	}
	if err := v.Verify(context.Background(), k); !errors.Is(err, ErrUnknownNodeKey) {
		t.Fatalf("revoked key after a stale answer: %v", err)
	}
	// Answers asked for after the revocation, and about other keys, count.
	v.mu.Lock()
	after := v.revGen
	v.mu.Unlock()
	if !v.store(other, true, now, before) || !v.store(k, true, now, after) {
		t.Fatal("answer not affected by the revocation was dropped")
	}
	if err := v.Verify(context.Background(), k); err != nil {
		t.Fatalf("key known again (re-registered) after a fresh answer: %v", err)
	}
}

// TestRelayDropsNodeWhenKeyExpires: a user's node whose key expires while
// it is connected loses its relay connection at the next expiry sweep,
// on the embedded and on a standalone relay.
func TestRelayDropsNodeWhenKeyExpires(t *testing.T) {
	const expiry, sweep = 24 * time.Hour, 30 * time.Second
	clk := newClock() // the coordinator's; the standalone relay's is the wall clock
	ts := startServer(t, ServerOptions{NodeKeyExpiry: expiry, SweepInterval: sweep, clock: clk})
	embedded := newRelay(t, ts.VerifyNodeKey)
	ts.Handle("/derp", embedded)
	ctx, cancel := context.WithCancel(context.Background())
	enforced := make(chan struct{})
	go func() { ts.EnforceRevocations(ctx, embedded); close(enforced) }()
	t.Cleanup(func() { cancel(); <-enforced })
	v, standalone, standaloneURL := standaloneRelay(t, ts, nil)
	startWatch(t, v, standalone)

	a := newTestNode(t, ts.url, ts.Fingerprint())
	a.mustRegister(t, ts.key(t, AuthKeyOptions{User: "alice@example.com"}), "laptop")
	c1, err := dialRelay(t, ts.url+"/derp", ts.Fingerprint(), a.nk)
	if err != nil {
		t.Fatal(err)
	}
	c2, err := dialRelay(t, standaloneURL, "", a.nk)
	if err != nil {
		t.Fatal(err)
	}
	relays := []struct {
		what string
		done <-chan error
	}{{"embedded relay", connClosed(c1)}, {"standalone relay", connClosed(c2)}}
	clk.Advance(expiry - time.Second)
	if err := ts.VerifyNodeKey(context.Background(), a.nk.Public()); err != nil {
		t.Fatalf("a second before the key expires: %v", err)
	}
	for _, c := range relays {
		wantOpen(t, c.done, c.what+", a second before the key expires")
	}
	clk.Advance(time.Second) // the sweep ticks at the expiry
	for _, c := range relays {
		wantClosedWithin(t, c.done, c.what+", key expired")
	}
	_, err = dialRelay(t, standaloneURL, "", a.nk)
	wantRefused(t, err, "reconnect with the expired key")
}

// FuzzRelayVerifyBatch sends arbitrary bodies to the relay's batch check:
// the answer is one verdict per key asked, or a 4xx JSON error; nothing
// may panic or answer 500.
func FuzzRelayVerifyBatch(f *testing.F) {
	s, err := NewServer(context.Background(), ServerOptions{StateDir: f.TempDir()})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { s.Close() })
	path, err := s.EnableRelayVerify()
	if err != nil {
		f.Fatal(err)
	}
	tok, _ := os.ReadFile(path)
	bearer := "Bearer " + strings.TrimSpace(string(tok))
	h := s.Handler()
	k := netmap.NewNodePrivate().Public()
	f.Add([]byte(`{"keys":["` + k.String() + `"]}`))
	f.Add([]byte(`{"keys":[]}`))
	f.Add([]byte(`{"keys":["nodekey:zz"]}`))
	f.Add([]byte(`{"keys":null,"extra":1}`))
	f.Add([]byte(`{"keys":["` + k.String() + `","` + k.String() + `"]}` + "\n{}"))
	f.Fuzz(func(t *testing.T, body []byte) {
		req := httptest.NewRequest(http.MethodPost, relayVerifyPath, bytes.NewReader(body))
		req.Header.Set("Authorization", bearer)
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		raw, _ := io.ReadAll(rec.Body)
		if rec.Code == http.StatusOK {
			var in RelayVerifyBatchRequest
			var out RelayVerifyBatchResponse
			if err := json.Unmarshal(raw, &out); err != nil {
				t.Fatalf("200 with body %q: %v", raw, err)
			}
			if json.Unmarshal(body, &in) == nil && len(out.Known) != len(in.Keys) {
				t.Fatalf("%d verdicts for %d keys", len(out.Known), len(in.Keys))
			}
			for i, known := range out.Known {
				if known {
					t.Fatalf("verdict %d: a key of a tailnet with no nodes is known", i)
				}
			}
			return
		}
		var eb controlclient.ErrorBody
		if err := json.Unmarshal(raw, &eb); err != nil || eb.Code == "" || rec.Code >= 500 {
			t.Fatalf("status %d with body %q: want a 4xx JSON error with a code", rec.Code, raw)
		}
	})
}

// enforceRevocations pushes ts's revocations to the relay ds until the test
// ends.
func enforceRevocations(t *testing.T, ts *testServer, ds *derp.Server) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	enforced := make(chan struct{})
	go func() { ts.EnforceRevocations(ctx, ds); close(enforced) }()
	t.Cleanup(func() { cancel(); <-enforced })
}
