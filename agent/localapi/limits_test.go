package localapi

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestSlowlorisDoesNotBlockOtherClients: one local process that opens
// connection after connection and trickles its requests gets at most the
// per-process cap of connections, each cut within the header or body
// bound, while another local process is served at once. A real server on
// a real socket; the other process is this test binary run again.
func TestSlowlorisDoesNotBlockOtherClients(t *testing.T) {
	const (
		perProcess = 4
		bound      = 3 * time.Second
		slack      = 1500 * time.Millisecond
	)
	sock := filepath.Join(t.TempDir(), "meshd.sock")
	ln, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	lim := DefaultLimits()
	lim.PerSource, lim.HeaderTimeout, lim.BodyTimeout = perProcess, bound, bound
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ServeLimits(ctx, ln, &fakeBackend{}, lim) }()
	defer func() { cancel(); <-done }()

	stop := make(chan struct{})
	defer close(stop)
	trickle := func(c net.Conn, prefix string) {
		fmt.Fprint(c, prefix)
		tick := time.NewTicker(time.Second / 4)
		defer tick.Stop()
		for {
			if _, err := c.Write([]byte("x")); err != nil {
				return
			}
			select {
			case <-stop:
				return
			case <-tick.C:
			}
		}
	}
	start := time.Now()
	var slow []net.Conn
	for i := range perProcess {
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		slow = append(slow, c)
		prefix := "POST /v0/up HTTP/1.1\r\nHost: meshd\r\nContent-Length: 1000\r\n\r\n{" // a body, byte by byte
		if i%2 == 1 {
			prefix = "GET /v0/status HTTP/1.1\r\nX-Slow: " // headers, byte by byte
		}
		go trickle(c, prefix)
	}

	// Over the cap: closed as soon as it is accepted.
	over, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer over.Close()
	if !closedWithin(over, bound/2) {
		t.Errorf("connection %d of one process stayed open; the per-process cap is %d", perProcess+1, perProcess)
	}

	// Another process is served while the slow connections are held.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(self, "-test.run=^TestPeerCredHelper$", "-test.v")
	cmd.Env = append(os.Environ(), "MESHD_TEST_PEERCRED_SOCKET="+sock)
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "RESULT:<nil>") {
		t.Errorf("another process's status request: %v\n%s", err, out)
	}
	if took := time.Since(start); took >= bound {
		t.Errorf("the other process finished %v after the slow connections opened, when they may have been cut already: the check proves nothing", took)
	}

	for i, c := range slow {
		if !closedWithin(c, bound+slack-time.Since(start)) {
			t.Errorf("slow connection %d still open %v after it started; the bound is %v", i, time.Since(start).Round(time.Millisecond), bound)
		}
	}
}

// closedWithin reports whether the server closed c within d (the read ends
// with EOF or a reset, not the timeout), discarding what it sent first.
func closedWithin(c net.Conn, d time.Duration) bool {
	c.SetReadDeadline(time.Now().Add(d))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	return !(errors.As(err, &ne) && ne.Timeout())
}

// TestClientPerCallWithinSourceLimit: a program that makes a client per
// call (the throughput harness polled status that way) stays within the
// daemon's per-source connection limit however many calls it makes: the
// client keeps no connection open after a call.
func TestClientPerCallWithinSourceLimit(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "meshd.sock")
	ln, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	lim := DefaultLimits()
	// Above 1: the daemon closes its side of a finished connection a
	// moment after the client has its answer.
	lim.PerSource = 4
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ServeLimits(ctx, ln, &fakeBackend{}, lim) }()
	defer func() { cancel(); <-done }()
	for i := range 10 * lim.PerSource {
		if _, err := NewClient(sock).Status(ctx); err != nil {
			t.Fatalf("call %d with a new client: %v", i+1, err)
		}
	}
	// One client reused works too.
	c := NewClient(sock)
	for i := range 10 * lim.PerSource {
		if _, err := c.Status(ctx); err != nil {
			t.Fatalf("call %d with one client: %v", i+1, err)
		}
	}
}
