package sshserver

import (
	"bufio"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"meshd.dev/meshd/agent/sshrec"
	"meshd.dev/meshd/agent/whois"
	"meshd.dev/meshd/netmap"
)

// TestSessions runs sessions through the server with the x/crypto/ssh
// client, as root (the test needs it to set credentials): environment by
// acceptEnv, exit status, stderr, a PTY with window changes, and the cast
// a recorder gets of it.
func TestSessions(t *testing.T) {
	if os.Getuid() != 0 {
		t.Fatal("TestSessions runs programs as a local user and needs root")
	}
	peer := &whois.Response{Node: whois.Node{ID: 2, Hostname: "alice"}, User: "alice@example.com"}
	who := func(ip netip.Addr) (*whois.Response, bool) { return peer, ip.IsLoopback() }
	// A recorder on loopback.
	castDir := t.TempDir()
	recLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer recLn.Close()
	rec := &sshrec.Recorder{Dir: castDir, WhoIs: func(netip.Addr) (*whois.Response, bool) {
		return &whois.Response{Node: whois.Node{ID: 1, Hostname: "gpu"}}, true
	}, Logger: slog.New(slog.DiscardHandler)}
	go rec.Serve(recLn)

	_, hk, _ := ed25519.GenerateKey(rand.Reader)
	signer, err := ssh.NewSignerFromKey(hk)
	if err != nil {
		t.Fatal(err)
	}
	auth := &fakeAuthorizer{resp: netmap.SSHAuthResponse{
		Action: netmap.SSHAccept, AcceptEnv: []string{"LANG"},
		Recorders: []netip.AddrPort{netip.MustParseAddrPort(recLn.Addr().String())}, EnforceRecorder: true,
		Caller: netmap.SSHCaller{NodeID: 2, Hostname: "alice", User: "alice@example.com"},
	}, ends: make(chan netmap.SSHSessionEnd, 16)}
	var d net.Dialer
	s := New(Options{
		HostKey: signer, WhoIs: who, Logger: slog.New(slog.DiscardHandler), NodeName: func() string { return "gpu" },
		Dial: func(ctx context.Context, ap netip.AddrPort) (net.Conn, error) {
			return d.DialContext(ctx, "tcp", ap.String())
		},
	})
	s.SetAuthorizer(auth)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go s.Serve(ln)
	defer s.CloseConns()

	client, err := ssh.Dial("tcp", ln.Addr().String(), &ssh.ClientConfig{User: "root", HostKeyCallback: ssh.InsecureIgnoreHostKey(), Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()

	// A command: accepted variables only, stdout, stderr, exit status.
	sess, err := client.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	if err := sess.Setenv("LANG", "C.UTF-8"); err != nil {
		t.Errorf("LANG refused: %v", err)
	}
	if err := sess.Setenv("LD_PRELOAD", "/evil.so"); err == nil {
		t.Error("LD_PRELOAD accepted")
	}
	var stderr strings.Builder
	sess.Stderr = &stderr
	out, err := sess.Output("echo $LANG/$LD_PRELOAD/$USER/$LOGNAME; echo oops >&2; exit 3")
	var ee *ssh.ExitError
	if !errors.As(err, &ee) || ee.ExitStatus() != 3 || string(out) != "C.UTF-8//root/root\n" || stderr.String() != "oops\n" {
		t.Fatalf("command: %q, stderr %q, %v", out, stderr.String(), err)
	}
	// Its end is reported to the coordinator.
	select {
	case e := <-auth.ends:
		if e.SessionID == "" || e.Kind != netmap.SSHSessionExec || e.ExitStatus != 3 || e.LocalUser != "root" ||
			e.Caller.NodeID != 2 || !e.Recorded || e.Duration <= 0 {
			t.Fatalf("session end report: %+v", e)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no session end report within 10s")
	}

	// A shell on a PTY follows window changes.
	sess, err = client.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	if err := sess.RequestPty("xterm", 40, 100, ssh.TerminalModes{ssh.ECHO: 0}); err != nil {
		t.Fatal(err)
	}
	stdin, _ := sess.StdinPipe()
	stdout, _ := sess.StdoutPipe()
	if err := sess.Start(`stty size; while read x; do s=$(stty size); echo "$s"; [ "$s" = "50 120" ] && exit 4; done`); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(stdout)
	if l, err := br.ReadString('\n'); err != nil || strings.TrimSpace(l) != "40 100" {
		t.Fatalf("first size %q, %v", l, err)
	}
	if err := sess.WindowChange(50, 120); err != nil {
		t.Fatal(err)
	}
	// The window change is a channel request and stdin is channel data:
	// the SSH library hands them to the server on separate paths, so a
	// newline sent after the change may reach the shell first. Ask again
	// until the new size shows; it must, and only these two sizes may.
	// ECHO off: the newline typed is not echoed, each line is stty's.
	for try := 0; ; try++ {
		stdin.Write([]byte("\n"))
		l, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("size after the change: %v", err)
		}
		if got := strings.TrimSpace(l); got == "50 120" {
			break
		} else if got != "40 100" || try == 1000 {
			t.Fatalf("size after the change %q (try %d)", got, try)
		}
	}
	if err := sess.Wait(); !errors.As(err, &ee) || ee.ExitStatus() != 4 {
		t.Fatalf("pty exit: %v", err)
	}

	// Signals reach the program; its death by one is reported.
	sess, err = client.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	stdout, _ = sess.StdoutPipe()
	if err := sess.Start("echo ready; exec sleep 30"); err != nil {
		t.Fatal(err)
	}
	if l, err := bufio.NewReader(stdout).ReadString('\n'); err != nil || l != "ready\n" {
		t.Fatalf("signal session: %q, %v", l, err)
	}
	if err := sess.Signal(ssh.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := sess.Wait(); !errors.As(err, &ee) || ee.Signal() != "TERM" {
		t.Fatalf("after SIGTERM: %v", err)
	}

	// The sessions are in casts, with the resize.
	var casts []string
	deadline := time.Now().Add(10 * time.Second)
	for {
		files, _ := filepath.Glob(filepath.Join(castDir, "*.cast"))
		casts = casts[:0]
		for _, f := range files {
			b, _ := os.ReadFile(f)
			casts = append(casts, string(b))
		}
		done := 0
		for _, c := range casts {
			if strings.Contains(c, `"m","exit `) {
				done++
			}
		}
		if done == 3 || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	all := strings.Join(casts, "\n")
	for _, want := range []string{`"local_user":"root"`, `"node":"gpu"`, `oops`, `C.UTF-8//root/root`, `"r","120x50"`, `"m","exit 3"`, `"m","exit 4"`, `"sender":{"node_id":1,"hostname":"gpu"}`} {
		if !strings.Contains(all, want) {
			t.Errorf("the casts lack %s:\n%s", want, all)
		}
	}
}
