package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/proxy"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/agent/whois"
	"meshd.dev/meshd/internal/netlab"
)

// policyServe: alice (a user) and tag:ci reach the web node's served
// ports, tag:ci with an app capability; tag:denied sees the web node (the
// web node may reach it) but no rule lets it in.
const policyServe = `// serve
{
	"groups": {"group:eng": ["alice@example.com"]},
	"tagOwners": {"tag:web": [], "tag:ci": [], "tag:denied": []},
	"grants": [
		{"src": ["group:eng"], "dst": ["tag:web"], "ip": ["tcp:8080", "tcp:2222", "tcp:8443"]},
		{"src": ["tag:ci"], "dst": ["tag:web"], "ip": ["tcp:8080", "tcp:2222"], "app": {"meshd.dev/cap/webapp": [{"role": "deployer"}]}},
		{"src": ["tag:web"], "dst": ["tag:denied"], "ip": ["tcp:9"]},
	],
}
`

// echoRequest is what the backend behind serve saw.
type echoRequest struct {
	Header     http.Header `json:"header"`
	RemoteAddr string      `json:"remote_addr"`
	Host       string      `json:"host"`
}

// headerBackend serves, on ln, a JSON echo of each request's headers. It
// counts the requests.
func headerBackend(t *testing.T, ln net.Listener) *atomic.Int32 {
	hits := new(atomic.Int32)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		json.NewEncoder(w).Encode(echoRequest{Header: r.Header, RemoteAddr: r.RemoteAddr, Host: r.Host})
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return hits
}

// forgedCurlArgs are identity headers a caller forges, in the spellings a
// backend might merge with the real ones.
var forgedCurlArgs = []string{
	"-H", "Meshd-User-Login: mallory@evil.com",
	"-H", "meshd-user-login: mallory2@evil.com",
	"-H", "MESHD-NODE-TAGS: tag:admin",
	"-H", "Meshd_User_Login: mallory3@evil.com",
	"-H", "Meshd-App-Capabilities: {\"meshd.dev/cap/webapp\":[{\"role\":\"root\"}]}",
	"-H", "Tailscale-User-Login: mallory@evil.com",
	"-H", "tailscale-user-name: Mallory",
	"-H", "X-Forwarded-For: 10.6.6.6",
}

// curlJSON runs curl (in host's namespace, or on this machine when host
// is nil) and decodes the echo it prints.
func curlJSON(t *testing.T, host *netlab.Host, args ...string) (echoRequest, error) {
	t.Helper()
	args = append([]string{"-sS", "--fail", "--max-time", "10"}, args...)
	var out []byte
	var err error
	if host != nil {
		var s string
		s, err = host.Run("curl", args...)
		out = []byte(s)
	} else {
		out, err = exec.Command("curl", args...).CombinedOutput()
	}
	if err != nil {
		return echoRequest{}, fmt.Errorf("curl %s: %v: %s", strings.Join(args, " "), err, out)
	}
	var e echoRequest
	if err := json.Unmarshal(out, &e); err != nil {
		return echoRequest{}, fmt.Errorf("curl printed %q: %v", out, err)
	}
	return e, nil
}

// curlCode runs curl in host and returns its exit code (7: could not
// connect, 28: timed out) and the HTTP status it got, if any.
func curlCode(host *netlab.Host, url string) (exit int, status string) {
	cmd := host.Command(context.Background(), "curl", "-sS", "--max-time", "3", "-o", "/dev/null", "-w", "%{http_code}", url)
	out, err := cmd.Output()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		exit = ee.ExitCode()
	case err != nil:
		exit = -1
	}
	return exit, strings.TrimSpace(string(out))
}

// identityHeaders picks the Meshd-* and Tailscale-* headers, by lowercase
// name with "_" read as "-" (what a CGI-style backend sees).
func identityHeaders(h http.Header) map[string][]string {
	out := map[string][]string{}
	for k, v := range h {
		key := strings.ReplaceAll(strings.ToLower(k), "_", "-")
		if strings.HasPrefix(key, "meshd-") || strings.HasPrefix(key, "tailscale-") {
			out[key] = append(out[key], v...)
		}
	}
	return out
}

