package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/internal/netlab"
)

// k8sPolicy: alice (group:eng) and tag:ci get the Kubernetes capability
// on tag:k8s, under Tailscale's name and meshd's; bob reaches the port but
// has no capability.
func k8sPolicy(aliceGroup string) string {
	return `{
	"groups": {"group:eng": ["alice@example.com"]},
	"tagOwners": {"tag:k8s": [], "tag:ci": []},
	"grants": [
		{"src": ["alice@example.com", "bob@example.com", "tag:ci"], "dst": ["tag:k8s"], "ip": ["443"]},
		{"src": ["group:eng"], "dst": ["tag:k8s"], "app": {"tailscale.com/cap/kubernetes": [{"impersonate": {"groups": ["` + aliceGroup + `"]}}]}},
		{"src": ["tag:ci"], "dst": ["tag:k8s"], "app": {"meshd.dev/cap/kubernetes": [{"impersonate": {"groups": ["deployers"]}}]}},
	],
}
`
}

// fakeAPIServer is the smallest Kubernetes API server kubectl works with:
// discovery, a pod list, one pod and its log stream. It records the
// headers of every request.
type fakeAPIServer struct {
	mu   sync.Mutex
	reqs []recordedReq
	// logGate releases the second log line: the test opens it after it
	// has seen kubectl print the first, which proves streaming.
	logGate chan struct{}
	// watchGate likewise releases the second watch event.
	watchGate chan struct{}
}

type recordedReq struct {
	path   string
	user   []string
	groups []string
	auth   []string
	extra  []string // any other Impersonate-* header
}

func (f *fakeAPIServer) since(n int) []recordedReq {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.reqs[n:])
}

func (f *fakeAPIServer) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.reqs)
}

const fakePod = `{"kind":"Pod","apiVersion":"v1","metadata":{"name":"web-1","namespace":"default","resourceVersion":"7"},"spec":{"containers":[{"name":"app","image":"nginx"}]},"status":{"phase":"Running"}}`

func (f *fakeAPIServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	rec := recordedReq{path: r.URL.Path, user: r.Header.Values("Impersonate-User"), groups: r.Header.Values("Impersonate-Group"), auth: r.Header.Values("Authorization")}
	for k := range r.Header {
		if strings.HasPrefix(strings.ToLower(k), "impersonate-") && k != "Impersonate-User" && k != "Impersonate-Group" {
			rec.extra = append(rec.extra, k)
		}
	}
	f.mu.Lock()
	f.reqs = append(f.reqs, rec)
	f.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	switch r.URL.Path {
	case "/api":
		fmt.Fprint(w, `{"kind":"APIVersions","versions":["v1"],"serverAddressByClientCIDRs":[{"clientCIDR":"0.0.0.0/0","serverAddress":"127.0.0.1:6443"}]}`)
	case "/apis":
		fmt.Fprint(w, `{"kind":"APIGroupList","apiVersion":"v1","groups":[]}`)
	case "/api/v1":
		fmt.Fprint(w, `{"kind":"APIResourceList","groupVersion":"v1","resources":[`+
			`{"name":"pods","singularName":"pod","namespaced":true,"kind":"Pod","verbs":["get","list","watch"],"shortNames":["po"]},`+
			`{"name":"pods/log","singularName":"","namespaced":true,"kind":"Pod","verbs":["get"]}]}`)
	case "/api/v1/namespaces/default/pods":
		if v := r.URL.Query().Get("watch"); v == "true" || v == "1" {
			f.watch(w, r)
			return
		}
		fmt.Fprint(w, `{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"7"},"items":[`+fakePod+`]}`)
	case "/api/v1/namespaces/default/pods/web-1":
		fmt.Fprint(w, fakePod)
	case "/api/v1/namespaces/default/pods/web-1/log":
		w.Header().Set("Content-Type", "text/plain")
		fmt.Fprint(w, "log line one\n")
		w.(http.Flusher).Flush()
		select {
		case <-f.logGate:
		case <-r.Context().Done():
			return
		case <-time.After(20 * time.Second):
		}
		fmt.Fprint(w, "log line two\n")
	default:
		w.WriteHeader(http.StatusNotFound)
		fmt.Fprintf(w, `{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404,"message":"%s not found"}`, r.URL.Path)
	}
}

