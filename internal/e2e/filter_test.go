package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/internal/netlab"
)

// policySeed is the seed policy's data-path core: ML engineers reach
// inference servers on every port and the training cluster only on 22 and
// 8080. Nothing allows a tagged node to open a connection to an engineer.
const policySeed = `// seed: engineers -> training on 22 and 8080
{
	"groups": {"group:ml-engineers": ["alice@example.com"]},
	"tagOwners": {
		"tag:inference-server": ["group:ml-engineers"],
		"tag:training-cluster": ["group:ml-engineers"],
	},
	"grants": [
		{"src": ["group:ml-engineers"], "dst": ["tag:inference-server"], "ip": ["*"]},
		{"src": ["group:ml-engineers"], "dst": ["tag:training-cluster"], "ip": ["22", "8080"]},
	],
	"tests": [{"src": "alice@example.com", "accept": ["tag:training-cluster:22", "tag:inference-server:9000"], "deny": ["tag:training-cluster:9000"]}],
}
`

// policyTraining9000 moves the training cluster's second port from 8080 to
// 9000.
const policyTraining9000 = `// training on 22 and 9000
{
	"groups": {"group:ml-engineers": ["alice@example.com"]},
	"tagOwners": {
		"tag:inference-server": ["group:ml-engineers"],
		"tag:training-cluster": ["group:ml-engineers"],
	},
	"grants": [
		{"src": ["group:ml-engineers"], "dst": ["tag:inference-server"], "ip": ["*"]},
		{"src": ["group:ml-engineers"], "dst": ["tag:training-cluster"], "ip": ["22", "9000"]},
	],
	"tests": [{"src": "alice@example.com", "accept": ["tag:training-cluster:9000"], "deny": ["tag:training-cluster:8080"]}],
}
`