func checkIdentity(t *testing.T, who string, got echoRequest, want map[string][]string) {
	t.Helper()
	ids := identityHeaders(got.Header)
	for k, v := range want {
		if !slices.Equal(ids[k], v) {
			t.Errorf("%s: backend saw %s = %q, want %q", who, k, ids[k], v)
		}
	}
	for k, v := range ids {
		if _, ok := want[k]; !ok {
			t.Errorf("%s: backend saw %s = %q, which serve does not set", who, k, v)
		}
	}
	if b, _ := json.Marshal(got); strings.Contains(string(b), "mallory") || strings.Contains(string(b), "10.6.6.6") || strings.Contains(string(b), "root") {
		t.Errorf("%s: a forged value reached the backend: %s", who, b)
	}
}

// TestServeKernelTUN: in the namespace lab with kernel TUNs and a policy,
// `meshd serve --http` on the web node proxies real curl requests from
// peers to a backend on the web node's 127.0.0.1 with the callers'
// identity (a user: login and name; a tagged node: tags and the app
// capability from the policy's grant) and none of the forged headers;
// `--tcp` relays a 4 MiB transfer; a peer the policy denies is dropped
// by the packet filter; nothing answers on the underlay address, on
// 127.0.0.1, or on the tailnet address routed over the LAN by a machine
// outside the tailnet; and the configuration survives kill -9.
func TestServeKernelTUN(t *testing.T) {
	t.Parallel()
	lab := netlab.New(t)
	if _, err := exec.LookPath("curl"); err != nil {
		t.Fatal("curl is missing: apt-get install curl")
	}
	e := &env{t: t, bin: buildMeshd(t), dir: t.TempDir()}
	hosts := lanHosts(lab, "coord", "web", "alice", "ci", "denied", "outsider")
	pol := writeTemp(t, "serve.hujson", policyServe)
	e.runCoordinator(hosts["coord"], "198.18.0.1:8443", "// serve", "--policy", pol)
	key := e.key
	nodes := map[string]*node{}
	for name, k := range map[string]string{
		"web":    key("--tags", "tag:web"),
		"alice":  key("--user", "alice@example.com"),
		"ci":     key("--tags", "tag:ci"),
		"denied": key("--tags", "tag:denied"),
	} {
		args := []string{"--tun", "meshd0"}
		if name == "web" {
			// A --forward too: its listener must be as closed to the LAN
			// as serve's (checked with the outsider below).
			args = append(args, "--forward", "9100=127.0.0.1:9")
		}
		n := e.newNode(name, hosts[name], args...)
		nodes[name] = n
		e.startDaemon(n)
		e.up(n, k)
	}
	web := nodes["web"]
	e.waitPeers(web, "alice", "ci", "denied")
	for _, n := range []string{"alice", "ci", "denied"} {
		e.waitPeers(nodes[n], "web")
	}
	ip := map[string]netip.Addr{}
	for name, n := range nodes {
		ip[name] = ipv4Of(e.status(n))
	}
	whoisOf := func(name string) *whois.Response {
		out, err := e.cli(web, "whois", "--json", ip[name].String())
		var r whois.Response
		if err != nil || json.Unmarshal([]byte(out), &r) != nil {
			t.Fatalf("whois %s on web: %v\n%s", name, err, out)
		}
		return &r
	}

	// The backends, on 127.0.0.1 inside the web node's namespace.
	var httpLn, shaLn net.Listener
	if err := hosts["web"].Do(func() (err error) {
		if httpLn, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			return err
		}
		shaLn, err = net.Listen("tcp", "127.0.0.1:0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	hits := headerBackend(t, httpLn)
	defer shaLn.Close()
	go serveSHA(shaLn)

	serveCLI := func(args ...string) (int, string) {
		return runMeshd(t, exec.Command(e.bin, append([]string{"serve", "--socket", web.socket}, args...)...))
	}
	if code, out := serveCLI("--http", "8080", "--to", "http://"+httpLn.Addr().String()); code != 0 {
		t.Fatalf("serve --http: exit %d: %s", code, out)
	}
	if code, out := serveCLI("--tcp", "2222", "--to", shaLn.Addr().String()); code != 0 {
		t.Fatalf("serve --tcp: exit %d: %s", code, out)
	}
	if code, out := serveCLI("--https", "8443", "--to", "http://"+httpLn.Addr().String()); code != 0 {
		t.Fatalf("serve --https: exit %d: %s", code, out)
	}
	// HTTPS by MagicDNS name, verified against the tailnet CA only (no
	// -k): alice's namespace resolves web.meshd.internal through meshd,
	// and alice's daemon hands out the CA it got over the pinned control
	// channel.
	caFile := filepath.Join(e.dir, "alice-tailnet-ca.crt")
	if out, err := e.cli(nodes["alice"], "cert", "--ca-file", caFile); err != nil {
		t.Fatalf("meshd cert --ca-file on alice: %v\n%s", err, out)
	}
	var got echoRequest
	var err error
	waitFor(t, 20*time.Second, "alice fetches https://web.meshd.internal:8443/", func() (bool, string) {
		got, err = curlJSON(t, hosts["alice"], append(slices.Clone(forgedCurlArgs), "--cacert", caFile, "https://web.meshd.internal:8443/")...)
		return err == nil, fmt.Sprint(err)
	})
	if ids := identityHeaders(got.Header); !slices.Equal(ids["meshd-user-login"], []string{"alice@example.com"}) {
		t.Fatalf("https: backend saw identity %q", ids)
	}
	if b, _ := json.Marshal(got); strings.Contains(string(b), "mallory") {
		t.Fatalf("https: a forged header reached the backend: %s", b)
	}
	// The same certificate is refused under another name.
	if out, err := hosts["alice"].Run("curl", "-sS", "--max-time", "10", "--cacert", caFile,
		"--resolve", fmt.Sprintf("evil.meshd.internal:8443:%v", ip["web"]), "https://evil.meshd.internal:8443/"); err == nil {
		t.Fatalf("https under another name succeeded: %s", out)
	}

	url := fmt.Sprintf("http://%v:8080/", ip["web"])
	checkCallers := func(step string) {
		t.Helper()
		var got echoRequest
		var err error
		waitFor(t, 20*time.Second, step+": alice fetches through serve", func() (bool, string) {
			got, err = curlJSON(t, hosts["alice"], append(slices.Clone(forgedCurlArgs), url)...)
			return err == nil, fmt.Sprint(err)
		})
		wa := whoisOf("alice")
		checkIdentity(t, step+": alice", got, map[string][]string{
			"meshd-user-login":       {"alice@example.com"},
			"meshd-user-name":        {"alice"},
			"meshd-node-name":        {strings.TrimSuffix(wa.Node.DNSName, ".")},
			"meshd-node-id":          {fmt.Sprint(wa.Node.ID)},
			"meshd-app-capabilities": {"{}"},
			"tailscale-user-login":   {"alice@example.com"},
			"tailscale-user-name":    {"alice"},
			"tailscale-headers-info": {"https://tailscale.com/s/serve-headers"},
		})
		if xff := got.Header.Values("X-Forwarded-For"); !slices.Equal(xff, []string{ip["alice"].String()}) {
			t.Errorf("%s: X-Forwarded-For %q, want alice's tailnet address only", step, xff)
		}
		if wa.Node.DNSName == "" {
			t.Errorf("%s: alice has no DNS name in whois; Meshd-Node-Name fell back to the hostname", step)
		}

		got, err = curlJSON(t, hosts["ci"], append(slices.Clone(forgedCurlArgs), url)...)
		if err != nil {
			t.Fatalf("%s: ci: %v", step, err)
		}
		wc := whoisOf("ci")
		checkIdentity(t, step+": ci", got, map[string][]string{
			"meshd-node-name":        {strings.TrimSuffix(wc.Node.DNSName, ".")},
			"meshd-node-id":          {fmt.Sprint(wc.Node.ID)},
			"meshd-node-tags":        {"tag:ci"},
			"meshd-app-capabilities": {`{"meshd.dev/cap/webapp":[{"role":"deployer"}]}`},
			"tailscale-headers-info": {"https://tailscale.com/s/serve-headers"},
		})

		// --tcp: 4 MiB each way from ci to the SHA server behind serve.
		var c net.Conn
		if err := hosts["ci"].Do(func() (err error) {
			c, err = net.DialTimeout("tcp", netip.AddrPortFrom(ip["web"], 2222).String(), 10*time.Second)
			return
		}); err != nil {
			t.Fatalf("%s: dial serve --tcp: %v", step, err)
		}
		if err := transfer(c); err != nil {
			t.Fatalf("%s: through serve --tcp: %v", step, err)
		}
	}
	checkCallers("first start")

	// The denied peer sees the web node, but its SYN is dropped by the web
	// node's packet filter: curl times out, and the drop is recorded.
	if st := e.status(nodes["denied"]); !slices.ContainsFunc(st.Peers, func(p localapi.Peer) bool { return p.Hostname == "web" }) {
		t.Fatal("the denied node does not see web: the test would not exercise the filter")
	}
	if code, _ := curlCode(hosts["denied"], url); code != 28 {
		t.Errorf("the denied peer's curl exited %d, want 28 (timed out: SYN dropped)", code)
	}
	waitFor(t, 5*time.Second, "the denied SYN in web's drops", func() (bool, string) {
		out, err := debugDrops(e, web, "--json")
		var d localapi.Drops
		if err != nil || json.Unmarshal([]byte(out), &d) != nil {
			return false, out
		}
		return slices.ContainsFunc(d.Drops, func(r localapi.Drop) bool {
			return r.Reason == "no_rule" && r.Src == ip["denied"] && r.DstPort == 8080
		}), out
	})

	// Only the tailnet address on the TUN: not the underlay address, not
	// 127.0.0.1, not the tailnet address reached through the LAN by a
	// machine outside the tailnet that routes it to the web node (Linux
	// would accept that for a socket merely bound to the address). The
	// node itself reaches the socket through its own tailnet address, but
	// is no peer: 403, and the backend sees nothing.
	underlay := hosts["web"].Addrs()[0].Addr()
	hosts["outsider"].MustRun("ip", "route", "add", ip["web"].String()+"/32", "via", underlay.String())
	for _, c := range []struct {
		what string
		from *netlab.Host
		url  string
	}{
		{"underlay address from the LAN", hosts["outsider"], fmt.Sprintf("http://%v:8080/", underlay)},
		{"tailnet address routed over the LAN", hosts["outsider"], url},
		{"--forward port on the tailnet address routed over the LAN", hosts["outsider"], fmt.Sprintf("http://%v:9100/", ip["web"])},
		{"127.0.0.1 on the web node", hosts["web"], "http://127.0.0.1:8080/"},
		{"underlay address on the web node", hosts["web"], fmt.Sprintf("http://%v:8080/", underlay)},
	} {
		if code, _ := curlCode(c.from, c.url); code != 7 {
			t.Errorf("%s: curl exited %d, want 7 (connection refused)", c.what, code)
		}
	}
	before := hits.Load()
	if code, status := curlCode(hosts["web"], url); code != 0 || status != "403" {
		t.Errorf("the web node to its own served port: curl exit %d, HTTP %q, want 403", code, status)
	}
	if hits.Load() != before {
		t.Error("the backend got the web node's own request")
	}
	var want []string
	for _, a := range e.status(web).Self.IPs {
		want = append(want, netip.AddrPortFrom(a, 8080).String())
	}
	var listening []string
	ss := hosts["web"].MustRun("ss", "-Hltn", "sport", "=", ":8080")
	for _, l := range strings.Split(strings.TrimSpace(ss), "\n") {
		f := strings.Fields(l)
		if len(f) < 4 || !strings.Contains(f[3], "%meshd0:") {
			t.Errorf("web listens on port 8080 at %q, not bound to meshd0:\n%s", l, ss)
			continue
		}
		listening = append(listening, strings.Replace(f[3], "%meshd0", "", 1))
	}
	slices.Sort(want)
	slices.Sort(listening)
	if !slices.Equal(listening, want) {
		t.Errorf("web listens on port 8080 at %q, want its tailnet addresses %q:\n%s", listening, want, ss)
	}

	// kill -9 and restart: the configuration is back, listening.
	web.proc.kill()
	e.startDaemon(web)
	waitFor(t, 20*time.Second, "web serving again", func() (bool, string) {
		out, err := e.cli(web, "serve", "status", "--json")
		var st localapi.ServeStatus
		if err != nil || json.Unmarshal([]byte(out), &st) != nil {
			return false, out
		}
		ok := len(st.Entries) == 3 // http, https, tcp
		for _, en := range st.Entries {
			ok = ok && len(en.Listening) == 2
		}
		return ok, out
	})
	checkCallers("after kill -9")

	// off stops the port; a second off changes nothing and exits 1.
	if code, out := serveCLI("--http", "8080", "off"); code != 0 {
		t.Fatalf("serve --http 8080 off: exit %d: %s", code, out)
	}
	if code, _ := curlCode(hosts["alice"], url); code != 7 {
		t.Errorf("after off: curl exited %d, want 7", code)
	}
	code, out := serveCLI("--http", "8080", "off")
	wantOneLineError(t, "second off", code, out, "tailnet port 8080 is not served")
}

// TestServeUserspace: the same in netstack mode on loopback, with curl
// going through the client node's SOCKS5 proxy: identity headers from a
// tagged caller, forged ones stripped, --tcp relaying, and nothing
// listening on this machine's 127.0.0.1 at the served port.
func TestServeUserspace(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath("curl"); err != nil {
		t.Fatal("curl is missing: apt-get install curl")
	}
	e := &env{t: t, bin: buildMeshd(t), dir: t.TempDir()}
	e.startCoordinator(nil, fmt.Sprintf("127.0.0.1:%d", freePort(t, "tcp")))
	key := e.authKey(nil)

	httpLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	headerBackend(t, httpLn)
	shaLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer shaLn.Close()
	go serveSHA(shaLn)

	socks := fmt.Sprintf("127.0.0.1:%d", freePort(t, "tcp"))
	common := []string{"--tun", "userspace", "--loopback-only", "--port", "0"}
	web := e.newNode("web", nil, common...)
	client := e.newNode("client", nil, append(common, "--socks5-server", socks)...)
	for _, n := range []*node{web, client} {
		e.startDaemon(n)
		e.up(n, key)
	}
	e.waitPeers(web, "client")
	e.waitPeers(client, "web")
	webIP, clientIP := ipv4Of(e.status(web)), ipv4Of(e.status(client))

	httpPort, tcpPort := freePort(t, "tcp"), freePort(t, "tcp")
	for _, args := range [][]string{
		{"--http", fmt.Sprint(httpPort), "--to", fmt.Sprint(httpLn.Addr().(*net.TCPAddr).Port)},
		{"--tcp", fmt.Sprint(tcpPort), "--to", shaLn.Addr().String()},
	} {
		if out, err := e.cli(web, append([]string{"serve"}, args...)...); err != nil {
			t.Fatalf("serve %v: %v\n%s", args, err, out)
		}
	}
	url := fmt.Sprintf("http://%v:%d/", webIP, httpPort)
	var got echoRequest
	waitFor(t, 20*time.Second, "curl through SOCKS5 and serve", func() (bool, string) {
		got, err = curlJSON(t, nil, append(slices.Clone(forgedCurlArgs), "--proxy", "socks5h://"+socks, url)...)
		return err == nil, fmt.Sprint(err)
	})
	out, err := e.cli(web, "whois", "--json", clientIP.String())
	var wc whois.Response
	if err != nil || json.Unmarshal([]byte(out), &wc) != nil {
		t.Fatalf("whois client: %v\n%s", err, out)
	}
	checkIdentity(t, "client", got, map[string][]string{
		"meshd-node-name":        {strings.TrimSuffix(wc.Node.DNSName, ".")},
		"meshd-node-id":          {fmt.Sprint(wc.Node.ID)},
		"meshd-node-tags":        {"tag:e2e"},
		"meshd-app-capabilities": {"{}"},
		"tailscale-headers-info": {"https://tailscale.com/s/serve-headers"},
	})

	d, err := proxy.SOCKS5("tcp", socks, nil, &net.Dialer{Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	c, err := d.Dial("tcp", netip.AddrPortFrom(webIP, uint16(tcpPort)).String())
	if err != nil {
		t.Fatal(err)
	}
	if err := transfer(c); err != nil {
		t.Fatalf("through serve --tcp: %v", err)
	}

	// The netstack listener is not a socket on this machine.
	for _, p := range []int{httpPort, tcpPort} {
		if c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", p), 2*time.Second); err == nil {
			c.Close()
			t.Errorf("something on 127.0.0.1:%d accepts: serve must listen only inside the netstack", p)
		} else if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("127.0.0.1:%d: %v, want connection refused", p, err)
		}
	}
	out, err = e.cli(web, "serve", "status")
	if err != nil || strings.Count(out, "listening on") != 2 {
		t.Fatalf("serve status: %v\n%s", err, out)
	}
}
