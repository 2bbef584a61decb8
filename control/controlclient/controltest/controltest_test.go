package controltest

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"testing"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
)

func machine(t *testing.T) ed25519.PrivateKey {
	t.Helper()
	_, k, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestFakeBehavesLikeTheCoordinator checks the parts of the real
// coordinator's behaviour agent tests rely on.
func TestFakeBehavesLikeTheCoordinator(t *testing.T) {
	c := New(Options{AuthKey: "k", Tags: []string{"tag:t"}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	a, b := c.Client(machine(t)), c.Client(machine(t))
	if _, err := a.Register(ctx, netmap.RegisterRequest{NodeKey: netmap.NewNodePrivate().Public(), Hostname: "a", AuthKey: "wrong"}); !errors.Is(err, controlclient.ErrAuthKeyUnknown) {
		t.Fatalf("register with a wrong key: %v, want ErrAuthKeyUnknown", err)
	}
	ra, err := a.Register(ctx, netmap.RegisterRequest{NodeKey: netmap.NewNodePrivate().Public(), Hostname: "a", AuthKey: "k"})
	if err != nil {
		t.Fatal(err)
	}
	rb, err := b.Register(ctx, netmap.RegisterRequest{NodeKey: netmap.NewNodePrivate().Public(), Hostname: "b", AuthKey: "k"})
	if err != nil {
		t.Fatal(err)
	}
	if ra.Node.ID == rb.Node.ID || ra.Node.Addresses[0] == rb.Node.Addresses[0] || ra.ServerKey != a.ServerPin() {
		t.Fatalf("nodes %+v and %+v share an id or address, or pin %q != %q", ra.Node, rb.Node, ra.ServerKey, a.ServerPin())
	}
	maps := make(chan *netmap.NetworkMap, 16)
	done := make(chan error, 1)
	go func() {
		done <- a.Follow(ctx, netmap.MapRequest{NodeKey: ra.Node.NodeKey}, func(nm *netmap.NetworkMap) { maps <- nm })
	}()
	nm := <-maps
	if len(nm.Peers) != 1 || nm.Peers[rb.Node.ID] == nil || !nm.PolicyBootstrap || len(nm.PacketFilter) != 1 || !nm.Self.Online {
		t.Fatalf("first map: %+v", nm)
	}
	if err := c.Delete("b"); err != nil {
		t.Fatal(err)
	}
	for nm = <-maps; len(nm.Peers) != 0; nm = <-maps {
	}
	if err := c.Delete("a"); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, controlclient.ErrNotRegistered) {
		t.Fatalf("Follow after delete: %v, want ErrNotRegistered", err)
	}
	c.SetDown(true)
	if err := b.Update(ctx, netmap.MapRequest{}); err == nil {
		t.Fatal("Update succeeded while the coordinator is down")
	}
}
