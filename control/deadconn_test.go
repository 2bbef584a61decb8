package control

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/internal/netlab"
	"meshd.dev/meshd/netmap"
)

// TestVanishedNodeGoesOffline: a node whose packets stop (power loss, a
// cut link: nothing closes its connection) goes offline once the
// coordinator's keep-alive stays unacknowledged for DeadConnTimeout, not
// after TCP's 15 minutes of retransmissions. The map stream is HTTP/1.1,
// without HTTP/2's pings. In a lab namespace, where iptables drops every
// packet of the node's connections both ways.
func TestVanishedNodeGoesOffline(t *testing.T) {
	lab := netlab.New(t)
	h := lab.NewHost("coord")
	var ln net.Listener
	if err := h.Do(func() (err error) {
		ln, err = net.Listen("tcp", "127.0.0.1:0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	const dead = time.Second
	s, err := NewServer(context.Background(), ServerOptions{StateDir: t.TempDir(), Logger: testLogger(t), KeepAliveInterval: 200 * time.Millisecond, DeadConnTimeout: dead})
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(ln)
	t.Cleanup(func() { s.Close() })

	var mu sync.Mutex
	var ports []int // the node's local ports
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		var c net.Conn
		err := h.Do(func() (err error) {
			var d net.Dialer
			c, err = d.DialContext(ctx, network, addr)
			return err
		})
		if err == nil {
			mu.Lock()
			ports = append(ports, c.LocalAddr().(*net.TCPAddr).Port)
			mu.Unlock()
		}
		return c, err
	}
	_, mk, _ := ed25519.GenerateKey(rand.Reader)
	nk := netmap.NewNodePrivate()
	// The node must not come back on a new connection during the test.
	c, err := controlclient.NewClient(controlclient.ClientOptions{URL: "https://" + ln.Addr().String(), MachineKey: mk, ServerPin: s.Fingerprint(),
		NodeKey: nk, DialContext: dial, Logger: testLogger(t), MinBackoff: time.Hour, MaxBackoff: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	key, _, err := s.CreateAuthKey(context.Background(), AuthKeyOptions{Preauthorized: true, User: "alice"})
	if err != nil {
		t.Fatal(err)
	}
	dk := netmap.NewDiscoPrivate()
	resp, err := c.Register(context.Background(), netmap.RegisterRequest{NodeKey: nk.Public(), DiscoKey: dk.Public(), Hostname: "vanishing", AuthKey: key})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go c.Follow(ctx, netmap.MapRequest{NodeKey: nk.Public(), DiscoKey: dk.Public()}, func(*netmap.NetworkMap) {})
	waitFor(t, "the node online", func() bool { return s.hub.online(resp.Node.ID) })

	mu.Lock()
	for _, p := range ports {
		for _, dir := range []string{"--sport", "--dport"} {
			h.MustRun("iptables", "-A", "INPUT", "-p", "tcp", dir, strconv.Itoa(p), "-j", "DROP")
		}
	}
	mu.Unlock()
	cut := time.Now()
	deadline := cut.Add(10 * dead)
	for s.hub.online(resp.Node.ID) {
		if time.Now().After(deadline) {
			t.Fatalf("node still online %v after its packets stopped; want offline within about keep-alive + %v", time.Since(cut).Round(time.Millisecond), dead)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("offline %v after the node vanished", time.Since(cut).Round(time.Millisecond))
}
