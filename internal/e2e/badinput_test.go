package e2e

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"meshd.dev/meshd/agent/localapi"
)

// runMeshd runs the binary to completion and returns its exit code and
// combined output.
func runMeshd(t *testing.T, cmd *exec.Cmd) (int, string) {
	t.Helper()
	out, err := cmd.CombinedOutput()
	// A binary just written can be "busy" for a moment: a child forked
	// by a parallel test may still hold the write descriptor until it
	// execs. Go's own tests retry the same way.
	for i := 0; i < 50 && errors.Is(err, syscall.ETXTBSY); i++ {
		time.Sleep(20 * time.Millisecond)
		retry := exec.Command(cmd.Path, cmd.Args[1:]...)
		retry.Dir, retry.Env, retry.SysProcAttr = cmd.Dir, cmd.Env, cmd.SysProcAttr
		out, err = retry.CombinedOutput()
	}
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode(), string(out)
	}
	if err != nil {
		t.Fatalf("run %v: %v", cmd.Args, err)
	}
	return 0, string(out)
}

// wantOneLineError checks a failed command printed exactly one "meshd:"
// error line containing every one of want.
func wantOneLineError(t *testing.T, what string, code int, out string, want ...string) {
	t.Helper()
	if code == 0 {
		t.Fatalf("%s: exit 0, want failure; output:\n%s", what, out)
	}
	var errLines []string
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if strings.HasPrefix(l, "meshd: ") {
			errLines = append(errLines, l)
		}
	}
	if len(errLines) != 1 {
		t.Fatalf("%s: want one error line, got:\n%s", what, out)
	}
	for _, w := range want {
		if !strings.Contains(errLines[0], w) {
			t.Fatalf("%s: error %q does not mention %q", what, errLines[0], w)
		}
	}
}

