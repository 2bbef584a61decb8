package control

import (
	"context"
	"errors"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/derp"
	"meshd.dev/meshd/netmap"
)

// startRelay runs a derp.Server with verify; the caller mounts or serves it.
func newRelay(t *testing.T, verify func(context.Context, netmap.NodePublic) error) *derp.Server {
	t.Helper()
	ds, err := derp.NewServer(derp.ServerOptions{PrivateKey: netmap.NewNodePrivate(), Verify: verify, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ds.Close() })
	return ds
}

func dialRelay(t *testing.T, url, fp string, k netmap.NodePrivate) (*derp.Client, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := derp.Dial(ctx, url, derp.ClientOptions{NodeKey: k, CertFingerprint: fp})
	if err == nil {
		t.Cleanup(func() { c.Close() })
	}
	return c, err
}

func wantRefused(t *testing.T, err error, what string) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s: relay accepted the client", what)
	}
	if !strings.Contains(err.Error(), "not registered with the coordinator") {
		t.Fatalf("%s: refused with %q, want the not-registered message", what, err)
	}
}

// TestEmbeddedDERP runs the relay on the coordinator's own TLS listener, as
// `meshd coordinator` does without --derp-map: registered nodes get in and
// relay to each other, unknown and expired keys are refused, and the map
// nodes receive points at the coordinator with its fingerprint.
func TestEmbeddedDERP(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	host, portStr, _ := net.SplitHostPort(ts.addr)
	port, _ := strconv.Atoi(portStr)
	if err := ts.SetDERPMap(EmbeddedDERPMap(host, port, 0, ts.Fingerprint())); err != nil {
		t.Fatal(err)
	}
	ds := newRelay(t, ts.VerifyNodeKey)
	ts.Handle("/derp", ds)

	key := ts.key(t, AuthKeyOptions{Reusable: true, Tags: []string{"tag:gpu"}})
	a := newTestNode(t, ts.url, ts.Fingerprint())
	a.mustRegister(t, key, "a")
	b := newTestNode(t, ts.url, ts.Fingerprint())
	b.mustRegister(t, key, "b")

	// The node learns the relay from its map, and dials what it says.
	stop := a.follow(t, a.mapRequest())
	nm := a.waitMap(t, "a DERP map", func(nm *netmap.NetworkMap) bool { return len(nm.DERPMap.Regions) == 1 })
	stop()
	dn := nm.DERPMap.Regions[0].Nodes[0]
	relayURL := "https://" + net.JoinHostPort(dn.Host, strconv.Itoa(dn.DERPPort))
	if dn.CertFingerprint != ts.Fingerprint() {
		t.Fatalf("map pins %q, coordinator is %q", dn.CertFingerprint, ts.Fingerprint())
	}

	ca, err := dialRelay(t, relayURL, dn.CertFingerprint, a.nk)
	if err != nil {
		t.Fatalf("registered node a: %v", err)
	}
	cb, err := dialRelay(t, relayURL, dn.CertFingerprint, b.nk)
	if err != nil {
		t.Fatalf("registered node b: %v", err)
	}
	if err := ca.Send(b.nk.Public(), []byte("through the coordinator")); err != nil {
		t.Fatal(err)
	}
	for {
		m, err := cb.Recv()
		if err != nil {
			t.Fatalf("b receiving: %v", err)
		}
		if p, ok := m.(derp.ReceivedPacket); ok {
			if p.Source != a.nk.Public() || string(p.Data) != "through the coordinator" {
				t.Fatalf("b got %q from %v", p.Data, p.Source)
			}
			break
		}
	}

	_, err = dialRelay(t, relayURL, dn.CertFingerprint, netmap.NewNodePrivate())
	wantRefused(t, err, "unknown key")

	// Expiring b's key shuts it out at once, not at the next sweep.
	if err := ts.ExpireNode(context.Background(), b.id); err != nil {
		t.Fatal(err)
	}
	_, err = dialRelay(t, relayURL, dn.CertFingerprint, b.nk)
	wantRefused(t, err, "expired key")

	// The coordinator's API still answers next to the relay.
	if _, err := a.register(context.Background(), "", "a"); err != nil {
		t.Fatalf("re-register a after relay use: %v", err)
	}
}

