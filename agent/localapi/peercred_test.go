package localapi

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestPeerCredHelper is not a test: TestPeerCredRejectsOtherUsers runs the
// test binary as another user with this as the entry point.
func TestPeerCredHelper(t *testing.T) {
	sock := os.Getenv("MESHD_TEST_PEERCRED_SOCKET")
	if sock == "" {
		t.Skip("helper process for TestPeerCredRejectsOtherUsers")
	}
	c := NewClient(sock)
	if os.Getenv("MESHD_TEST_PEERCRED_CALL") == "logs" {
		l, err := c.Logs(context.Background())
		if err == nil {
			fmt.Printf("LOGS:%q\n", l.Lines)
		}
		fmt.Printf("RESULT:%v\n", err)
		return
	}
	if os.Getenv("MESHD_TEST_PEERCRED_CALL") == "cert" {
		p, err := c.CertPair(context.Background(), "")
		if err == nil {
			fmt.Printf("KEY:%q\n", p.KeyPEM)
		}
		fmt.Printf("RESULT:%v\n", err)
		return
	}
	_, err := c.Status(context.Background())
	fmt.Printf("RESULT:%v\n", err)
}

// certBackend holds a node key pair, as the agent does.
type certBackend struct{ fakeBackend }

const testKeyPEM = "-----BEGIN PRIVATE KEY-----\nsecret node key\n-----END PRIVATE KEY-----\n"

func (certBackend) RecentLogs() (*Logs, bool) {
	return &Logs{Lines: []string{"level=INFO msg=\"daemon log line\""}}, true
}

func (certBackend) CertPair(context.Context, string) (*CertPair, error) {
	return &CertPair{Name: "gpu-1.meshd.internal", KeyPEM: testKeyPEM}, nil
}

func (certBackend) TailnetCA(context.Context) (*TailnetCA, error) { return &TailnetCA{}, nil }

// TestPeerCredRejectsOtherUsers opens the socket's mode to everyone and
// checks that the SO_PEERCRED check still turns away another user, for
// status and for the node's TLS private key (/v0/cert) alike: a local
// user who is neither root nor the daemon's user never reads the key.
func TestPeerCredRejectsOtherUsers(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a client as another user")
	}
	// A dir of our own directly under the system temp dir (whose mode is
	// left alone), open to the other user.
	dir, err := os.MkdirTemp("", "meshd-peercred-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "meshd.sock")
	ln, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(sock, 0o666) // a mistaken chmod: the credential check must hold
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, ln, &certBackend{}) }()
	defer func() { cancel(); <-done }()

	// Copy the test binary somewhere the other user can execute it.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "localapi.test")
	src, err := os.Open(self)
	if err != nil {
		t.Fatal(err)
	}
	dst, err := os.OpenFile(bin, os.O_CREATE|os.O_WRONLY, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(dst, src)
	src.Close()
	dst.Close()

	for _, tc := range []struct {
		uid    uint32
		call   string
		wantOK bool
	}{{0, "status", true}, {65534, "status", false}, {0, "cert", true}, {65534, "cert", false}, {0, "logs", true}, {65534, "logs", false}} {
		cmd := exec.Command(bin, "-test.run=^TestPeerCredHelper$", "-test.v")
		cmd.Env = []string{"MESHD_TEST_PEERCRED_SOCKET=" + sock, "MESHD_TEST_PEERCRED_CALL=" + tc.call}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: tc.uid, Gid: tc.uid}}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("uid %d helper: %v\n%s", tc.uid, err, out)
		}
		ok := strings.Contains(string(out), "RESULT:<nil>")
		if !strings.Contains(string(out), "RESULT:") || ok != tc.wantOK {
			t.Fatalf("uid %d %s: allowed=%v, want %v\n%s", tc.uid, tc.call, ok, tc.wantOK, out)
		}
		if gotKey := strings.Contains(string(out), "secret node key"); tc.call == "cert" && gotKey != tc.wantOK {
			t.Fatalf("uid %d: read the key=%v, want %v\n%s", tc.uid, gotKey, tc.wantOK, out)
		}
		if gotLogs := strings.Contains(string(out), "daemon log line"); tc.call == "logs" && gotLogs != tc.wantOK {
			t.Fatalf("uid %d: read the daemon's logs=%v, want %v\n%s", tc.uid, gotLogs, tc.wantOK, out)
		}
	}
}
