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
	pg, err := pgtest.Start(context.Background(), 50)
	if errors.Is(err, pgtest.ErrNoPostgres) {
		t.Skipf("skipping: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pg.Close() }) // after the database is dropped
	db := pg.Database(t)
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
	// Replicas with embedded relays cannot relay between each other's
	// nodes: said at start, not left to be found out.
	if out := b.out.String(); !strings.Contains(out, "without --derp-map") {
		t.Errorf("replica B without --derp-map did not warn that embedded relays are not shared:\n%s", out)
	}

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