func TestSetDERPMapRefusesInvalid(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	good := EmbeddedDERPMap("127.0.0.1", 443, 3478, ts.Fingerprint())
	if err := ts.SetDERPMap(good); err != nil {
		t.Fatal(err)
	}
	bad := &netmap.DERPMap{Regions: []netmap.DERPRegion{{ID: 0, Code: "x"}}}
	if err := ts.SetDERPMap(bad); err == nil {
		t.Fatal("invalid map accepted")
	}
	if got := ts.DERPMap(); got != good {
		t.Fatalf("map after a refused update: %+v", got)
	}
}

// TestRelayVerifier runs a standalone relay that asks the coordinator about
// every client through the relay-token endpoint, as `meshd derp
// --coordinator` does.
func TestRelayVerifier(t *testing.T) {
	ctx := context.Background()
	ts := startServer(t, ServerOptions{})
	path, err := ts.EnableRelayVerify()
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("relay token file: %v %v", fi, err)
	}
	tokBytes, _ := os.ReadFile(path)
	tok := strings.TrimSpace(string(tokBytes))
	if again, err := ts.EnableRelayVerify(); err != nil || again != path {
		t.Fatalf("second EnableRelayVerify: %q %v", again, err)
	}
	if b, _ := os.ReadFile(path); string(b) != string(tokBytes) {
		t.Fatal("second EnableRelayVerify changed the token")
	}

	clk := newClock() // the verifier's cache; the coordinator runs on the wall clock
	v, err := NewRelayVerifier(ts.url, tok, RelayVerifierOptions{TTL: time.Minute, NegativeTTL: 10 * time.Second, StaleTTL: time.Hour, Logger: testLogger(t), clock: clk})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(v.Close)
	ds := newRelay(t, v.Verify)
	hs := httptest.NewServer(ds)
	t.Cleanup(hs.Close)

	key := ts.key(t, AuthKeyOptions{Reusable: true, Tags: []string{"tag:gpu"}})
	a := newTestNode(t, ts.url, ts.Fingerprint())
	a.mustRegister(t, key, "a")
	b := newTestNode(t, ts.url, ts.Fingerprint())
	b.mustRegister(t, key, "b")

	if _, err := dialRelay(t, hs.URL, "", a.nk); err != nil {
		t.Fatalf("registered node a refused: %v", err)
	}
	stranger := netmap.NewNodePrivate()
	_, err = dialRelay(t, hs.URL, "", stranger)
	wantRefused(t, err, "unknown key")

	// A cached "known" holds for TTL, then the coordinator's word counts.
	if err := ts.ExpireNode(ctx, a.id); err != nil {
		t.Fatal(err)
	}
	if err := v.Verify(ctx, a.nk.Public()); err != nil {
		t.Fatalf("within TTL, cached answer: %v", err)
	}
	clk.Advance(time.Minute + time.Second)
	if err := v.Verify(ctx, a.nk.Public()); !errors.Is(err, ErrUnknownNodeKey) {
		t.Fatalf("after TTL, expired node: %v", err)
	}

	// A node that registers after being refused gets in once the short
	// negative TTL passes.
	late := newTestNode(t, ts.url, ts.Fingerprint())
	if err := v.Verify(ctx, late.nk.Public()); !errors.Is(err, ErrUnknownNodeKey) {
		t.Fatalf("before registering: %v", err)
	}
	late.mustRegister(t, key, "late")
	if err := v.Verify(ctx, late.nk.Public()); !errors.Is(err, ErrUnknownNodeKey) {
		t.Fatalf("negative answer not cached: %v", err)
	}
	clk.Advance(11 * time.Second)
	if err := v.Verify(ctx, late.nk.Public()); err != nil {
		t.Fatalf("registered node after the negative TTL: %v", err)
	}

	// Coordinator down: nodes known recently stay accepted, nobody else.
	if err := v.Verify(ctx, b.nk.Public()); err != nil {
		t.Fatal(err)
	}
	ts.stop(t)
	clk.Advance(2 * time.Minute)
	if _, err := dialRelay(t, hs.URL, "", b.nk); err != nil {
		t.Fatalf("known node while the coordinator is down: %v", err)
	}
	_, err = dialRelay(t, hs.URL, "", stranger)
	if err == nil || !strings.Contains(err.Error(), "cannot check the node with the coordinator") {
		t.Fatalf("unknown node while the coordinator is down: %v", err)
	}
	clk.Advance(time.Hour)
	if err := v.Verify(ctx, b.nk.Public()); err == nil {
		t.Fatal("stale answer used past StaleTTL")
	}
}

