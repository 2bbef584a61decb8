package e2e

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/internal/netlab"
)

// timingBound only catches a hang: the figures are logged, not asserted,
// since a shared 2-core CI machine makes any tighter bound flaky.
const timingBound = 30 * time.Second

// TestTimingUpToDirect measures, with two sites behind EasyNAT and the lab
// relay, how long a node that just ran `meshd up` takes to open its first
// TCP connection to a peer (through DERP or direct, whichever carries it),
// and from that connection until its status reports the path as direct.
// The figures go to bench/README.md; run with
//
//	go test -v -count=3 -run TestTimingUpToDirect ./internal/e2e
func TestTimingUpToDirect(t *testing.T) {
	t.Parallel()
	lab := netlab.New(t) // skips unless root
	e := &env{t: t, bin: buildMeshd(t), dir: t.TempDir()}
	inet := lab.NewSegment("inet", netip.MustParsePrefix("198.18.0.0/24"))
	srv := lab.NewHost("srv")
	if got := srv.Attach(inet); got.String() != inetAddr {
		t.Fatalf("server host got %v, want %s", got, inetAddr)
	}
	relay := startLabRelay(t, srv)
	key := startLabCoordinator(t, e, srv, relay.derpMap())
	var sites [2]*netlab.Site
	var nodes [2]*node
	for i := range nodes {
		name := fmt.Sprintf("n%d", i+1)
		sites[i] = lab.NewSite("site"+name, inet, netip.MustParsePrefix(fmt.Sprintf("10.%d.0.0/24", i+1)), netlab.EasyNAT)
		h := lab.NewHost(name)
		h.AttachToSite(sites[i])
		nodes[i] = e.newNode(name, h, "--tun", "meshd0")
	}

	// n2 is up and serving before n1 joins, so what is timed is n1's
	// start: its map, its relay connection, the handshake, disco.
	e.startDaemon(nodes[1])
	e.up(nodes[1], key)
	n2 := e.status(nodes[1])
	target := netip.AddrPortFrom(ipv4Of(n2), 5201)
	var ln net.Listener
	if err := nodes[1].host.Do(func() (err error) { ln, err = net.Listen("tcp", target.String()); return }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go serveSHA(ln)

	e.startDaemon(nodes[0])
	// When n2 learns of n1 is logged too: n1 handshakes as soon as it has
	// its map, and a peer that does not know n1 yet would drop that
	// initiation, costing a WireGuard handshake retry (5 s).
	n2Saw := make(chan time.Time, 1)
	watchCtx, stopWatch := context.WithTimeout(context.Background(), timingBound)
	defer stopWatch()
	go func() {
		lc := localapi.NewClient(nodes[1].socket)
		for watchCtx.Err() == nil {
			if st, err := lc.Status(watchCtx); err == nil {
				for _, p := range st.Peers {
					if p.Hostname == "n1" {
						n2Saw <- time.Now()
						return
					}
				}
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	e.up(nodes[0], key)
	upDone := time.Now()
	lc := localapi.NewClient(nodes[0].socket)
	pathAt := func() localapi.Peer {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		st, err := lc.Status(ctx)
		if err != nil {
			t.Fatalf("n1 status: %v", err)
		}
		for _, p := range st.Peers {
			if p.Hostname == "n2" {
				return p
			}
		}
		t.Fatalf("n1 status lacks n2: %+v", st.Peers)
		return localapi.Peer{}
	}
	atUp := pathAt()

	// The first connect: retried while the kernel still refuses it at
	// once (no route or peer yet); a SYN lost on the way is the kernel's
	// to retransmit, which is part of what a user waits for.
	deadline := upDone.Add(timingBound)
	var conn net.Conn
	attempts := 0
	var lastErr error
	for conn == nil {
		if time.Now().After(deadline) {
			t.Fatalf("no TCP connection to %v within %v of meshd up (%d attempts): %v", target, timingBound, attempts, lastErr)
		}
		attempts++
		lastErr = nodes[0].host.Do(func() (err error) {
			d := net.Dialer{Deadline: deadline}
			conn, err = d.Dial("tcp", target.String())
			return
		})
		if lastErr != nil {
			conn = nil
			time.Sleep(20 * time.Millisecond)
		}
	}
	connected := time.Now()
	defer conn.Close()

	atConnect := pathAt()

	var p localapi.Peer
	for p = atConnect; p.Path != "direct"; p = pathAt() {
		if time.Since(connected) > timingBound {
			t.Fatalf("n1's path to n2 still %q (%s) %v after the first connect", p.Path, p.Endpoint, timingBound)
		}
		time.Sleep(10 * time.Millisecond)
	}
	direct := time.Now()
	if ap, err := netip.ParseAddrPort(p.Endpoint); err != nil || ap.Addr() != sites[1].WANAddr {
		t.Errorf("n1's direct endpoint %q, want n2's router %v", p.Endpoint, sites[1].WANAddr)
	}
	t.Logf("meshd up -> first TCP connect: %v (%d dial attempts; n1's path to n2 %q %s when up returned, %q %s at the connect)",
		connected.Sub(upDone).Round(time.Millisecond), attempts, atUp.Path, atUp.Endpoint, atConnect.Path, atConnect.Endpoint)
	select {
	case at := <-n2Saw:
		t.Logf("n2 listed n1 as a peer %v after n1's meshd up returned", at.Sub(upDone).Round(time.Millisecond))
	default:
		t.Logf("n2 had not listed n1 as a peer when the path was direct")
	}
	t.Logf("first TCP connect -> status direct: %v (%s)", direct.Sub(connected).Round(time.Millisecond), p.Endpoint)
}