// watch streams two pod events, the second once the test opens watchGate,
// then holds the stream open until the client goes away.
func (f *fakeAPIServer) watch(w http.ResponseWriter, r *http.Request) {
	event := func(name string) {
		fmt.Fprintf(w, `{"type":"ADDED","object":{"kind":"Pod","apiVersion":"v1","metadata":{"name":%q,"namespace":"default","resourceVersion":"8"}}}`+"\n", name)
		w.(http.Flusher).Flush()
	}
	event("web-2")
	select {
	case <-f.watchGate:
	case <-r.Context().Done():
		return
	}
	event("web-3")
	<-r.Context().Done()
}

// TestK8sProxy runs `meshd k8s-proxy` in front of a fake API
// server and drives it with the real kubectl through a kubeconfig from
// `meshd configure kubeconfig`: alice is impersonated in her grant's group,
// a tagged caller as its node name in its grant's group and its tag, a
// forged --as/--as-group/--token never reaches the API server, bob (no
// grant) gets 403 and the API server nothing, a policy change applies
// within a second, and `kubectl logs -f` and `kubectl get pods --watch`
// stream. A second proxy in noauth mode passes kubectl's own --token and
// --as through.
//
// The proxy runs with a kernel TUN and, separately, in the netstack.
func TestK8sProxy(t *testing.T) {
	t.Parallel()
	for _, tun := range []string{"meshd0", "userspace"} {
		t.Run(tun, func(t *testing.T) {
			t.Parallel()
			testK8sProxy(t, tun)
		})
	}
}

