package e2e

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/internal/netlab"
	"meshd.dev/meshd/internal/promtest"
)

// policyMetrics lets tag:app reach the GPU node on 5201 and tag:scraper on
// the GPU node's tailnet metrics port 9102, and nothing else.
const policyMetrics = `// metrics lab
{
	"tagOwners": {"tag:gpu": [], "tag:app": [], "tag:scraper": []},
	"grants": [
		{"src": ["tag:app"], "dst": ["tag:gpu"], "ip": ["tcp:5201"]},
		{"src": ["tag:scraper"], "dst": ["tag:gpu"], "ip": ["tcp:9102"]},
	],
}
`

// TestMetrics: in the namespace lab with kernel TUNs, every metrics
// endpoint is scraped with curl and parsed with the Prometheus text
// parser, and the values follow real traffic: a 4 MiB transfer from app to
// gpu shows in gpu's byte counters (total and per peer, by path), its
// filter's accepts, and a connection the policy refuses in its drops; the
// coordinator counts registrations, online nodes, map streams and its
// embedded relay. And the adversarial side: the tailnet metrics port
// answers only the peer the policy lets in (app's connection times out,
// dropped by gpu's filter), with totals only: no per-peer series, no node
// keys, no endpoints; 100.100.100.100 serves the host's own programs and
// refuses a LAN neighbour that routes the address to the node.
func TestMetrics(t *testing.T) {
	t.Parallel()
	lab := netlab.New(t)
	e := &env{t: t, bin: buildMeshd(t), dir: t.TempDir()}
	hosts := lanHosts(lab, "coord", "gpu", "app", "scraper")
	pol := writeTemp(t, "metrics.hujson", policyMetrics)
	e.runCoordinator(hosts["coord"], "198.18.0.1:8443", "metrics lab", "--policy", pol, "--metrics-listen", "198.18.0.1:9101")
	nodes := map[string]*node{}
	for _, name := range []string{"gpu", "app", "scraper"} {
		args := []string{"--tun", "meshd0"}
		if name == "gpu" {
			args = append(args, "--metrics-listen", "127.0.0.1:9100", "--metrics-tailnet-port", "9102")
		}
		n := e.newNode(name, hosts[name], args...)
		nodes[name] = n
		e.startDaemon(n)
		e.up(n, e.key("--tags", "tag:"+name))
	}
	gpu := nodes["gpu"]
	e.waitPeers(gpu, "app", "scraper")
	e.waitPeers(nodes["app"], "gpu")
	e.waitPeers(nodes["scraper"], "gpu")
	gpuIP := ipv4Of(e.status(gpu))

	// curl inside a namespace, as a scraper would run it.
	curl := func(host string, url string, timeout time.Duration) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), timeout+5*time.Second)
		defer cancel()
		out, err := hosts[host].Command(ctx, "curl", "-sS", "--fail", "--max-time", fmt.Sprint(timeout.Seconds()), url).CombinedOutput()
		return string(out), err
	}
	scrape := func(host, url string) (promtest.Families, string) {
		t.Helper()
		out, err := curl(host, url, 10*time.Second)
		if err != nil {
			t.Fatalf("curl %s from %s: %v\n%s", url, host, err, out)
		}
		f, err := promtest.Parse(strings.NewReader(out))
		if err != nil {
			t.Fatalf("%s from %s: %v", url, host, err)
		}
		return f, out
	}
	const local = "http://127.0.0.1:9100/metrics"
	before, _ := scrape("gpu", local)
	rxBefore := before.Sum("meshd_rx_bytes_total")
	accBefore, _ := before.Value("meshd_filter_accepted_packets_total", "direction", "in")

	// 4 MiB from app to gpu through the tunnel.
	var ln net.Listener
	if err := hosts["gpu"].Do(func() (err error) { ln, err = net.Listen("tcp", netip.AddrPortFrom(gpuIP, 5201).String()); return }); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go serveSHA(ln)
	var c net.Conn
	if err := hosts["app"].Do(func() (err error) {
		d := net.Dialer{Timeout: 20 * time.Second}
		c, err = d.Dial("tcp", netip.AddrPortFrom(gpuIP, 5201).String())
		return
	}); err != nil {
		t.Fatal(err)
	}
	if err := transfer(c); err != nil {
		t.Fatal(err)
	}

	after, text := scrape("gpu", local)
	if got := after.Sum("meshd_rx_bytes_total") - rxBefore; got < 4<<20 {
		t.Errorf("gpu received %v WireGuard bytes during a 4 MiB transfer, want >= 4 MiB", got)
	}
	if got := after.Sum("meshd_peer_rx_bytes_total", "peer", "app"); got < 4<<20 {
		t.Errorf("meshd_peer_rx_bytes_total{peer=app} = %v, want >= 4 MiB\n%s", got, text)
	}
	if paths := after.LabelValues("meshd_rx_bytes_total", "path"); strings.Join(paths, ",") != "derp,direct" {
		t.Errorf("paths %v, want derp and direct", paths)
	}
	if acc, _ := after.Value("meshd_filter_accepted_packets_total", "direction", "in"); acc-accBefore < 100 {
		t.Errorf("filter accepted %v inbound packets during the transfer", acc-accBefore)
	}
	if v, _ := after.Value("meshd_node_state", "state", "Running"); v != 1 {
		t.Errorf("meshd_node_state{state=Running} = %v", v)
	}
	if hs := after.Sum("meshd_handshakes_sent_total"); hs < 1 {
		t.Errorf("no handshake messages counted")
	}
	// A kernel TUN runs batches to completion on up to 4 Ps (the device's
	// default; GOMAXPROCS is at most NumCPU): the transfer's batches were
	// decrypted inline.
	inlineIn := after.Sum("meshd_wireguard_batches_total", "direction", "in", "path", "inline") -
		before.Sum("meshd_wireguard_batches_total", "direction", "in", "path", "inline")
	if runtime.NumCPU() <= 4 && inlineIn < 10 {
		t.Errorf("%v inbound batches ran inline during the transfer, want >= 10:\n%s", inlineIn, text)
	}

	// `meshd metrics` prints the same families from the local API.
	out, err := e.cli(gpu, "metrics")
	if err != nil {
		t.Fatalf("meshd metrics: %v\n%s", err, out)
	}
	if f, err := promtest.Parse(strings.NewReader(out)); err != nil || f["meshd_peer_rx_bytes_total"] == nil {
		t.Fatalf("meshd metrics output: %v\n%s", err, out)
	}

	// The host's own programs reach 100.100.100.100.
	if f, _ := scrape("gpu", "http://100.100.100.100/metrics"); f["meshd_peer_rx_bytes_total"] == nil {
		t.Errorf("100.100.100.100/metrics lacks the per-peer series: %s", f)
	}

	// A LAN neighbour that routes 100.100.100.100 to gpu reaches the
	// socket (Linux's weak host model) but gets 403: the handler serves
	// this host's sources only.
	hosts["coord"].MustRun("ip", "route", "add", "100.100.100.100/32", "via", "198.18.0.2")
	if out, err := curl("coord", "http://100.100.100.100/metrics", 5*time.Second); err == nil || !strings.Contains(out, "403") {
		t.Errorf("a LAN neighbour routing 100.100.100.100 to gpu: err %v, want 403:\n%s", err, out)
	}

	// The scraper, allowed by the policy, gets totals and nothing that
	// names another peer, a key or an endpoint.
	tail := fmt.Sprintf("http://%v:9102/metrics", gpuIP)
	f, body := scrape("scraper", tail)
	if f["meshd_rx_bytes_total"] == nil {
		t.Errorf("tailnet metrics lack the totals: %s", f)
	}
	for _, leak := range []string{"meshd_peer_", "peer=", "nodekey:", "discokey:", "198.18.", "app", "go_", "process_"} {
		if strings.Contains(body, leak) {
			t.Errorf("tailnet metrics served to a peer contain %q", leak)
		}
	}
	// app may reach 5201 but not the metrics port: the connection times
	// out (gpu's filter drops the SYN), and the drop is counted.
	dropsBefore, _ := after.Value("meshd_filter_dropped_packets_total", "direction", "in", "reason", "no_rule")
	if out, err := curl("app", tail, 3*time.Second); err == nil {
		t.Fatalf("app, not allowed by the policy, scraped gpu's tailnet metrics:\n%s", out)
	}
	waitFor(t, 10*time.Second, "the refused scrape in gpu's drop counter", func() (bool, string) {
		f, _ := scrape("gpu", local)
		v, _ := f.Value("meshd_filter_dropped_packets_total", "direction", "in", "reason", "no_rule")
		return v > dropsBefore, fmt.Sprintf("no_rule drops %v, before %v", v, dropsBefore)
	})

	// The coordinator, from its own namespace.
	cf, _ := scrape("coord", "http://198.18.0.1:9101/metrics")
	for _, tt := range []struct {
		name   string
		labels []string
		min    float64
	}{
		{"meshd_coordinator_registrations_total", []string{"result", "ok"}, 3},
		{"meshd_coordinator_nodes", []string{"state", "online"}, 3},
		{"meshd_coordinator_map_streams", nil, 3},
		{"meshd_coordinator_change_fanout_seconds", nil, 3},
		{"meshd_derp_clients", nil, 3}, // every node holds its home relay, the embedded one
	} {
		if v, ok := cf.Value(tt.name, tt.labels...); !ok || v < tt.min {
			t.Errorf("coordinator %s%v = %v (present %v), want >= %v", tt.name, tt.labels, v, ok, tt.min)
		}
	}
}
