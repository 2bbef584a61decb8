package e2e

import (
	"encoding/json"
	"errors"
	"os/exec"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/internal/netlab"
)

// whoisPolicy grants tag:a and alice's devices access to tag:b, with the
// Kubernetes app capability for tag:a.
func whoisPolicy(group string) string {
	return `{
	"tagOwners": {"tag:a": [], "tag:b": []},
	"grants": [
		{"src": ["tag:a", "alice@example.com"], "dst": ["tag:b"], "ip": ["*"]},
		{"src": ["tag:a"], "dst": ["tag:b"], "app": {"tailscale.com/cap/kubernetes": [{"impersonate": {"groups": ["` + group + `"]}}]}},
	],
}
`
}

// whoisAnswer is the `meshd whois --json` contract (DESIGN.md).
type whoisAnswer struct {
	Node struct {
		ID       uint64   `json:"id"`
		Hostname string   `json:"hostname"`
		DNSName  string   `json:"dns_name"`
		IPs      []string `json:"ips"`
		Tags     []string `json:"tags"`
		OS       string   `json:"os"`
	} `json:"node"`
	User         string                       `json:"user"`
	Capabilities map[string][]json.RawMessage `json:"capabilities"`
}

// TestWhoIs: on a tagged server, `meshd whois` names a tagged caller by its
// tags (no user) with the app capabilities its grants give it, a user's
// device by its login, and follows a policy change within a second.
func TestWhoIs(t *testing.T) {
	t.Parallel()
	lab := netlab.New(t)
	e := &env{t: t, bin: buildMeshd(t), dir: t.TempDir()}
	hosts := lanHosts(lab, "coord", "a", "b", "u")
	pol := writeTemp(t, "policy.hujson", whoisPolicy("readers"))

	e.runCoordinator(hosts["coord"], "198.18.0.1:8443", "", "--policy", pol, "--dns-suffix", "fleet.internal")
	admin := func(args ...string) (int, string) { return e.admin(hosts["coord"], args...) }
	keyFor := e.key
	nodes := map[string]*node{}
	for name, key := range map[string]string{
		"a": keyFor("--tags", "tag:a"), "b": keyFor("--tags", "tag:b"), "u": keyFor("--user", "alice@example.com"),
	} {
		n := e.newNode(name, hosts[name], "--tun", "meshd0")
		nodes[name] = n
		e.startDaemon(n)
		e.up(n, key)
	}
	b := nodes["b"]
	e.waitPeers(b, "a", "u")
	ipA, ipU := ipv4Of(e.status(nodes["a"])), ipv4Of(e.status(nodes["u"]))

	whois := func(target string) (whoisAnswer, string, error) {
		out, err := e.cli(b, "whois", "--json", target)
		var w whoisAnswer
		if err == nil {
			err = json.Unmarshal([]byte(out), &w)
		}
		return w, out, err
	}
	w, out, err := whois(ipA.String() + ":443")
	if err != nil {
		t.Fatalf("whois a: %v\n%s", err, out)
	}
	if w.Node.Hostname != "a" || w.Node.DNSName != "a.fleet.internal." || len(w.Node.IPs) != 2 ||
		len(w.Node.Tags) != 1 || w.Node.Tags[0] != "tag:a" || w.User != "" || w.Node.OS != "linux" {
		t.Errorf("whois of tagged a: %s", out)
	}
	caps := w.Capabilities["tailscale.com/cap/kubernetes"]
	if len(caps) != 1 || !strings.Contains(string(caps[0]), `"readers"`) {
		t.Errorf("whois of a: kubernetes capability %s, want the policy's value", out)
	}
	w, out, err = whois(ipU.String())
	if err != nil || w.User != "alice@example.com" || len(w.Node.Tags) != 0 || len(w.Capabilities) != 0 {
		t.Errorf("whois of alice's device: %v\n%s", err, out)
	}
	// Human output names the node and the user.
	if out, err := e.cli(b, "whois", ipU.String()); err != nil || !strings.Contains(out, "u.fleet.internal") || !strings.Contains(out, "alice@example.com") {
		t.Errorf("whois (text): %v\n%s", err, out)
	}
	// An address no node holds: exit 1 saying so; garbage: exit 2.
	if out, err := e.cli(b, "whois", "100.64.250.250"); exitCode(err) != 1 || !strings.Contains(out, "no node") {
		t.Errorf("whois of an unknown address: %v\n%s", err, out)
	}
	if out, err := e.cli(b, "whois", "not-an-ip"); exitCode(err) != 2 {
		t.Errorf("whois of garbage: %v\n%s", err, out)
	}

	// A policy change reaches whois within a second.
	code, out := admin("policy", "set", writeTemp(t, "policy2.hujson", whoisPolicy("writers")))
	applied := time.Now()
	if code != 0 {
		t.Fatalf("policy set: %s", out)
	}
	for {
		w, out, err = whois(ipA.String())
		if err == nil && len(w.Capabilities["tailscale.com/cap/kubernetes"]) == 1 &&
			strings.Contains(string(w.Capabilities["tailscale.com/cap/kubernetes"][0]), `"writers"`) {
			t.Logf("whois answer changed %v after policy set", time.Since(applied).Round(time.Millisecond))
			break
		}
		if time.Since(applied) > time.Second {
			t.Fatalf("1s after policy set, whois of a still says: %v\n%s", err, out)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// exitCode is a command's exit status (0 when err is nil, -1 when it did
// not run).
func exitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}