func testK8sProxy(t *testing.T, tun string) {
	if _, err := exec.LookPath("kubectl"); err != nil {
		t.Fatalf("kubectl is needed (Debian package kubernetes-client): %v", err)
	}
	lab := netlab.New(t)
	e := &env{t: t, bin: buildMeshd(t), dir: t.TempDir()}
	hosts := lanHosts(lab, "coord", "proxy", "alice", "bob", "ci")

	// The API server beside the proxy, on the proxy host's loopback.
	api := &fakeAPIServer{logGate: make(chan struct{}), watchGate: make(chan struct{})}
	var apiLn net.Listener
	if err := hosts["proxy"].Do(func() (err error) { apiLn, err = net.Listen("tcp", "127.0.0.1:0"); return err }); err != nil {
		t.Fatal(err)
	}
	apiSrv := httptest.NewUnstartedServer(api)
	apiSrv.Listener = apiLn
	apiSrv.StartTLS()
	t.Cleanup(apiSrv.Close)
	work := t.TempDir()
	apiCA := filepath.Join(work, "api-ca.pem")
	tokenFile := filepath.Join(work, "sa-token")
	os.WriteFile(apiCA, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: apiSrv.Certificate().Raw}), 0o644)
	os.WriteFile(tokenFile, []byte("proxy-sa-token\n"), 0o600)

	listen := "198.18.0.1:8443"
	coordDir := filepath.Join(e.dir, "coordinator")
	e.coord = start(t, "coordinator", e.cmd(hosts["coord"], "coordinator", "--listen", listen, "--state-dir", coordDir,
		"--policy", writeTemp(t, "policy.hujson", k8sPolicy("system:masters"))))
	e.coordURL, e.tokenFile = "https://"+listen, filepath.Join(coordDir, "admin.token")
	admin := func(args ...string) (int, string) {
		cmd := e.cmd(hosts["coord"], append([]string{"admin"}, args...)...)
		cmd.Env = append(os.Environ(), "MESHD_COORDINATOR="+e.coordURL, "MESHD_TOKEN_FILE="+e.tokenFile)
		return runMeshd(t, cmd)
	}
	keyFor := func(args ...string) string {
		var out string
		waitFor(t, 30*time.Second, "admin keys create", func() (bool, string) {
			if e.coord.exited() {
				t.Fatalf("coordinator exited:\n%s", e.coord.out.String())
			}
			var code int
			code, out = admin(append([]string{"keys", "create", "--reusable", "--json"}, args...)...)
			return code == 0, out
		})
		var k struct {
			Key string `json:"key"`
		}
		if json.Unmarshal([]byte(out[strings.Index(out, "{"):]), &k) != nil || k.Key == "" {
			t.Fatalf("keys create %v: %s", args, out)
		}
		return k.Key
	}

	// The proxy enrols itself, as in the Deployment: the auth key from
	// the environment, no `meshd up`.
	proxy := e.newNode("proxy", hosts["proxy"])
	proxyArgs := []string{"k8s-proxy", "--state-dir", proxy.stateDir, "--socket", proxy.socket,
		"--tun", tun, "--coordinator", e.coordURL, "--hostname", "proxy",
		"--upstream", apiSrv.URL, "--upstream-ca-file", apiCA, "--upstream-token-file", tokenFile}
	if tun != "userspace" {
		proxyArgs = append(proxyArgs, "--resolv-conf", hosts["proxy"].ResolvConf())
	}
	proxyCmd := e.cmd(hosts["proxy"], proxyArgs...)
	proxyKey := keyFor("--tags", "tag:k8s")
	proxyCmd.Env = append(os.Environ(), "MESHD_AUTHKEY="+proxyKey)
	proxy.proc = start(t, "proxy", proxyCmd)
	waitFor(t, 30*time.Second, "k8s-proxy to come up", func() (bool, string) {
		if proxy.proc.exited() {
			t.Fatalf("k8s-proxy exited:\n%s", proxy.proc.out.String())
		}
		st, err := localapi.NewClient(proxy.socket).Status(context.Background())
		return err == nil && st.BackendState == localapi.StateRunning, fmt.Sprint(err)
	})
	nodes := map[string]*node{}
	for name, key := range map[string]string{
		"alice": keyFor("--user", "alice@example.com"), "bob": keyFor("--user", "bob@example.com"), "ci": keyFor("--tags", "tag:ci"),
	} {
		n := e.newNode(name, hosts[name], "--tun", "meshd0")
		nodes[name] = n
		e.startDaemon(n)
		e.up(n, key)
	}
	e.waitPeers(proxy, "alice", "bob", "ci")

	// Each caller's kubeconfig, as a user would make it.
	kubeconfigs := map[string]string{}
	for name, n := range nodes {
		kc := filepath.Join(work, name+".kubeconfig")
		out, err := exec.Command(e.bin, "configure", "kubeconfig", "--socket", n.socket, "--kubeconfig", kc, "proxy").CombinedOutput()
		if err != nil || !strings.Contains(string(out), "proxy.meshd.internal") {
			t.Fatalf("configure kubeconfig on %s: %v\n%s", name, err, out)
		}
		kubeconfigs[name] = kc
	}
	if out, err := exec.Command(e.bin, "configure", "kubeconfig", "--socket", nodes["alice"].socket, "--kubeconfig", kubeconfigs["alice"], "proxy").CombinedOutput(); exitCode(err) != 1 || !strings.Contains(string(out), "nothing changed") {
		t.Errorf("configure kubeconfig again: %v, want exit 1 saying nothing changed\n%s", err, out)
	}
	kubectl := func(ctx context.Context, who string, args ...string) *exec.Cmd {
		return hosts[who].Command(ctx, "kubectl", append([]string{"--kubeconfig", kubeconfigs[who], "--request-timeout", "20s", "-n", "default"}, args...)...)
	}
	getPods := func(who string, args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		out, err := kubectl(ctx, who, append([]string{"get", "pods", "-o", "name"}, args...)...).CombinedOutput()
		return string(out), err
	}
	// check: every request kubectl made since n reached the API server
	// as user in groups, with the proxy's token and nothing else.
	check := func(who string, n int, user string, groups ...string) {
		t.Helper()
		reqs := api.since(n)
		if len(reqs) == 0 {
			t.Fatalf("%s: the API server got no request", who)
		}
		for _, r := range reqs {
			if !slices.Equal(r.user, []string{user}) || !slices.Equal(r.groups, groups) ||
				!slices.Equal(r.auth, []string{"Bearer proxy-sa-token"}) || len(r.extra) > 0 {
				t.Errorf("%s: %s reached the API server as user %q groups %q auth %q extra %q; want %q %q and the proxy's token",
					who, r.path, r.user, r.groups, r.auth, r.extra, user, groups)
			}
		}
	}

	// alice, through MagicDNS and the tailnet CA (no --insecure anywhere).
	var out string
	var err error
	n := api.count()
	waitFor(t, 20*time.Second, "kubectl get pods as alice", func() (bool, string) {
		n = api.count()
		out, err = getPods("alice")
		return err == nil, fmt.Sprintf("%v: %s", err, out)
	})
	if strings.TrimSpace(out) != "pod/web-1" {
		t.Errorf("kubectl get pods as alice: %q", out)
	}
	check("alice", n, "alice@example.com", "system:masters")

	// Forged identity and credentials from kubectl itself.
	n = api.count()
	out, err = getPods("alice", "--as", "system:admin", "--as-group", "system:masters", "--as-group", "evil", "--as-uid", "0", "--token", "stolen-token")
	if err != nil || strings.TrimSpace(out) != "pod/web-1" {
		t.Errorf("kubectl --as: %v %q", err, out)
	}
	check("alice --as system:admin", n, "alice@example.com", "system:masters")

	// A tagged caller is its node, in its grant's group and its tag.
	n = api.count()
	if out, err := getPods("ci"); err != nil || strings.TrimSpace(out) != "pod/web-1" {
		t.Errorf("kubectl as ci: %v %q", err, out)
	}
	check("ci", n, "ci.meshd.internal", "deployers", "tag:ci")

	// bob reaches the proxy but has no grant: 403, naming the capability,
	// and the API server never hears of it.
	n = api.count()
	out, err = getPods("bob")
	if err == nil || !strings.Contains(out, "Forbidden") || !strings.Contains(out, "cap/kubernetes") {
		t.Errorf("kubectl as bob: %v, want a 403 naming the capability:\n%s", err, out)
	}
	if got := api.since(n); len(got) != 0 {
		t.Errorf("bob's requests reached the API server: %v", got)
	}

	// `kubectl logs -f` streams: the first line is printed before the
	// API server sends the second.
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	n = api.count()
	logs := kubectl(ctx, "alice", "logs", "-f", "web-1")
	stdout, _ := logs.StdoutPipe()
	var stderr syncBuffer
	logs.Stderr = &stderr
	if err := logs.Start(); err != nil {
		t.Fatal(err)
	}
	lines := bufio.NewScanner(stdout)
	if !lines.Scan() || lines.Text() != "log line one" {
		t.Fatalf("kubectl logs -f: first line %q (%v) %s", lines.Text(), lines.Err(), stderr.String())
	}
	close(api.logGate)
	if !lines.Scan() || lines.Text() != "log line two" {
		t.Errorf("kubectl logs -f: second line %q (%v) %s", lines.Text(), lines.Err(), stderr.String())
	}
	io.Copy(io.Discard, stdout)
	if err := logs.Wait(); err != nil {
		t.Errorf("kubectl logs -f: %v %s", err, stderr.String())
	}
	check("alice logs -f", n, "alice@example.com", "system:masters")

	// `kubectl get pods --watch` streams: the list, the first event, and
	// the second once released.
	n = api.count()
	watchCtx, stopWatch := context.WithTimeout(context.Background(), 40*time.Second)
	defer stopWatch()
	watch := kubectl(watchCtx, "alice", "get", "pods", "--watch", "-o", "name")
	wout, _ := watch.StdoutPipe()
	var werr syncBuffer
	watch.Stderr = &werr
	if err := watch.Start(); err != nil {
		t.Fatal(err)
	}
	wlines := bufio.NewScanner(wout)
	for i, want := range []string{"pod/web-1", "pod/web-2", "pod/web-3"} {
		if i == 2 {
			close(api.watchGate)
		}
		if !wlines.Scan() || wlines.Text() != want {
			t.Fatalf("kubectl get pods --watch: line %d %q (%v), want %q; stderr %s", i, wlines.Text(), wlines.Err(), want, werr.String())
		}
	}
	stopWatch()
	watch.Wait()
	check("alice get pods --watch", n, "alice@example.com", "system:masters")

	// A noauth proxy (netstack, beside the first one) passes the caller's
	// own credentials, --as included, and adds nothing of its own.
	noauth := e.newNode("noauth", hosts["proxy"])
	noauthCmd := e.cmd(hosts["proxy"], "k8s-proxy", "--mode", "noauth", "--state-dir", noauth.stateDir, "--socket", noauth.socket,
		"--tun", "userspace", "--port", "0", "--coordinator", e.coordURL, "--hostname", "noauth",
		"--upstream", apiSrv.URL, "--upstream-ca-file", apiCA)
	noauthCmd.Env = append(os.Environ(), "MESHD_AUTHKEY="+proxyKey)
	noauth.proc = start(t, "noauth", noauthCmd)
	e.waitPeers(nodes["alice"], "noauth")
	noauthKC := filepath.Join(work, "alice-noauth.kubeconfig")
	if out, err := exec.Command(e.bin, "configure", "kubeconfig", "--socket", nodes["alice"].socket, "--kubeconfig", noauthKC, "noauth").CombinedOutput(); err != nil {
		t.Fatalf("configure kubeconfig noauth: %v\n%s", err, out)
	}
	waitFor(t, 20*time.Second, "kubectl through the noauth proxy", func() (bool, string) {
		n = api.count()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		out, err := hosts["alice"].Command(ctx, "kubectl", "--kubeconfig", noauthKC, "--request-timeout", "20s", "-n", "default",
			"--token", "alices-own-token", "--as", "someone", "get", "pods", "-o", "name").CombinedOutput()
		return err == nil && strings.TrimSpace(string(out)) == "pod/web-1", fmt.Sprintf("%v: %s", err, out)
	})
	if len(api.since(n)) == 0 {
		t.Errorf("noauth: the API server got no request")
	}
	for _, r := range api.since(n) {
		if !slices.Equal(r.auth, []string{"Bearer alices-own-token"}) || !slices.Equal(r.user, []string{"someone"}) || len(r.groups) != 0 {
			t.Errorf("noauth: %s reached the API server with auth %q user %q groups %q; want the caller's own", r.path, r.auth, r.user, r.groups)
		}
	}

	// A grant change applies within a second.
	if code, out := admin("policy", "set", writeTemp(t, "policy2.hujson", k8sPolicy("viewers"))); code != 0 {
		t.Fatalf("policy set: %s", out)
	}
	applied := time.Now()
	for {
		n = api.count()
		out, err := getPods("alice")
		if reqs := api.since(n); err == nil && len(reqs) > 0 && slices.Equal(reqs[len(reqs)-1].groups, []string{"viewers"}) {
			t.Logf("the new group reached the API server %v after policy set", time.Since(applied).Round(time.Millisecond))
			check("alice after the policy change", n, "alice@example.com", "viewers")
			break
		}
		if time.Since(applied) > time.Second {
			t.Fatalf("1s after policy set, alice is still not in group viewers: %v %s %v", err, out, api.since(n))
		}
	}
	if t.Failed() {
		t.Logf("k8s-proxy log:\n%s", proxy.proc.out.String())
	}
	// The audit trail names the caller and the impersonation.
	if log := proxy.proc.out.String(); !strings.Contains(log, "k8s-proxy: request") || !strings.Contains(log, "impersonate_user=alice@example.com") ||
		!strings.Contains(log, "caller_node=alice.meshd.internal") || !strings.Contains(log, "k8s-proxy: denied") {
		t.Errorf("audit log lines missing:\n%s", log)
	}
}
