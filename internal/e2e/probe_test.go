package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestContainerProbes runs the real container entrypoint
// (dist/container/entrypoint.sh) with the real meshd binary on PATH, as the
// image does, and its probes the way Docker's HEALTHCHECK and Kubernetes
// run them: "probe ready" fails before the node runs, with the reason, and
// passes once it does (as does `meshd wait`, the sidecar app's way to
// wait); after `meshd down` ready fails again while "probe live" still
// passes (the daemon answers; restarting it would fix nothing); once the
// daemon is gone live fails too.
func TestContainerProbes(t *testing.T) {
	t.Parallel()
	e := &env{t: t, bin: buildMeshd(t), dir: t.TempDir()}
	e.startCoordinator(nil, fmt.Sprintf("127.0.0.1:%d", freePort(t, "tcp")))
	key := e.authKey(nil)
	script := repoFile(t, "dist/container/entrypoint.sh")
	pathDir := t.TempDir()
	if err := os.Symlink(e.bin, filepath.Join(pathDir, "meshd")); err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(e.dir, "state")
	if err := os.MkdirAll(state, 0o700); err != nil {
		t.Fatal(err)
	}
	env := append(os.Environ(), "PATH="+pathDir+":"+os.Getenv("PATH"), "MESHD_STATE_DIR="+state)
	probe := func(kind string) (int, string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, "sh", script, "probe", kind)
		cmd.Env = env
		out, err := cmd.CombinedOutput()
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode(), string(out)
		} else if err != nil {
			t.Fatalf("probe %s: %v", kind, err)
		}
		return 0, string(out)
	}
	if code, out := probe("ready"); code == 0 || !strings.Contains(out, "no daemon") {
		t.Fatalf("ready before the daemon: exit %d: %s", code, out)
	}
	if code, _ := probe("live"); code == 0 {
		t.Fatal("live before the daemon")
	}
	if code, out := probe("bogus"); code != 64 || !strings.Contains(out, "usage") {
		t.Fatalf("unknown probe: exit %d: %s", code, out)
	}

	cmd := exec.Command("sh", script)
	cmd.Env = append(env, "MESHD_AUTHKEY="+key, "MESHD_COORDINATOR="+e.coordURL, "MESHD_HOSTNAME=sidecar",
		"MESHD_LOOPBACK_ONLY=true", "MESHD_PORT=0")
	p := start(t, "entrypoint", cmd)

	// The app's side: meshd wait returns once the node runs.
	socket := filepath.Join(state, "meshd.sock")
	out, err := exec.Command(e.bin, "wait", "--timeout", "60s", "--socket", socket).CombinedOutput()
	if err != nil {
		t.Fatalf("meshd wait: %v\n%s\nentrypoint:\n%s", err, out, p.out.String())
	}
	for _, kind := range []string{"ready", "live"} {
		if code, out := probe(kind); code != 0 {
			t.Fatalf("%s on a running node: exit %d: %s", kind, code, out)
		}
	}

	if out, err := exec.Command(e.bin, "down", "--socket", socket).CombinedOutput(); err != nil {
		t.Fatalf("meshd down: %v\n%s", err, out)
	}
	if code, out := probe("ready"); code != 1 || !strings.Contains(out, "not running: Stopped") {
		t.Fatalf("ready after down: exit %d: %s", code, out)
	}
	if code, out := probe("live"); code != 0 {
		t.Fatalf("live after down (the daemon still answers): exit %d: %s", code, out)
	}
	p.kill()
	if code, _ := probe("live"); code == 0 {
		t.Fatal("live after the daemon was killed")
	}
}
