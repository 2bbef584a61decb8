package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/agent/localapi"
)

// lifecyclePolicy: the enrolment tag owns tag:gpu; tag:prod is the admin's.
const lifecyclePolicy = `{
	"tagOwners": {"tag:e2e": [], "tag:gpu": ["tag:e2e"], "tag:prod": []},
	"grants": [{"src": ["tag:e2e", "tag:gpu", "autogroup:member"], "dst": ["tag:e2e", "tag:gpu", "autogroup:member"], "ip": ["*"]}],
}`

// TestTagLifecycleCLI drives a node's identity through the CLI as a user
// would: enrolment on a coordinator that requires approval (`up` says so,
// waits, and returns once an admin approves), re-tagging by `up
// --advertise-tags`, no-op settings refused with one clear error line,
// MESHD_AUTHKEY from the environment ignored with a note, --force-reauth
// with a user's key, and an expired node shown as expired.
func TestTagLifecycleCLI(t *testing.T) {
	t.Parallel()
	e := &env{t: t, bin: buildMeshd(t), dir: t.TempDir()}
	listen := fmt.Sprintf("127.0.0.1:%d", freePort(t, "tcp"))
	pol := writeTemp(t, "lifecycle.hujson", lifecyclePolicy)
	e.runCoordinator(nil, listen, "", "--require-approval", "--policy", pol)
	admin := func(args ...string) (int, string) { return e.admin(nil, args...) }
	key := e.key
	pendingKey := key("--tags", "tag:e2e", "--reusable")
	userKey := key("--user", "alice@example.com", "--preauthorized", "--reusable")

	watcher := e.newNode("watcher", nil, "--tun", "userspace", "--port", "0", "--loopback-only")
	e.startDaemon(watcher)
	e.up(watcher, key("--tags", "tag:e2e", "--preauthorized"))
	n := e.newNode("n", nil, "--tun", "userspace", "--port", "0", "--loopback-only")
	e.startDaemon(n)
	up := func(env []string, args ...string) (int, string) {
		cmd := exec.Command(e.bin, append([]string{"up", "--socket", n.socket}, args...)...)
		cmd.Env = append(os.Environ(), env...)
		return runMeshd(t, cmd)
	}

	// Enrolment waits for an admin.
	upCmd := exec.Command(e.bin, "up", "--socket", n.socket, "--authkey", pendingKey, "--coordinator", e.coordURL, "--hostname", "n")
	pending := start(t, "up (waiting for approval)", upCmd)
	waitFor(t, 30*time.Second, "up to say it waits for approval", func() (bool, string) {
		if pending.exited() {
			t.Fatalf("up exited before approval:\n%s", pending.out.String())
		}
		return strings.Contains(pending.out.String(), "waiting for approval by an admin"), pending.out.String()
	})
	st := e.status(n)
	if st.BackendState != localapi.StateNeedsApproval || st.Self == nil {
		t.Fatalf("status while waiting: %s %+v", st.BackendState, st.Self)
	}
	id := strconv.FormatUint(uint64(st.Self.ID), 10)
	if out, _ := e.cli(n, "status"); !strings.Contains(out, "Waiting for approval by an admin: meshd admin nodes approve "+id) {
		t.Fatalf("status text while waiting:\n%s", out)
	}
	if code, out := admin("nodes", "approve", id); code != 0 {
		t.Fatalf("approve: %d %s", code, out)
	}
	select {
	case <-pending.done:
	case <-time.After(30 * time.Second):
		t.Fatalf("up did not return after the approval:\n%s", pending.out.String())
	}
	if code := upCmd.ProcessState.ExitCode(); code != 0 || !strings.Contains(pending.out.String(), "meshd: running as n") {
		t.Fatalf("up after approval: exit %d\n%s", code, pending.out.String())
	}
	e.waitPeers(watcher, "n")
	before := e.status(n)

	// Re-tag to a tag the enrolment tag owns; peers see it.
	if code, out := up(nil, "--advertise-tags", "tag:gpu"); code != 0 || !strings.Contains(out, "tags tag:gpu") {
		t.Fatalf("up --advertise-tags tag:gpu: exit %d\n%s", code, out)
	}
	waitFor(t, 15*time.Second, "the watcher to see n as tag:gpu", func() (bool, string) {
		for _, p := range e.status(watcher).Peers {
			if p.Hostname == "n" {
				return slices.Equal(p.Tags, []string{"tag:gpu"}), fmt.Sprint(p.Tags)
			}
		}
		return false, "n not a peer"
	})

	// Settings that would change nothing, or may not: one error line each.
	for _, tc := range []struct {
		what string
		args []string
		want []string
	}{
		{"same tags", []string{"--advertise-tags", "tag:gpu"}, []string{"already has the tags tag:gpu"}},
		{"tag not owned", []string{"--advertise-tags", "tag:prod"}, []string{`tag "tag:prod"`, "tagOwners"}},
		{"auth key without --force-reauth", []string{"--authkey", userKey}, []string{"already registered", "--force-reauth"}},
		{"another hostname", []string{"--hostname", "m"}, []string{"does not rename"}},
		{"untag by itself", []string{"--advertise-tags="}, []string{"--force-reauth --authkey USERKEY --advertise-tags="}},
	} {
		code, out := up(nil, tc.args...)
		wantOneLineError(t, tc.what, code, out, tc.want...)
	}
	// The container form: the key in the environment, not needed.
	if code, out := up([]string{"MESHD_AUTHKEY=" + userKey}); code != 0 || !strings.Contains(out, "MESHD_AUTHKEY not used") {
		t.Fatalf("up with MESHD_AUTHKEY: exit %d\n%s", code, out)
	}
	if st := e.status(n); !slices.Equal(st.Self.Tags, []string{"tag:gpu"}) || st.BackendState != localapi.StateRunning {
		t.Fatalf("refused settings changed the node: %s %+v", st.BackendState, st.Self)
	}

	// Back to a user: register again with alice's key, no tags.
	if code, out := up(nil, "--force-reauth", "--authkey", userKey, "--advertise-tags="); code != 0 {
		t.Fatalf("up --force-reauth: exit %d\n%s", code, out)
	}
	st = e.status(n)
	if st.Self.User != "alice@example.com" || len(st.Self.Tags) != 0 || st.Self.ID != before.Self.ID || !slices.Equal(st.Self.IPs, before.Self.IPs) {
		t.Fatalf("after --force-reauth with the user's key: %+v; want alice's, untagged, same id and addresses as %+v", st.Self, before.Self)
	}

	// Expired by the admin: status says so, an auth key brings it back.
	if code, out := admin("nodes", "expire", id); code != 0 {
		t.Fatalf("expire: %d %s", code, out)
	}
	waitFor(t, 30*time.Second, "status to show expired", func() (bool, string) {
		st := e.status(n)
		return st.BackendState == localapi.StateExpired, st.BackendState + ": " + st.Message
	})
	if out, _ := e.cli(n, "status"); !strings.Contains(out, "expired") || strings.Contains(out, "unreachable") {
		t.Fatalf("status text of an expired node:\n%s", out)
	}
	if code, out := up(nil, "--authkey", userKey); code != 0 || !strings.Contains(out, "running as n") {
		t.Fatalf("re-enrol after expiry: exit %d\n%s", code, out)
	}
}
