package agent

import (
	"context"
	"crypto/tls"
	"io"
	"log"
	"net"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/control"
	"meshd.dev/meshd/derp"
	"meshd.dev/meshd/internal/tlspin"
	"meshd.dev/meshd/nat/stun"
	"meshd.dev/meshd/netmap"
)

// newRelayMesh is a testMesh whose coordinator hands out a DERP map with a
// relay and STUN server on loopback.
func newRelayMesh(t *testing.T) *testMesh {
	t.Helper()
	cert, err := derp.NewSelfSignedCert([]string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	ds, err := derp.NewServer(derp.ServerOptions{PrivateKey: netmap.NewNodePrivate()})
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewUnstartedServer(ds)
	hs.Config.ErrorLog = log.New(io.Discard, "", 0)
	hs.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"http/1.1"}}
	hs.StartTLS()
	t.Cleanup(func() { ds.Close(); hs.Close() })
	ss, err := stun.Listen("127.0.0.1:0", nil)
	if err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); ss.Serve(sctx) }()
	t.Cleanup(func() { cancel(); <-done })
	dm := &netmap.DERPMap{Regions: []netmap.DERPRegion{{ID: 7, Code: "loop", Nodes: []netmap.DERPNode{{
		Name: "7a", Host: "127.0.0.1", DERPPort: hs.Listener.Addr().(*net.TCPAddr).Port,
		STUNPort: int(ss.AddrPort().Port()), CertFingerprint: tlspin.Fingerprint(cert.Leaf),
	}}}}}
	return newTestMeshWith(t, control.ServerOptions{DERPMap: dm})
}

// TestMagicBindPaths: with a DERP map, each agent picks the region as its
// home and publishes it, peers see it in their maps, status shows the
// direct path the bind found with its endpoint, and Ping reports a pong.
func TestMagicBindPaths(t *testing.T) {
	m := newRelayMesh(t)
	a := m.join("a")
	b := m.join("b")
	waitStatus(t, a, "a to see b with b's home region", func(st *localapi.Status) bool {
		a.mu.Lock()
		defer a.mu.Unlock()
		for _, n := range a.nm.Peers {
			if n.Hostname == "b" {
				return n.HomeDERP == 7
			}
		}
		return false
	})
	echoThrough(t, a, b, "b", 7001, "hello")
	st := waitStatus(t, a, "a's path to b to be direct", func(st *localapi.Status) bool {
		p := peerNamed(st, "b")
		return p != nil && p.Path == "direct"
	})
	if p := peerNamed(st, "b"); !isLoopback(p.Endpoint) {
		t.Errorf("direct endpoint %q, want one of b's loopback endpoints", p.Endpoint)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	res, err := a.Ping(ctx, "b")
	if err != nil {
		t.Fatal(err)
	}
	if res.Peer != "b" || res.Path != "direct" || !isLoopback(res.Endpoint) || res.LatencyMS <= 0 {
		t.Errorf("ping b: %+v, want a direct pong from b", res)
	}
	if _, err := a.Ping(ctx, "nobody"); err == nil || !strings.Contains(err.Error(), "nobody") {
		t.Errorf("ping of an unknown peer: %v", err)
	}
}

func isLoopback(ep string) bool {
	ap, err := netip.ParseAddrPort(ep)
	return err == nil && ap.Addr().IsLoopback() && ap.Port() != 0
}