// TestFilterEnforced: in the namespace lab with kernel TUNs and the seed
// policy, the training node's filter lets the engineer in on 22 and 8080
// only (a SYN to any other port is dropped: the connect times out, and the
// drop shows in status and `meshd debug drops`), the engineer's own filter
// lets the replies of its connections in but not a connection the
// training node opens, the inference node takes every port, and `meshd
// admin policy set` changes what connects on the next attempt, within a
// second.
func TestFilterEnforced(t *testing.T) {
	t.Parallel()
	lab := netlab.New(t)
	e := &env{t: t, bin: buildMeshd(t), dir: t.TempDir()}
	hosts := lanHosts(lab, "coord", "eng", "inf", "train")
	write := func(name, text string) string { return writeTemp(t, name, text) }
	seed, next := write("seed.hujson", policySeed), write("training-9000.hujson", policyTraining9000)

	e.runCoordinator(hosts["coord"], "198.18.0.1:8443", "engineers -> training", "--policy", seed)
	admin := func(args ...string) (int, string) { return e.admin(hosts["coord"], args...) }
	key := e.key
	nodes := map[string]*node{}
	for name, k := range map[string]string{
		"eng":   key("--user", "alice@example.com"),
		"inf":   key("--tags", "tag:inference-server"),
		"train": key("--tags", "tag:training-cluster"),
	} {
		n := e.newNode(name, hosts[name], "--tun", "meshd0")
		nodes[name] = n
		e.startDaemon(n)
		e.up(n, k)
	}
	eng, train := nodes["eng"], nodes["train"]
	e.waitPeers(eng, "inf", "train")
	e.waitPeers(train, "eng")
	e.waitPeers(nodes["inf"], "eng")
	ip := map[string]netip.Addr{}
	for name, n := range nodes {
		ip[name] = ipv4Of(e.status(n))
	}
	// The seed policy is in force on the training node: two grants' worth
	// of rules, nothing dropped yet.
	if f := e.status(train).Filter; f == nil || f.Rules == 0 || f.DropsIn["no_rule"] != 0 {
		t.Fatalf("training node's filter before any traffic: %+v", f)
	}

	// Servers on the tailnet addresses: the training node listens on the
	// allowed ports and on 9000, which the seed policy does not allow;
	// the engineer listens on 22, which no rule lets anyone reach.
	listenOn := func(host string, port uint16) {
		var ln net.Listener
		if err := hosts[host].Do(func() (err error) {
			ln, err = net.Listen("tcp", netip.AddrPortFrom(ip[host], port).String())
			return
		}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go serveSHA(ln)
	}
	for _, p := range []uint16{22, 8080, 9000} {
		listenOn("train", p)
	}
	listenOn("inf", 9000)
	listenOn("eng", 22)

	dial := func(from, to string, port uint16, timeout time.Duration) (net.Conn, error) {
		var c net.Conn
		err := hosts[from].Do(func() (err error) {
			d := net.Dialer{Timeout: timeout}
			c, err = d.Dial("tcp", netip.AddrPortFrom(ip[to], port).String())
			return
		})
		return c, err
	}
	// mustTransfer connects (retrying while the first WireGuard handshake
	// is under way) and moves 4 MiB each way: the replies come in through
	// the engineer's filter on its own flow's state, as no rule lets the
	// tagged nodes reach it.
	mustTransfer := func(step, from, to string, port uint16) {
		t.Helper()
		var c net.Conn
		var err error
		waitFor(t, 20*time.Second, fmt.Sprintf("%s: %s connects to %s:%d", step, from, to, port), func() (bool, string) {
			c, err = dial(from, to, port, 3*time.Second)
			return err == nil, fmt.Sprint(err)
		})
		if err := transfer(c); err != nil {
			t.Fatalf("%s: %s -> %s:%d: %v", step, from, to, port, err)
		}
	}
	// mustTimeOut checks the SYN is dropped: no connection and no reset
	// (a listener is there, so only the filter can keep it out).
	mustTimeOut := func(step, from, to string, port uint16) {
		t.Helper()
		c, err := dial(from, to, port, 2*time.Second)
		if err == nil {
			c.Close()
			t.Fatalf("%s: %s connected to %s:%d, which the policy does not allow", step, from, to, port)
		}
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			t.Fatalf("%s: %s -> %s:%d failed with %v, want a timeout (a dropped SYN)", step, from, to, port, err)
		}
	}

	mustTransfer("seed", "eng", "train", 22)
	mustTransfer("seed", "eng", "train", 8080)
	mustTransfer("seed", "eng", "inf", 9000)
	mustTimeOut("seed", "eng", "train", 9000)
	mustTimeOut("seed", "train", "eng", 22)

	// The denied SYNs are in the receivers' counters and drop lists.
	for _, c := range []struct {
		n        *node
		from, to string
		port     uint16
	}{{train, "eng", "train", 9000}, {eng, "train", "eng", 22}} {
		f := e.status(c.n).Filter
		if f == nil || f.DropsIn["no_rule"] == 0 {
			t.Fatalf("%s's status after a denied connection: filter %+v", c.n.name, f)
		}
		out, err := debugDrops(e, c.n, "--json")
		if err != nil {
			t.Fatalf("meshd debug drops --json on %s: %v\n%s", c.n.name, err, out)
		}
		var d localapi.Drops
		if err := json.Unmarshal([]byte(out), &d); err != nil {
			t.Fatalf("debug drops --json: %v\n%s", err, out)
		}
		found := false
		for _, r := range d.Drops {
			if r.Dir == "in" && r.Reason == "no_rule" && r.Proto == 6 && r.Src == ip[c.from] && r.Dst == ip[c.to] && r.DstPort == c.port {
				found = true
			}
		}
		if !found {
			t.Fatalf("%s's drops lack the SYN %v -> %v:%d:\n%s", c.n.name, ip[c.from], ip[c.to], c.port, out)
		}
		human, err := debugDrops(e, c.n)
		if want := netip.AddrPortFrom(ip[c.to], c.port).String(); err != nil || !strings.Contains(human, "no_rule") || !strings.Contains(human, want) {
			t.Fatalf("meshd debug drops on %s lacks no_rule and %s: %v\n%s", c.n.name, want, err, human)
		}
	}
	if out, err := e.cli(train, "status"); err != nil || !strings.Contains(out, "filter:") || !strings.Contains(out, "no_rule") {
		t.Fatalf("human status of the training node lacks the drops line: %v\n%s", err, out)
	}
	if f := e.status(eng).Filter; f.DropsIn["malformed"] != 0 || f.DropsOut["malformed"] != 0 {
		t.Fatalf("engineer dropped well-formed traffic as malformed: %+v", f)
	}

	// A connection the engineer keeps open across the change, to show
	// the flow state lives on. 22 stays allowed; the conn is idle.
	kept, err := dial("eng", "train", 22, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer kept.Close()

	// The new policy allows 9000 instead of 8080: the next attempt to 9000
	// connects, within a second of the coordinator accepting the policy.
	code, out := admin("policy", "set", next)
	applied := time.Now()
	if code != 0 {
		t.Fatalf("admin policy set: exit %d: %s", code, out)
	}
	for {
		c, err := dial("eng", "train", 9000, 200*time.Millisecond)
		if err == nil {
			t.Logf("training:9000 connected %v after admin policy set", time.Since(applied).Round(time.Millisecond))
			if err := transfer(c); err != nil {
				t.Fatalf("after the policy change: eng -> train:9000: %v", err)
			}
			break
		}
		if time.Since(applied) > time.Second {
			t.Fatalf("1s after admin policy set, eng -> train:9000 still fails: %v", err)
		}
	}
	mustTimeOut("after the change", "eng", "train", 8080)
	if err := transfer(kept); err != nil {
		t.Fatalf("connection opened before the policy change: %v", err)
	}
	// The 9000 drop from before the change is now explained by the rule
	// that allows it.
	var d localapi.Drops
	out, err = debugDrops(e, train, "--json")
	if err != nil || json.Unmarshal([]byte(out), &d) != nil {
		t.Fatalf("debug drops --json: %v\n%s", err, out)
	}
	explained := false
	for _, r := range d.Drops {
		if r.DstPort == 9000 && r.AllowedNowBy != "" {
			explained = true
		}
		if r.DstPort == 8080 && r.AllowedNowBy != "" {
			t.Fatalf("8080 drop claims a rule allows it now: %+v", r)
		}
	}
	if !explained {
		t.Fatalf("no 9000 drop names the rule that allows it now:\n%s", out)
	}
}

// debugDrops runs `meshd debug drops` against n's daemon.
func debugDrops(e *env, n *node, args ...string) (string, error) {
	out, err := exec.Command(e.bin, append([]string{"debug", "drops", "--socket", n.socket}, args...)...).CombinedOutput()
	return string(out), err
}
