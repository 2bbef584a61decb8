package control

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"meshd.dev/meshd/netmap"
)

// TestRelayTokenSharedAcrossReplicas: the relay token made by the first
// replica to enable it works on every replica (the others hold no copy and
// say so), and a standalone relay given every replica's URL keeps checking
// nodes after the replica it asked is gone. A token that is not the
// tailnet's is refused by every replica.
func TestRelayTokenSharedAcrossReplicas(t *testing.T) {
	ctx := context.Background()
	rs := startReplicas(t, 2, ServerOptions{})
	a, b := rs[0], rs[1]
	pathA, err := a.EnableRelayVerify()
	if err != nil || pathA == "" {
		t.Fatalf("A made no relay token: %q, %v", pathA, err)
	}
	pathB, err := b.EnableRelayVerify()
	if err != nil {
		t.Fatal(err)
	}
	if pathB != "" {
		t.Fatalf("B wrote a relay token of its own at %s; want none (the tailnet's is A's)", pathB)
	}
	if _, err := os.Stat(filepath.Join(b.dir, relayTokenFile)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("B's state dir holds a relay token: %v", err)
	}
	tok, err := os.ReadFile(pathA)
	if err != nil {
		t.Fatal(err)
	}
	key := b.key(t, AuthKeyOptions{Reusable: true, Tags: []string{"tag:gpu"}})
	reg := func(name string) netmap.NodePublic {
		n := newTestNode(t, b.url, b.Fingerprint())
		n.mustRegister(t, key, name)
		return n.nk.Public()
	}
	first := reg("first")

	// B answers A's token.
	onB, err := NewRelayVerifier(b.url, string(tok), RelayVerifierOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(onB.Close)
	if err := onB.Verify(ctx, first); err != nil {
		t.Fatalf("B with A's relay token: %v", err)
	}
	forged := relayTokenPrefix + "-" + randomSecret() + "-" + a.Fingerprint()
	for _, ts := range rs {
		v, err := NewRelayVerifier(ts.url, forged, RelayVerifierOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if err := v.Verify(ctx, first); err == nil || !strings.Contains(err.Error(), "relay token") {
			t.Errorf("%s accepted a token that is not the tailnet's: %v", ts.url, err)
		}
		v.Close()
	}

	// A relay that knows both asks A, and B once A is gone. A learns of
	// the node B registered through the change feed.
	waitFor(t, "A to know the node registered on B", func() bool { return a.VerifyNodeKey(ctx, first) == nil })
	both, err := NewRelayVerifier(a.url+","+b.url, string(tok), RelayVerifierOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(both.Close)
	if err := both.Verify(ctx, first); err != nil {
		t.Fatal(err)
	}
	a.stop(t)
	second := reg("second") // not cached: the relay must ask
	if err := both.Verify(ctx, second); err != nil {
		t.Fatalf("a node registered after A stopped, asked of A then B: %v", err)
	}
	if err := both.Verify(ctx, netmap.NewNodePrivate().Public()); err == nil {
		t.Fatal("an unknown key passed")
	}
}
