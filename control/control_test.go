package control

import (
	"context"
	"testing"

	"meshd.dev/meshd/netmap"
)

func TestSmoke(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	key := ts.key(t, AuthKeyOptions{Reusable: true, Tags: []string{"tag:a"}})
	a := newTestNode(t, ts.url, "")
	b := newTestNode(t, ts.url, "")
	a.mustRegister(t, key, "a")
	b.mustRegister(t, key, "b")
	a.follow(t, a.mapRequest())
	b.follow(t, b.mapRequest())
	a.waitMap(t, "peer b online", func(m *netmap.NetworkMap) bool { p := m.Peers[b.id]; return p != nil && p.Online })
	_ = context.Background()
}