func TestRelayVerifierTokens(t *testing.T) {
	ctx := context.Background()
	ts := startServer(t, ServerOptions{})
	path, err := ts.EnableRelayVerify()
	if err != nil {
		t.Fatal(err)
	}
	tokBytes, _ := os.ReadFile(path)
	tok := strings.TrimSpace(string(tokBytes))
	parts := strings.Split(tok, "-")

	for _, tc := range []struct {
		name, token, wantErr string
	}{
		{"malformed", "hello", "relay token is malformed"},
		{"admin token is not a relay token", "msadm-" + parts[1] + "-" + parts[2], "relay token is malformed"},
		{"wrong secret", parts[0] + "-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA-" + parts[2], "relay token missing or wrong"},
		{"other coordinator", parts[0] + "-" + parts[1] + "-" + strings.Repeat("ab", 32), "coordinator presented"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, err := NewRelayVerifier(ts.url, tc.token, RelayVerifierOptions{})
			if err == nil {
				defer v.Close()
				err = v.Verify(ctx, netmap.NewNodePrivate().Public())
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("got %v, want %q", err, tc.wantErr)
			}
		})
	}

	// A restart keeps the token; it is the relay's configuration.
	ts.stop(t)
	ts2 := startServer(t, ServerOptions{StateDir: ts.dir})
	path2, err := ts2.EnableRelayVerify()
	if err != nil {
		t.Fatal(err)
	}
	tok2, _ := os.ReadFile(path2)
	if path2 != filepath.Join(ts.dir, "relay.token") || strings.TrimSpace(string(tok2)) != tok {
		t.Fatalf("token changed across restart: %s %q", path2, tok2)
	}
}

// TestFetchDERPMap: the map is public but pinned: the right fingerprint
// gets exactly the map nodes get, a wrong one gets nothing.
func TestFetchDERPMap(t *testing.T) {
	ctx := context.Background()
	ts := startServer(t, ServerOptions{})
	_, err := FetchDERPMap(ctx, ts.url, ts.Fingerprint())
	if err == nil || !strings.Contains(err.Error(), "hands out no DERP map") {
		t.Fatalf("coordinator without a map: %v", err)
	}
	want := EmbeddedDERPMap("127.0.0.1", 8443, 3478, ts.Fingerprint())
	want.Regions = append(want.Regions, netmap.DERPRegion{ID: 7, Code: "lab", Name: "lab relays", Nodes: []netmap.DERPNode{
		{Name: "7a", Host: "198.18.1.2", DERPPort: 443, STUNPort: -1, CertFingerprint: strings.Repeat("cd", 32)},
		{Name: "7b", Host: "relay.example", STUNOnly: true, STUNPort: 3478},
	}})
	if err := ts.SetDERPMap(want); err != nil {
		t.Fatal(err)
	}
	got, err := FetchDERPMap(ctx, ts.url, ts.Fingerprint())
	if err != nil {
		t.Fatal(err)
	}
	if g, w := string(FormatDERPMap(got)), string(FormatDERPMap(want)); g != w {
		t.Fatalf("fetched map\n%s\nwant\n%s", g, w)
	}
	for _, tc := range []struct {
		name, url, fp string
		want          error
		wantMsg       string
	}{
		{name: "other coordinator's pin", url: ts.url, fp: strings.Repeat("ab", 32), want: controlclient.ErrPinMismatch},
		{name: "malformed pin", url: ts.url, fp: "xyz", wantMsg: "want 64 hex digits"},
		{name: "plain http", url: "http://" + ts.addr, fp: ts.Fingerprint(), wantMsg: "only speaks https"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := FetchDERPMap(ctx, tc.url, tc.fp)
			if tc.want != nil && !errors.Is(err, tc.want) || tc.wantMsg != "" && (err == nil || !strings.Contains(err.Error(), tc.wantMsg)) {
				t.Fatalf("got %v, want %v %q", err, tc.want, tc.wantMsg)
			}
		})
	}
}
