package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/proxy"

	"meshd.dev/meshd/internal/netlab"
	"meshd.dev/meshd/internal/pgtest"
)

// TestHAReplicaKilled: two coordinators share one PostgreSQL database and
// nodes know both URLs. The replica every node streams from is killed
// (kill -9) while a TCP transfer runs between two nodes: the transfer
// completes (the data plane never depended on the coordinator), every
// node's map stream resumes on the other replica, and a node that joins
// through it reaches them all.
func TestHAReplicaKilled(t *testing.T) {
	t.Parallel()
	db := haDatabase(t)
	e := &env{t: t, bin: buildMeshd(t), dir: t.TempDir()}

	startReplica := func(name string) (*proc, string, string) {
		listen := fmt.Sprintf("127.0.0.1:%d", freePort(t, "tcp"))
		dir := filepath.Join(e.dir, name)
		p := start(t, name, exec.Command(e.bin, "coordinator", "--listen", listen, "--state-dir", dir, "--db", db))
		return p, "https://" + listen, dir
	}
	a, urlA, dirA := startReplica("coordinator-a")
	e.tokenFile = filepath.Join(dirA, "admin.token")
	waitFor(t, 30*time.Second, "replica A to initialise the database", func() (bool, string) {
		if a.exited() {
			t.Fatalf("replica A exited:\n%s", a.out.String())
		}
		_, err := os.Stat(e.tokenFile)
		return err == nil, fmt.Sprint(err)
	})
	b, urlB, _ := startReplica("coordinator-b")
	// A's admin token works on B: the key is created there.
	e.coordURL = urlB
	key := e.authKey(nil)
	if b.exited() {
		t.Fatalf("replica B exited:\n%s", b.out.String())
	}
	// Replicas with embedded relays share them as one region: said at
	// start.
	waitFor(t, 10*time.Second, "replica B to say its relay joins the replicas' region", func() (bool, string) {
		out := b.out.String()
		return strings.Contains(out, "one region with the other replicas' relays"), out
	})

	svc, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close()
	go serveSHA(svc)
	socks := fmt.Sprintf("127.0.0.1:%d", freePort(t, "tcp"))
	common := []string{"--tun", "userspace", "--loopback-only"}
	n1 := e.newNode("n1", nil, append(common, "--port", fmt.Sprint(freePort(t, "udp")), "--socks5-server", socks)...)
	n2 := e.newNode("n2", nil, append(common, "--port", fmt.Sprint(freePort(t, "udp")), "--forward", "8080="+svc.Addr().String())...)
	e.coordURL = urlA + "," + urlB // A first: every node streams from A
	for _, n := range []*node{n1, n2} {
		e.startDaemon(n)
		e.up(n, key)
	}
	e.waitPeers(n1, "n2")
	e.waitPeers(n2, "n1")
	target := netip.AddrPortFrom(ipv4Of(e.status(n2)), 8080).String()

	d, err := proxy.SOCKS5("tcp", socks, nil, &net.Dialer{Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	var c net.Conn
	waitFor(t, 20*time.Second, "SOCKS5 connect to n2", func() (bool, string) {
		c, err = d.Dial("tcp", target)
		return err == nil, fmt.Sprint(err)
	})
	// A transfer paced over ~3 s, with A killed in the middle of it.
	done := make(chan error, 1)
	go func() { done <- pacedTransfer(c, 3*time.Second) }()
	time.Sleep(time.Second)
	a.kill()
	killed := time.Now()
	if err := <-done; err != nil {
		t.Fatalf("transfer across the kill of replica A: %v", err)
	}
	t.Logf("a 4 MiB transfer paced over 3 s completed across the kill of replica A")

	// A node joining through B reaches n1 and n2: their streams are on B.
	n3 := e.newNode("n3", nil, append(common, "--port", fmt.Sprint(freePort(t, "udp")))...)
	e.coordURL = urlB
	e.startDaemon(n3)
	e.up(n3, key)
	e.waitPeers(n1, "n2", "n3")
	e.waitPeers(n2, "n1", "n3")
	t.Logf("n1 and n2 saw n3 (joined through B) %v after A was killed", time.Since(killed).Round(100*time.Millisecond))
	if st := e.status(n1); !st.Self.Online {
		t.Fatalf("n1 after failover: online=%v, message %q", st.Self.Online, st.Message)
	}
}

// pacedTransfer sends the payload over c in chunks spread over d, then
// checks the server's SHA-256 of it.
func pacedTransfer(c net.Conn, d time.Duration) error {
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	data := payload()
	const chunks = 64
	step := len(data) / chunks
	for i := 0; i < len(data); i += step {
		if _, err := c.Write(data[i:min(i+step, len(data))]); err != nil {
			return fmt.Errorf("write at %d: %w", i, err)
		}
		time.Sleep(d / chunks)
	}
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
	got, err := io.ReadAll(c)
	if err != nil {
		return fmt.Errorf("read digest: %w", err)
	}
	if want := sha256.Sum256(data); !bytes.Equal(got, want[:]) {
		return fmt.Errorf("digest mismatch: got %x", got)
	}
	return nil
}

// TestHAEmbeddedRelaysShared: two replicas on one database, each with its
// embedded relay (no --derp-map), and two nodes behind symmetric NATs (no
// direct path), one streaming from each replica. The relay is their only
// path: both use the oldest replica's relay, so traffic flows. When that
// replica is killed, the survivor hands out a map with only its own relay
// and traffic flows through it.
func TestHAEmbeddedRelaysShared(t *testing.T) {
	t.Parallel()
	db := haDatabase(t)

	lab := netlab.New(t)
	e := &env{t: t, bin: buildMeshd(t), dir: t.TempDir()}
	inet := lab.NewSegment("inet", netip.MustParsePrefix("198.18.0.0/24"))
	srv := lab.NewHost("srv")
	srv.Attach(inet)
	startReplica := func(name string, port int) (*proc, string) {
		listen := fmt.Sprintf("%s:%d", inetAddr, port)
		p := start(t, name, srv.Command(context.Background(), e.bin, "coordinator", "--listen", listen,
			"--state-dir", filepath.Join(e.dir, name), "--db", db))
		return p, "https://" + listen
	}
	a, urlA := startReplica("coordinator-a", 8443)
	e.tokenFile = filepath.Join(e.dir, "coordinator-a", "admin.token")
	waitFor(t, 30*time.Second, "replica A to initialise the database", func() (bool, string) {
		if a.exited() {
			t.Fatalf("replica A exited:\n%s", a.out.String())
		}
		_, err := os.Stat(e.tokenFile)
		return err == nil, fmt.Sprint(err)
	})
	b, urlB := startReplica("coordinator-b", 8444)
	e.coordURL = urlB
	key := e.authKey(srv)
	if b.exited() {
		t.Fatalf("replica B exited:\n%s", b.out.String())
	}

	nl := &natLab{e: e, lab: lab}
	for i := range nl.nodes {
		name := fmt.Sprintf("n%d", i+1)
		nl.sites[i] = lab.NewSite("site"+name, inet, netip.MustParsePrefix(fmt.Sprintf("10.%d.0.0/24", i+1)), netlab.HardNAT)
		nl.hosts[i] = lab.NewHost(name)
		nl.hosts[i].AttachToSite(nl.sites[i])
		nl.nodes[i] = e.newNode(name, nl.hosts[i], "--tun", "meshd0")
		e.startDaemon(nl.nodes[i])
		// n1 streams from A, n2 from B.
		e.coordURL = []string{urlA + "," + urlB, urlB + "," + urlA}[i]
		e.up(nl.nodes[i], key)
	}
	e.waitPeers(nl.nodes[0], "n2")
	e.waitPeers(nl.nodes[1], "n1")
	for i := range nl.nodes {
		nl.status[i] = e.status(nl.nodes[i])
	}
	sha := nl.serveSHAOn(1)
	if err := transfer(nl.dialFrom(0, sha)); err != nil {
		t.Fatalf("transfer n1 (on A) -> n2 (on B) through the relay: %v", err)
	}
	for i := range nl.nodes {
		if p := nl.waitPath(i, "derp", 10*time.Second); p.Endpoint != "derp:coord" {
			t.Errorf("%s: peer %+v, want relayed through the replicas' region", nl.nodes[i].name, p)
		}
	}

	a.kill()
	killed := time.Now()
	// B notices A left the database (within 3 s) and sends its map with
	// only B's relay; the nodes move there.
	waitFor(t, 60*time.Second, "a transfer through B's relay after A was killed", func() (bool, string) {
		c, err := net.Conn(nil), error(nil)
		if err = nl.hosts[0].Do(func() (err error) {
			d := net.Dialer{Timeout: 10 * time.Second}
			c, err = d.Dial("tcp", sha.String())
			return
		}); err == nil {
			err = transfer(c)
		}
		return err == nil, fmt.Sprint(err)
	})
	t.Logf("relayed traffic flowed again %v after replica A was killed", time.Since(killed).Round(100*time.Millisecond))
	if out := b.out.String(); !strings.Contains(out, "embedded relay leaves the region") {
		t.Errorf("replica B did not say A's relay left the region:\n%s", out)
	}
}

// haDatabase starts PostgreSQL for the test and returns a fresh
// database's URL; the test is skipped where PostgreSQL is not installed.
func haDatabase(t *testing.T) string {
	t.Helper()
	pg, err := pgtest.Start(context.Background(), 50)
	if errors.Is(err, pgtest.ErrNoPostgres) {
		t.Skipf("skipping: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pg.Close() }) // after the database is dropped
	return pg.Database(t)
}