func TestBadInput(t *testing.T) {
	t.Parallel()
	e := &env{t: t, bin: buildMeshd(t), dir: t.TempDir()}

	t.Run("no daemon", func(t *testing.T) {
		sock := filepath.Join(e.dir, "nobody-home.sock")
		for _, args := range [][]string{{"up", "--authkey", "k", "--coordinator", "https://127.0.0.1:1"}, {"status"}, {"down"}, {"ip"}} {
			code, out := runMeshd(t, exec.Command(e.bin, append(args, "--socket", sock)...))
			wantOneLineError(t, args[0], code, out, "no daemon at "+sock, "systemctl start meshd", "meshd up --foreground")
		}
	})

	t.Run("state dir is a file", func(t *testing.T) {
		f := filepath.Join(e.dir, "a-file")
		os.WriteFile(f, []byte("x"), 0o600)
		code, out := runMeshd(t, exec.Command(e.bin, "daemon", "--state-dir", f, "--socket", f+".sock", "--tun", "userspace"))
		wantOneLineError(t, "daemon", code, out, "state dir", "--state-dir")
	})

	t.Run("corrupt identity is moved aside", func(t *testing.T) {
		dir := filepath.Join(e.dir, "corrupt")
		os.MkdirAll(dir, 0o700)
		os.WriteFile(filepath.Join(dir, "identity.json"), []byte(`{"machine_key": tru`), 0o600)
		code, out := runMeshd(t, exec.Command(e.bin, "daemon", "--state-dir", dir, "--socket", dir+".sock", "--tun", "userspace"))
		wantOneLineError(t, "daemon", code, out, "corrupt", "moved it to")
		matches, _ := filepath.Glob(filepath.Join(dir, "identity.json.corrupt-*"))
		if len(matches) != 1 {
			t.Fatalf("moved-aside files: %v", matches)
		}
		if b, _ := os.ReadFile(matches[0]); string(b) != `{"machine_key": tru` {
			t.Fatalf("moved-aside content %q", b)
		}
	})

	t.Run("two daemons on one state dir", func(t *testing.T) {
		n := e.newNode("locked", nil, "--tun", "userspace", "--port", "0")
		e.startDaemon(n)
		code, out := runMeshd(t, exec.Command(e.bin, "daemon", "--state-dir", n.stateDir, "--socket", n.socket+"2", "--tun", "userspace", "--port", "0"))
		wantOneLineError(t, "second daemon", code, out, "in use by another meshd")
		code, out = runMeshd(t, exec.Command(e.bin, "daemon", "--state-dir", filepath.Join(e.dir, "other"), "--socket", n.socket, "--tun", "userspace", "--port", "0"))
		wantOneLineError(t, "second daemon on the socket", code, out, "already listening")
	})

	t.Run("tun without privileges", func(t *testing.T) {
		if os.Geteuid() != 0 {
			t.Skip("needs root to run the daemon as another user")
		}
		// A dir of nobody's own (directly under the system temp dir, whose
		// mode is left alone) holds a copy of the binary and the state.
		dir, err := os.MkdirTemp("", "meshd-nobody-")
		if err != nil {
			t.Fatal(err)
		}
		defer os.RemoveAll(dir)
		bin := filepath.Join(dir, "meshd")
		data, err := os.ReadFile(e.bin)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(bin, data, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(dir, 65534, 65534); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(bin, "daemon", "--state-dir", filepath.Join(dir, "s"), "--socket", filepath.Join(dir, "s.sock"), "--tun", "meshd0")
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		code, out := runMeshd(t, cmd)
		wantOneLineError(t, "daemon --tun as nobody", code, out, `create TUN "meshd0"`, "--tun userspace")
	})

	// The rest needs a coordinator and a daemon.
	e.startCoordinator(nil, fmt.Sprintf("127.0.0.1:%d", freePort(t, "tcp")))
	n := e.newNode("bad", nil, "--tun", "userspace", "--port", "0", "--loopback-only")
	e.startDaemon(n)
	up := func(args ...string) (int, string) {
		return runMeshd(t, exec.Command(e.bin, append([]string{"up", "--socket", n.socket}, args...)...))
	}
	code, out := up("--authkey", "mskey-000000000000-aaaa-"+strings.Repeat("0", 64), "--coordinator", e.coordURL)
	wantOneLineError(t, "wrong auth key", code, out, "auth key")
	code, out = up("--authkey", "garbage", "--coordinator", e.coordURL)
	wantOneLineError(t, "malformed auth key", code, out, "auth key")
	key := e.authKey(nil)
	code, out = up("--authkey", key, "--coordinator", fmt.Sprintf("https://127.0.0.1:%d", freePort(t, "tcp")))
	wantOneLineError(t, "unreachable coordinator", code, out, "--coordinator")
	code, out = up("--coordinator", e.coordURL)
	wantOneLineError(t, "no auth key", code, out, "--authkey")
	if st := e.status(n); st.BackendState != localapi.StateNeedsLogin {
		t.Fatalf("after failed ups: %s, want %s", st.BackendState, localapi.StateNeedsLogin)
	}
	if code, out = up("--authkey", key, "--coordinator", e.coordURL, "--hostname", "bad"); code != 0 {
		t.Fatalf("good up: %d\n%s", code, out)
	}
	login, err := os.ReadFile(filepath.Join(n.stateDir, "login.json"))
	if err != nil {
		t.Fatal(err)
	}

	// An impostor coordinator (another key) on the same address: the pin
	// must not match, and nothing is lost.
	n.proc.kill()
	e.coord.kill()
	listen := strings.TrimPrefix(e.coordURL, "https://")
	impostorDir := filepath.Join(e.dir, "impostor")
	impostor := start(t, "impostor", exec.Command(e.bin, "coordinator", "--listen", listen, "--state-dir", impostorDir))
	waitFor(t, 30*time.Second, "impostor coordinator", func() (bool, string) {
		_, err := os.Stat(filepath.Join(impostorDir, "admin.token"))
		return err == nil, fmt.Sprint(err)
	})
	e.startDaemon(n)
	code, out = up()
	wantOneLineError(t, "pin mismatch", code, out, "does not match")
	waitFor(t, 10*time.Second, "status to report the mismatch", func() (bool, string) {
		st := e.status(n)
		return strings.Contains(st.Message, "does not match") && len(st.Self.IPs) == 2, st.Message
	})
	if after, _ := os.ReadFile(filepath.Join(n.stateDir, "login.json")); string(after) != string(login) {
		t.Fatalf("login.json changed after a pin mismatch:\nbefore %s\nafter  %s", login, after)
	}

	// The real coordinator is back: `meshd up` reconnects, no key needed.
	impostor.kill()
	e.startCoordinator(nil, listen)
	if code, out = up(); code != 0 {
		t.Fatalf("up after the real coordinator returned: %d\n%s", code, out)
	}
	waitFor(t, 15*time.Second, "online again", func() (bool, string) {
		st := e.status(n)
		return st.Self.Online && st.Message == "", st.Message
	})
}
