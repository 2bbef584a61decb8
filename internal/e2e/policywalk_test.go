package e2e

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// walkPolicy is the README's five-minute policy, spelled as a Tailscale
// user might ("TagOwners", "Grants", "IP"): engineers reach the model API
// on inference servers, nothing else.
const walkPolicy = `{
	"Groups":    {"group:engineers": ["alice@example.com"]},
	"TagOwners": {"tag:inference": ["group:engineers"]},
	"Grants": [
		{"Src": ["group:engineers"], "Dst": ["tag:inference"], "IP": ["tcp:8000"]},
	],
	"Tests": [
		{"Src": "alice@example.com", "Accept": ["tag:inference:8000"], "Deny": ["tag:inference:22"]},
	],
}
`

// walkPolicySSH also opens SSH (line 5).
const walkPolicySSH = `{
	"Groups":    {"group:engineers": ["alice@example.com"]},
	"TagOwners": {"tag:inference": ["group:engineers"]},
	"Grants": [
		{"Src": ["group:engineers"], "Dst": ["tag:inference"], "IP": ["tcp:8000", "tcp:22"]},
	],
}
`

// TestPolicyWalkCurl is the README's walk with the real clients: two
// netstack nodes under a Tailscale-spelled policy, curl through the
// laptop's SOCKS5 proxy reaches the allowed port and times out on the
// denied one, `meshd debug drops` on the server names the drop, `policy
// diff --live` shows what a change opens and what going back would cut,
// and after `admin policy set` the same curl is answered. No root needed.
func TestPolicyWalkCurl(t *testing.T) {
	t.Parallel()
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Fatalf("curl is needed (apt-get install curl): %v", err)
	}
	e := &env{t: t, bin: buildMeshd(t), dir: t.TempDir()}
	pol := filepath.Join(e.dir, "policy.hujson")
	pol2 := filepath.Join(e.dir, "policy2.hujson")
	for f, text := range map[string]string{pol: walkPolicy, pol2: walkPolicySSH} {
		if err := os.WriteFile(f, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	e.runCoordinator(nil, fmt.Sprintf("127.0.0.1:%d", freePort(t, "tcp")), "policy.hujson", "--policy", pol)

	// The two services the server exposes on its tailnet ports 8000 and 22.
	serve := func(name string) net.Listener {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprintf(w, "%s answers\n", name) }),
			ReadHeaderTimeout: 5 * time.Second}
		go srv.Serve(ln)
		t.Cleanup(func() { srv.Close() })
		return ln
	}
	api, ssh := serve("model-api"), serve("ssh-stand-in")
	socks := fmt.Sprintf("127.0.0.1:%d", freePort(t, "tcp"))
	common := []string{"--tun", "userspace", "--loopback-only", "--port", "0"}
	gpu := e.newNode("gpu-1", nil, append(common, "--forward", "8000="+api.Addr().String(), "--forward", "22="+ssh.Addr().String())...)
	laptop := e.newNode("laptop", nil, append(common, "--socks5-server", socks)...)
	e.startDaemon(gpu)
	e.up(gpu, e.key("--tags", "tag:inference"))
	e.startDaemon(laptop)
	e.up(laptop, e.key("--user", "alice@example.com"))
	e.waitPeers(laptop, "gpu-1")
	e.waitPeers(gpu, "laptop")

	get := func(port int, timeout time.Duration) (string, error) {
		out, err := exec.Command(curl, "-sS", "-m", fmt.Sprint(int(timeout.Seconds())), "--socks5-hostname", socks,
			fmt.Sprintf("http://gpu-1:%d/", port)).CombinedOutput()
		return string(out), err
	}
	var out string
	waitFor(t, 20*time.Second, "curl to the allowed port", func() (bool, string) {
		out, err = get(8000, 5*time.Second)
		return err == nil && out == "model-api answers\n", fmt.Sprint(out, err)
	})
	if out, err := get(22, 4*time.Second); err == nil {
		t.Fatalf("curl to the denied port was answered: %q", out)
	}
	dropsOf := func(n *node) (string, error) {
		b, err := exec.Command(e.bin, "debug", "drops", "--socket", n.socket).CombinedOutput()
		return string(b), err
	}
	drops, err := dropsOf(gpu)
	if err != nil || !strings.Contains(drops, "no_rule") || !strings.Contains(drops, ":22 ") {
		t.Fatalf("debug drops on gpu-1: %v\n%s", err, drops)
	}

	live := func(file string) string {
		t.Helper()
		cmd := exec.Command(e.bin, "policy", "diff", "--live", file)
		cmd.Env = append(os.Environ(), "MESHD_COORDINATOR="+e.coordURL, "MESHD_TOKEN_FILE="+e.tokenFile)
		b, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("policy diff --live %s: %v\n%s", filepath.Base(file), err, b)
		}
		return string(b)
	}
	if d := live(pol2); !strings.Contains(d, "+ group:engineers -> tag:inference:22 (tcp)") || !strings.Contains(d, "no access in use-able now is cut: 2 node(s) connected") {
		t.Fatalf("diff --live of the widening:\n%s", d)
	}
	if code, out := e.admin(nil, "policy", "set", pol2); code != 0 {
		t.Fatalf("policy set: exit %d: %s", code, out)
	}
	waitFor(t, 20*time.Second, "curl to the newly allowed port", func() (bool, string) {
		out, err = get(22, 5*time.Second)
		return err == nil && out == "ssh-stand-in answers\n", fmt.Sprint(out, err)
	})
	if drops, _ := dropsOf(gpu); !strings.Contains(drops, "allowed now by policy2.hujson:5") {
		t.Errorf("debug drops after the change does not name the rule now allowing them:\n%s", drops)
	}
	if d := live(pol); !strings.Contains(d, "- group:engineers -> tag:inference:22 (tcp)") ||
		!strings.Contains(d, "laptop (") || !strings.Contains(d, "-> gpu-1 (") || !strings.Contains(d, "tcp:22  [policy2.hujson:5]") {
		t.Fatalf("diff --live of going back does not show the cut:\n%s", d)
	}
}
