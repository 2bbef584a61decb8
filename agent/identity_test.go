package agent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/agent/proxy"
	"meshd.dev/meshd/netmap"
)

// feedControl is a coordinator that sends whatever maps the test gives it:
// an older or hostile one, which a real coordinator no longer is.
type feedControl struct {
	self netmap.Node
	maps chan *netmap.NetworkMap
}

func (f *feedControl) Register(context.Context, netmap.RegisterRequest) (*netmap.RegisterResponse, error) {
	return &netmap.RegisterResponse{Node: f.self, ServerKey: "feed"}, nil
}
func (f *feedControl) SetTags(context.Context, netmap.SetTagsRequest) (*netmap.SetTagsResponse, error) {
	return nil, errors.New("feedControl: no tags")
}
func (f *feedControl) Cert(context.Context, netmap.CertRequest) (*netmap.CertResponse, error) {
	return nil, errors.New("feedControl: no CA")
}
func (f *feedControl) Logout(context.Context) (*netmap.LogoutResponse, error) {
	return nil, errors.New("feedControl: no logout")
}
func (f *feedControl) ServerPin() string                               { return "feed" }
func (f *feedControl) Update(context.Context, netmap.MapRequest) error { return nil }
func (f *feedControl) Close()                                          {}
func (f *feedControl) Follow(ctx context.Context, _ netmap.MapRequest, fn func(*netmap.NetworkMap)) error {
	for {
		select {
		case m := <-f.maps:
			fn(m.Clone())
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func feedNode(id netmap.NodeID, name string, nk netmap.NodePublic, dk netmap.DiscoPublic) *netmap.Node {
	a := netip.PrefixFrom(netip.AddrFrom4([4]byte{100, 64, 0, byte(id)}), 32)
	return &netmap.Node{ID: id, Hostname: name, NodeKey: nk, DiscoKey: dk, Addresses: []netip.Prefix{a}, AllowedIPs: []netip.Prefix{a}}
}

// startFed runs an agent in dir whose coordinator is feed, up with the
// first map feed sends.
func startFed(t *testing.T, dir string, feed *feedControl, first func(self netmap.Node) *netmap.NetworkMap) *Agent {
	t.Helper()
	a, err := New(Options{StateDir: dir, TUN: TUNUserspace, LoopbackOnly: true, Logger: slog.New(slog.DiscardHandler),
		NewControlClient: func(ControlConfig) (ControlClient, error) { return feed, nil }})
	if err != nil {
		t.Fatal(err)
	}
	feed.self = *feedNode(1, "me", a.NodeKey(), netmap.DiscoPublic{0xee})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-done
		a.Close()
	})
	if first != nil {
		feed.maps <- first(feed.self)
	}
	if _, err := a.Up(context.Background(), localapi.UpRequest{AuthKey: "k", Coordinator: "https://feed"}); err != nil {
		t.Fatal(err)
	}
	return a
}

// TestMapPeersSharingKeysDropped: a map in which peers share a node key
// or a disco key, or claim this node's key, configures none of them
// anywhere (status, WireGuard, the saved map, name lookups), because the
// node cannot tell the genuine one; other peers are untouched. Before, one
// of the claimants took the key with its own allowed IPs, at random.
func TestMapPeersSharingKeysDropped(t *testing.T) {
	feed := &feedControl{maps: make(chan *netmap.NetworkMap, 1)}
	key := func(b byte) netmap.NodePublic { return netmap.NodePublic{b, 0x11} }
	disco := func(b byte) netmap.DiscoPublic { return netmap.DiscoPublic{b, 0x22} }
	var want []netmap.NodePublic
	conflicted := func(self netmap.Node) *netmap.NetworkMap {
		peers := []*netmap.Node{
			feedNode(2, "victim", key(2), disco(2)),
			feedNode(3, "impostor", key(2), disco(3)), // victim's node key
			feedNode(4, "legit", key(4), disco(4)),
			feedNode(5, "thief", key(5), disco(4)),            // legit's disco key
			feedNode(6, "mirror", self.NodeKey, disco(6)),     // our node key
			feedNode(7, "echo", key(7), self.DiscoKey),        // our disco key
			feedNode(8, "solo", key(8), disco(8)),             // fine
			feedNode(9, "twin", key(9), netmap.DiscoPublic{}), // fine, no disco key
		}
		want = []netmap.NodePublic{key(8), key(9)}
		m := &netmap.NetworkMap{Epoch: "e", Version: 1, Self: self, Peers: map[netmap.NodeID]*netmap.Node{}}
		for _, p := range peers {
			m.Peers[p.ID] = p
		}
		return m
	}
	dir := t.TempDir()
	a := startFed(t, dir, feed, conflicted)

	st := waitStatus(t, a, "the map", func(st *localapi.Status) bool { return st.BackendState == localapi.StateRunning })
	var names []string
	for _, p := range st.Peers {
		names = append(names, p.Hostname)
	}
	if !slices.Equal(names, []string{"solo", "twin"}) {
		t.Fatalf("peers in status: %v, want [solo twin]", names)
	}
	a.mu.Lock()
	var configured []netmap.NodePublic
	for k := range a.eng.want {
		configured = append(configured, k)
	}
	a.mu.Unlock()
	slices.SortFunc(configured, func(x, y netmap.NodePublic) int { return strings.Compare(x.String(), y.String()) })
	if !slices.Equal(configured, want) {
		t.Fatalf("WireGuard peers %v, want %v", configured, want)
	}
	for _, name := range []string{"victim", "impostor", "legit", "thief", "mirror", "echo"} {
		if _, err := a.Dial(context.Background(), "tcp", name+":80"); err == nil || !strings.Contains(err.Error(), "no peer named") {
			t.Errorf("dial %s: %v, want no such peer", name, err)
		}
	}
	saved, err := a.store.LoadNetworkMap()
	if err != nil || len(saved.Peers) != 2 {
		t.Fatalf("saved map: %d peers (%v), want 2", len(saved.Peers), err)
	}

	// A map saved by an older version, conflicts included, is cleaned when
	// the daemon starts from it.
	dir2 := t.TempDir()
	st2, err := OpenStore(dir2)
	if err != nil {
		t.Fatal(err)
	}
	id, err := st2.LoadOrCreateIdentity()
	if err != nil {
		t.Fatal(err)
	}
	self := *feedNode(1, "me", id.NodeKey.Public(), netmap.DiscoPublic{0xee})
	if err := st2.SaveLogin(&Login{CoordinatorURL: "https://feed", ServerPin: "feed", NodeID: 1, Hostname: "me"}); err != nil {
		t.Fatal(err)
	}
	if err := st2.SaveNetworkMap(conflicted(self)); err != nil {
		t.Fatal(err)
	}
	st2.Close()
	b, err := New(Options{StateDir: dir2, TUN: TUNUserspace, LoopbackOnly: true, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if got := len(b.nm.Peers); got != 2 {
		t.Fatalf("map loaded from disk has %d peers, want 2", got)
	}
}

// TestNameLookupsRefuseAmbiguousNames: the SOCKS5 and HTTP CONNECT proxies
// and every lookup resolve a name to exactly one node: a name two nodes
// hold is an error naming both, never one of them at random.
func TestNameLookupsRefuseAmbiguousNames(t *testing.T) {
	feed := &feedControl{maps: make(chan *netmap.NetworkMap, 1)}
	a := startFed(t, t.TempDir(), feed, func(self netmap.Node) *netmap.NetworkMap {
		m := &netmap.NetworkMap{Epoch: "e", Version: 1, Self: self, Peers: map[netmap.NodeID]*netmap.Node{}}
		for _, p := range []*netmap.Node{
			feedNode(2, "gpu-3", netmap.NodePublic{2}, netmap.DiscoPublic{2}),
			feedNode(3, "GPU-3", netmap.NodePublic{3}, netmap.DiscoPublic{3}),
			feedNode(4, "me", netmap.NodePublic{4}, netmap.DiscoPublic{4}), // our own name
			feedNode(5, "solo", netmap.NodePublic{5}, netmap.DiscoPublic{5}),
		} {
			m.Peers[p.ID] = p
		}
		return m
	})
	waitStatus(t, a, "the map", func(st *localapi.Status) bool { return len(st.Peers) == 4 })
	a.mu.Lock()
	nm := a.nm
	a.mu.Unlock()

	for _, tc := range []struct {
		host    string
		want    netip.Addr
		wantErr string
	}{
		{"gpu-3", netip.Addr{}, "node 2 at 100.64.0.2, node 3 at 100.64.0.3"},
		{"GPU-3.", netip.Addr{}, "ambiguous"},
		{"me", netip.Addr{}, "node 1 at 100.64.0.1, node 4 at 100.64.0.4"},
		{"solo", netip.MustParseAddr("100.64.0.5"), ""},
		{"100.64.0.2", netip.MustParseAddr("100.64.0.2"), ""},
	} {
		got, err := resolvePeer(nm, tc.host)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("resolvePeer(%q) = %v, %v; want an error containing %q", tc.host, got, err, tc.wantErr)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("resolvePeer(%q) = %v, %v; want %v", tc.host, got, err, tc.want)
		}
	}
	pctx, pcancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer pcancel()
	if _, err := a.Ping(pctx, "gpu-3"); err == nil || !strings.Contains(err.Error(), "ambiguous") {
		t.Errorf("ping gpu-3: %v, want the ambiguity", err)
	}

	// Through the proxies, as a program using them sees it.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ps := &proxy.Server{Dial: a.Dial}
	socks, _ := net.Listen("tcp", "127.0.0.1:0")
	hp, _ := net.Listen("tcp", "127.0.0.1:0")
	go ps.ServeSOCKS5(ctx, socks)
	go ps.ServeHTTPConnect(ctx, hp)

	if rep := socks5Connect(t, socks.Addr().String(), "gpu-3", 80); rep != 0x04 {
		t.Errorf("SOCKS5 CONNECT gpu-3: reply %#x, want 0x04 (host unreachable)", rep)
	}
	conn, err := net.DialTimeout("tcp", hp.Addr().String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(conn, "CONNECT gpu-3:80 HTTP/1.1\r\nHost: gpu-3:80\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusNotFound || !strings.Contains(string(body), "node 2 at 100.64.0.2, node 3 at 100.64.0.3") {
		t.Errorf("HTTP CONNECT gpu-3: %s %q, want 404 naming both nodes", resp.Status, body)
	}
}

// socks5Connect asks the SOCKS5 proxy at addr to connect to host:port and
// returns the reply code.
func socks5Connect(t *testing.T, addr, host string, port uint16) byte {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	c.Write([]byte{5, 1, 0})
	var hello [2]byte
	if _, err := io.ReadFull(c, hello[:]); err != nil || hello != [2]byte{5, 0} {
		t.Fatalf("SOCKS5 greeting: %v %v", hello, err)
	}
	req := append([]byte{5, 1, 0, 3, byte(len(host))}, host...)
	c.Write(append(req, byte(port>>8), byte(port)))
	var rep [4]byte
	if _, err := io.ReadFull(c, rep[:]); err != nil {
		t.Fatalf("SOCKS5 reply: %v", err)
	}
	return rep[1]
}
