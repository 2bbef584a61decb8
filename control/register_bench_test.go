package control

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"testing"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
)

// BenchmarkRegister enrols a new machine per iteration over loopback:
// TLS handshake with a fresh client certificate, node key challenge and
// proof, and the registration's store transaction.
func BenchmarkRegister(b *testing.B) {
	ts := startServer(b, ServerOptions{})
	key := ts.key(b, AuthKeyOptions{Tags: []string{"tag:bench"}, Reusable: true})
	ctx := context.Background()
	b.ResetTimer()
	for i := range b.N {
		_, mk, _ := ed25519.GenerateKey(rand.Reader)
		nk := netmap.NewNodePrivate()
		c, err := controlclient.NewClient(controlclient.ClientOptions{URL: ts.url, MachineKey: mk, NodeKey: nk})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := c.Register(ctx, netmap.RegisterRequest{NodeKey: nk.Public(), DiscoKey: netmap.NewDiscoPrivate().Public(), Hostname: fmt.Sprintf("n%d", i), AuthKey: key}); err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
}

// BenchmarkNodeKeyProofCheck is the coordinator's cost of checking one
// proof: the challenge MAC, a key validity check and the box.
func BenchmarkNodeKeyProofCheck(b *testing.B) {
	ch, err := newChallenger(b.TempDir() + "/challenge.key")
	if err != nil {
		b.Fatal(err)
	}
	mk := netmap.MachinePublic{1}
	nk := netmap.NewNodePrivate()
	now := time.Now()
	c := ch.issue(mk, now)
	p, err := controlclient.SealNodeKeyProof(nk, mk, &c)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if err := ch.check(mk, nk.Public(), p, now); err != nil {
			b.Fatal(err)
		}
	}
}
