package e2e

import (
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/internal/netlab"
)

// policyAB lets tag:a open connections to tag:b; tag:c is alone.
const policyAB = `// a -> b only
{
	"tagOwners": {"tag:a": [], "tag:b": [], "tag:c": []},
	"grants": [{"src": ["tag:a"], "dst": ["tag:b"], "ip": ["*"]}],
	"tests": [{"src": "tag:a", "accept": ["tag:b:5201"], "deny": ["tag:c:5201"]}],
}
`

// policyAC moves tag:a's access from tag:b to tag:c.
const policyAC = `// a -> c only
{
	"tagOwners": {"tag:a": [], "tag:b": [], "tag:c": []},
	"grants": [{"src": ["tag:a"], "dst": ["tag:c"], "ip": ["*"]}],
	"tests": [{"src": "tag:a", "accept": ["tag:c:5201"], "deny": ["tag:b:5201"]}],
}
`

// TestPolicySetSwitchesConnections: in the namespace lab, `meshd admin
// policy set` turns a working connection off and another on within a
// second, restarting nothing; a rejected policy changes nothing; the
// policy survives a coordinator restart.
func TestPolicySetSwitchesConnections(t *testing.T) {
	t.Parallel()
	lab := netlab.New(t)
	e := &env{t: t, bin: buildMeshd(t), dir: t.TempDir()}
	hosts := lanHosts(lab, "coord", "a", "b", "c")
	write := func(name, text string) string { return writeTemp(t, name, text) }
	ab, ac := write("policy-ab.hujson", policyAB), write("policy-ac.hujson", policyAC)

	// The coordinator starts with --policy.
	listen := "198.18.0.1:8443"
	coordDir := filepath.Join(e.dir, "coordinator")
	startCoord := func(args ...string) {
		t.Helper()
		args = append([]string{"coordinator", "--listen", listen, "--state-dir", coordDir}, args...)
		e.coord = start(t, "coordinator", e.cmd(hosts["coord"], args...))
	}
	startCoord("--policy", ab)
	e.coordURL, e.tokenFile = "https://"+listen, filepath.Join(coordDir, "admin.token")
	admin := func(args ...string) (int, string) {
		cmd := e.cmd(hosts["coord"], append([]string{"admin"}, args...)...)
		cmd.Env = append(os.Environ(), "MESHD_COORDINATOR="+e.coordURL, "MESHD_TOKEN_FILE="+e.tokenFile)
		return runMeshd(t, cmd)
	}
	waitFor(t, 30*time.Second, "coordinator with the policy", func() (bool, string) {
		if e.coord.exited() {
			t.Fatalf("coordinator exited:\n%s", e.coord.out.String())
		}
		code, out := admin("policy", "get")
		return code == 0 && strings.Contains(out, "a -> b only"), out
	})
	keyFor := func(tag string) string {
		code, out := admin("keys", "create", "--reusable", "--tags", tag, "--json")
		var k struct {
			Key string `json:"key"`
		}
		if code != 0 || json.Unmarshal([]byte(out[strings.Index(out, "{"):]), &k) != nil || k.Key == "" {
			t.Fatalf("keys create %s: exit %d: %s", tag, code, out)
		}
		return k.Key
	}

	nodes := map[string]*node{}
	for _, name := range []string{"a", "b", "c"} {
		n := e.newNode(name, hosts[name], "--tun", "meshd0")
		nodes[name] = n
		e.startDaemon(n)
		e.up(n, keyFor("tag:"+name))
	}
	a, b, c := nodes["a"], nodes["b"], nodes["c"]
	peersOf := func(n *node) []string {
		var names []string
		for _, p := range e.status(n).Peers {
			names = append(names, p.Hostname)
		}
		slices.Sort(names)
		return names
	}
	e.waitPeers(a, "b")
	e.waitPeers(b, "a")
	if got := peersOf(a); !slices.Equal(got, []string{"b"}) {
		t.Fatalf("under policy-ab a sees %v, want only b", got)
	}
	if got := peersOf(c); len(got) != 0 {
		t.Fatalf("under policy-ab c sees %v, want nobody", got)
	}

	// A TCP server on b's and c's tailnet addresses.
	ipOf := map[string]netip.Addr{}
	for _, name := range []string{"b", "c"} {
		ip := ipv4Of(e.status(nodes[name]))
		ipOf[name] = ip
		var ln net.Listener
		if err := hosts[name].Do(func() (err error) { ln, err = net.Listen("tcp", netip.AddrPortFrom(ip, 5201).String()); return }); err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go serveSHA(ln)
	}
	dial := func(to string, timeout time.Duration) (net.Conn, error) {
		var conn net.Conn
		err := hosts["a"].Do(func() (err error) {
			d := net.Dialer{Timeout: timeout}
			conn, err = d.Dial("tcp", netip.AddrPortFrom(ipOf[to], 5201).String())
			return
		})
		return conn, err
	}
	mustConnect := func(step, to string) {
		t.Helper()
		var conn net.Conn
		var err error
		waitFor(t, 20*time.Second, step+": a connects to "+to, func() (bool, string) {
			conn, err = dial(to, 5*time.Second)
			return err == nil, fmt.Sprint(err)
		})
		if err := transfer(conn); err != nil {
			t.Fatalf("%s: a -> %s: %v", step, to, err)
		}
	}
	mustNotConnect := func(step, to string) {
		t.Helper()
		if conn, err := dial(to, 2*time.Second); err == nil {
			conn.Close()
			t.Fatalf("%s: a connected to %s, which the policy does not allow it to see", step, to)
		}
	}
	mustConnect("policy-ab", "b")
	mustNotConnect("policy-ab", "c")

	// Switch the policy; nothing restarts.
	code, out := admin("policy", "set", ac)
	applied := time.Now()
	if code != 0 || !strings.Contains(out, "policy-ac.hujson in force") {
		t.Fatalf("admin policy set: exit %d: %s", code, out)
	}
	// Within a second of the coordinator accepting it, both ends know.
	deadline := applied.Add(time.Second)
	for {
		pa, pb, pc := peersOf(a), peersOf(b), peersOf(c)
		if slices.Equal(pa, []string{"c"}) && len(pb) == 0 && slices.Equal(pc, []string{"a"}) {
			t.Logf("policy change visible on a, b and c after %v", time.Since(applied).Round(time.Millisecond))
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("1s after admin policy set: a sees %v (want [c]), b sees %v (want none), c sees %v (want [a])", pa, pb, pc)
		}
		time.Sleep(20 * time.Millisecond)
	}
	mustConnect("policy-ac", "c")
	// Not asserted: the first packets to a new peer wait for path
	// discovery and the WireGuard handshake, which are the agent's.
	t.Logf("a -> c connected and transferred %v after the policy change", time.Since(applied).Round(time.Millisecond))
	mustNotConnect("policy-ac", "b")

	// A rejected policy: exit 1, FILE:LINE:COL, nothing changes.
	bad := write("bad.hujson", "{\n\t\"grants\": [{\"src\": [\"tag:nobody\"], \"dst\": [\"*\"], \"ip\": [\"*\"]}],\n}\n")
	code, out = admin("policy", "set", bad)
	if code != 1 || !strings.Contains(out, "bad.hujson:2:") || !strings.Contains(out, "previous policy stays in force") {
		t.Fatalf("bad policy: exit %d:\n%s", code, out)
	}
	if got := peersOf(a); !slices.Equal(got, []string{"c"}) {
		t.Fatalf("after a rejected policy a sees %v", got)
	}

	// The coordinator restarts without --policy: the one last set is in
	// force, and the nodes come back to the same peer lists.
	e.coord.kill()
	startCoord()
	waitFor(t, 30*time.Second, "restarted coordinator serving policy-ac", func() (bool, string) {
		if e.coord.exited() {
			t.Fatalf("coordinator exited:\n%s", e.coord.out.String())
		}
		code, out := admin("policy", "get")
		return code == 0 && strings.Contains(out, "a -> c only"), out
	})
	waitFor(t, 30*time.Second, "a reconnected under policy-ac", func() (bool, string) {
		st := e.status(a)
		return st.Self.Online && slices.Equal(peersOf(a), []string{"c"}), fmt.Sprint(st.Self.Online, peersOf(a))
	})
	mustConnect("after restart", "c")
}
