package agent

import (
	"os/exec"
	"strings"
	"testing"
)

// TestDaemonDoesNotLinkServer keeps the node daemon free of the
// coordinator: a build of agent/... must not pull in the server, its store,
// the policy compiler or their dependencies (SQLite, huJSON).
func TestDaemonDoesNotLinkServer(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("the go tool is needed to list the daemon's dependencies: %v", err)
	}
	out, err := exec.Command(goBin, "list", "-deps", "meshd.dev/meshd/agent/...").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	forbidden := []string{
		"meshd.dev/meshd/control",
		"meshd.dev/meshd/control/store",
		"meshd.dev/meshd/policy",
		"github.com/tailscale/hujson",
		"modernc.org/sqlite",
	}
	deps := strings.Fields(string(out))
	if len(deps) < 10 {
		t.Fatalf("go list -deps listed only %d packages: %q", len(deps), deps)
	}
	for _, d := range deps {
		for _, f := range forbidden {
			if d == f || strings.HasPrefix(d, f+"/") && f != "meshd.dev/meshd/control" {
				t.Errorf("the daemon links %s (through %s)", d, f)
			}
		}
	}
}
