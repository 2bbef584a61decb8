package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/control"
	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/derp"
	"meshd.dev/meshd/nat/stun"
	"meshd.dev/meshd/netmap"
)

// coordRun is a `meshd coordinator` running in-process.
type coordRun struct {
	url, dir, fingerprint string
	out                   []string // start-up output, up to the relay line
}

// startCoordinatorArgs runs `meshd coordinator --listen 127.0.0.1:0
// --state-dir DIR args...` until the test ends.
func startCoordinatorArgs(t *testing.T, args ...string) *coordRun {
	t.Helper()
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	done := make(chan int, 1)
	var stderr bytes.Buffer
	go func() {
		done <- run(ctx, append([]string{"coordinator", "--listen", "127.0.0.1:0", "--state-dir", dir}, args...), pw, &stderr)
		pw.Close()
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case code := <-done:
			if code != 0 {
				t.Errorf("coordinator exited %d after cancel", code)
			}
		case <-time.After(10 * time.Second):
			t.Error("coordinator did not stop")
		}
	})
	cr := &coordRun{dir: dir}
	sc := bufio.NewScanner(pr)
	for sc.Scan() {
		cr.out = append(cr.out, sc.Text())
		if strings.HasPrefix(sc.Text(), "derp: ") {
			break
		}
	}
	go io.Copy(io.Discard, pr)
	if len(cr.out) == 0 || !strings.HasPrefix(cr.out[len(cr.out)-1], "derp: ") {
		cancel()
		t.Fatalf("coordinator start-up output %q, exit %d, stderr %q", cr.out, <-done, stderr.String())
	}
	cr.url, _ = strings.CutPrefix(cr.out[0], "coordinator listening on ")
	cr.fingerprint, _ = strings.CutPrefix(cr.out[1], "fingerprint: ")
	return cr
}

func (cr *coordRun) has(line string) bool {
	for _, l := range cr.out {
		if strings.HasPrefix(l, line) {
			return true
		}
	}
	return false
}

// register enrols a new node with a fresh tagged auth key and returns its
// node key and first network map.
func (cr *coordRun) register(t *testing.T) (netmap.NodePrivate, *netmap.NetworkMap) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	tok, err := os.ReadFile(filepath.Join(cr.dir, "admin.token"))
	if err != nil {
		t.Fatal(err)
	}
	ac, err := control.NewAdminClient(cr.url, string(tok))
	if err != nil {
		t.Fatal(err)
	}
	key, err := ac.CreateAuthKey(ctx, control.AuthKeyOptions{Tags: []string{"tag:gpu"}})
	if err != nil {
		t.Fatal(err)
	}
	_, mk, _ := ed25519.GenerateKey(rand.Reader)
	nk := netmap.NewNodePrivate()
	c, err := controlclient.NewClient(controlclient.ClientOptions{URL: cr.url, MachineKey: mk, NodeKey: nk})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	dk := netmap.NewDiscoPrivate()
	if _, err := c.Register(ctx, netmap.RegisterRequest{NodeKey: nk.Public(), DiscoKey: dk.Public(), Hostname: "gpu", AuthKey: key.Key}); err != nil {
		t.Fatal(err)
	}
	maps := make(chan *netmap.NetworkMap, 1)
	fctx, fcancel := context.WithCancel(ctx)
	defer fcancel()
	go c.Follow(fctx, netmap.MapRequest{NodeKey: nk.Public(), DiscoKey: dk.Public()}, func(nm *netmap.NetworkMap) {
		select {
		case maps <- nm:
		default:
		}
	})
	select {
	case nm := <-maps:
		return nk, nm
	case <-ctx.Done():
		t.Fatal("no network map")
		return nk, nil
	}
}

func dialDERPNode(t *testing.T, n netmap.DERPNode, k netmap.NodePrivate) (*derp.Client, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	url := "https://" + net.JoinHostPort(n.Host, itoa(n.DERPPort))
	c, err := derp.Dial(ctx, url, derp.ClientOptions{NodeKey: k, CertFingerprint: n.CertFingerprint})
	if err == nil {
		t.Cleanup(func() { c.Close() })
	}
	return c, err
}

// relayWorks sends a packet from a to b through the relay node n.
func relayWorks(t *testing.T, n netmap.DERPNode, a, b netmap.NodePrivate) {
	t.Helper()
	ca, err := dialDERPNode(t, n, a)
	if err != nil {
		t.Fatalf("registered node refused: %v", err)
	}
	cb, err := dialDERPNode(t, n, b)
	if err != nil {
		t.Fatalf("registered node refused: %v", err)
	}
	if err := ca.Send(b.Public(), []byte("hello b")); err != nil {
		t.Fatal(err)
	}
	for {
		m, err := cb.Recv()
		if err != nil {
			t.Fatalf("b: %v", err)
		}
		if p, ok := m.(derp.ReceivedPacket); ok {
			if p.Source != a.Public() || string(p.Data) != "hello b" {
				t.Fatalf("b got %q from %v", p.Data, p.Source)
			}
			return
		}
	}
}

func wantRelayRefused(t *testing.T, err error) {
	t.Helper()
	if err == nil || !strings.Contains(err.Error(), "not registered with the coordinator") {
		t.Fatalf("unknown node: %v, want refusal", err)
	}
}

// TestCoordinatorEmbeddedDERP: with no flags at all, one coordinator is
// relay and STUN server too, and its map says so.
func TestCoordinatorEmbeddedDERP(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"on the coordinator listener", nil},
		{"separate relay port", []string{"--derp-listen", "127.0.0.1:0", "--stun-listen", "127.0.0.1:0"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cr := startCoordinatorArgs(t, tc.args...)
			if !cr.has("derp: embedded relay on https://127.0.0.1:") || !cr.has("relay token: "+filepath.Join(cr.dir, "relay.token")) {
				t.Fatalf("start-up output %q", cr.out)
			}
			a, nm := cr.register(t)
			b, _ := cr.register(t)
			if len(nm.DERPMap.Regions) != 1 || len(nm.DERPMap.Regions[0].Nodes) != 1 {
				t.Fatalf("DERP map %+v", nm.DERPMap)
			}
			n := nm.DERPMap.Regions[0].Nodes[0]
			coordPort := cr.url[strings.LastIndex(cr.url, ":")+1:]
			if n.Host != "127.0.0.1" || n.CertFingerprint != cr.fingerprint || n.STUNPort <= 0 {
				t.Fatalf("DERP node %+v (coordinator %s, %s)", n, cr.url, cr.fingerprint)
			}
			if onListener := itoa(n.DERPPort) == coordPort; onListener != (tc.args == nil) {
				t.Fatalf("relay port %d, coordinator %s", n.DERPPort, cr.url)
			}
			relayWorks(t, n, a, b)
			_, err := dialDERPNode(t, n, netmap.NewNodePrivate())
			wantRelayRefused(t, err)

			// The embedded STUN server answers on the advertised port.
			pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer pc.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			mapped, _, err := stun.Request(ctx, pc, netip.MustParseAddrPort("127.0.0.1:"+itoa(n.STUNPort)))
			if err != nil || mapped != pc.LocalAddr().(*net.UDPAddr).AddrPort() {
				t.Fatalf("STUN: %v %v", mapped, err)
			}
		})
	}
}

func TestCoordinatorDERPMapFlag(t *testing.T) {
	dir := t.TempDir()
	good := writeFile(t, dir, "good.hujson", `{
  // the lab relay
  "regions": [{"id": 7, "code": "lab", "nodes": [
    {"name": "7a", "host": "198.18.1.2", "derp_port": 443, "stun_port": 3478},
  ]}],
}`)
	cr := startCoordinatorArgs(t, "--derp-map", good)
	if !cr.has("derp: map from " + good + " (1 regions)") {
		t.Fatalf("start-up output %q", cr.out)
	}
	if cr.has("derp: embedded relay") {
		t.Fatal("embedded relay started although a map was given")
	}
	_, nm := cr.register(t)
	want := netmap.DERPMap{Regions: []netmap.DERPRegion{{ID: 7, Code: "lab", Nodes: []netmap.DERPNode{{Name: "7a", Host: "198.18.1.2", DERPPort: 443, STUNPort: 3478}}}}}
	if got, _ := json.Marshal(nm.DERPMap); string(got) != string(must(json.Marshal(want))) {
		t.Fatalf("map %s", got)
	}

	bad := writeFile(t, dir, "bad.hujson", "{\"regions\": [\n  {\"id\": 1, \"code\": \"lab\", \"nodes\": [{\"name\": \"1a\", \"host\": \"h\", \"derp_prot\": 443}]}]}")
	for _, tc := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"bad map", []string{"--derp-map", bad}, 2, bad + `:2:66: region 1 node 1: unknown field "derp_prot"`},
		{"missing map", []string{"--derp-map", filepath.Join(dir, "nope")}, 2, "no such file"},
		{"map and embedded relay", []string{"--derp-map", good, "--derp-listen", ":0"}, 2, "--derp-listen configures the embedded relay, which --derp-map replaces"},
		{"wildcard listen without host", []string{"--listen", "0.0.0.0:0"}, 1, "pass --derp-host HOST"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stderr bytes.Buffer
			args := append([]string{"coordinator", "--listen", "127.0.0.1:0", "--state-dir", t.TempDir()}, tc.args...)
			code := run(context.Background(), args, io.Discard, &stderr)
			if code != tc.code || !strings.Contains(stderr.String(), tc.want) {
				t.Fatalf("exit %d, stderr %q; want %d and %q", code, stderr.String(), tc.code, tc.want)
			}
		})
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// TestDERPCommandCoordinatorVerify: a standalone relay with --coordinator
// serves the coordinator's nodes and nobody else.
func TestDERPCommandCoordinatorVerify(t *testing.T) {
	cr := startCoordinatorArgs(t, "--stun-listen", "off")
	tokFile := filepath.Join(cr.dir, "relay.token")
	node, _ := startDERP(t, "--listen", "127.0.0.1:0", "--stun-listen", "", "--coordinator", cr.url, "--coordinator-token-file", tokFile)
	a, nm := cr.register(t)
	if n := nm.DERPMap.Regions[0].Nodes[0]; n.STUNPort != -1 || !cr.has("derp: embedded relay") || !strings.HasSuffix(cr.out[len(cr.out)-1], "STUN off") {
		t.Errorf("--stun-listen off: map node %+v, output %q", n, cr.out)
	}
	b, _ := cr.register(t)
	relayWorks(t, node, a, b)
	_, err := dialDERPNode(t, node, netmap.NewNodePrivate())
	wantRelayRefused(t, err)

	// A wrong token: the relay runs but can admit nobody, and says why.
	wrong := writeFile(t, t.TempDir(), "relay.token", "msrly-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA-"+cr.fingerprint)
	node2, _ := startDERP(t, "--listen", "127.0.0.1:0", "--stun-listen", "", "--coordinator", cr.url, "--coordinator-token-file", wrong)
	_, err = dialDERPNode(t, node2, a)
	if err == nil || !strings.Contains(err.Error(), "relay token missing or wrong") {
		t.Fatalf("relay with a wrong token: %v", err)
	}

	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--coordinator", cr.url}, "--coordinator needs --coordinator-token-file"},
		{[]string{"--coordinator-token-file", tokFile}, "--coordinator-token-file needs --coordinator"},
		{[]string{"--coordinator", cr.url, "--coordinator-token-file", filepath.Join(cr.dir, "admin.token")}, "relay token is malformed"},
	} {
		var stderr bytes.Buffer
		code := run(context.Background(), append([]string{"derp", "--listen", "127.0.0.1:0", "--stun-listen", ""}, tc.args...), io.Discard, &stderr)
		if code != 2 || !strings.Contains(stderr.String(), tc.want) {
			t.Errorf("%q: exit %d %q, want 2 and %q", tc.args, code, stderr.String(), tc.want)
		}
	}
}

// TestAdminNodeDeleteDropsRelayConnections: `meshd admin nodes delete`
// closes the node's connections to the coordinator's embedded relay and to
// a standalone `meshd derp --coordinator` at once, and both refuse it
// afterwards, while another node stays connected.
func TestAdminNodeDeleteDropsRelayConnections(t *testing.T) {
	cr := startCoordinatorArgs(t, "--stun-listen", "off")
	standalone, _ := startDERP(t, "--listen", "127.0.0.1:0", "--stun-listen", "", "--coordinator", cr.url, "--coordinator-token-file", filepath.Join(cr.dir, "relay.token"))
	a, nm := cr.register(t)
	b, _ := cr.register(t)
	embedded := nm.DERPMap.Regions[0].Nodes[0]

	type conn struct {
		what string
		done chan error
	}
	var aConns, bConns []conn
	for _, relay := range []struct {
		what string
		node netmap.DERPNode
	}{{"embedded relay", embedded}, {"standalone relay", standalone}} {
		for _, n := range []struct {
			k     netmap.NodePrivate
			conns *[]conn
		}{{a, &aConns}, {b, &bConns}} {
			c, err := dialDERPNode(t, relay.node, n.k)
			if err != nil {
				t.Fatalf("%s: %v", relay.what, err)
			}
			done := make(chan error, 1)
			go func() {
				for {
					if _, err := c.Recv(); err != nil {
						done <- err
						return
					}
				}
			}()
			*n.conns = append(*n.conns, conn{relay.what, done})
		}
	}

	var stdout, stderr bytes.Buffer
	code := run(context.Background(), []string{"admin", "nodes", "delete", "--coordinator", cr.url,
		"--token-file", filepath.Join(cr.dir, "admin.token"), itoa(int(nm.Self.ID))}, &stdout, &stderr)
	if code != 0 {
		t.Fatalf("admin nodes delete: exit %d, %s", code, stderr.String())
	}
	deadline := time.After(5 * time.Second)
	for _, c := range aConns {
		select {
		case <-c.done:
		case <-deadline:
			t.Fatalf("%s: deleted node still connected 5s after the delete", c.what)
		}
	}
	for _, n := range []netmap.DERPNode{embedded, standalone} {
		_, err := dialDERPNode(t, n, a)
		wantRelayRefused(t, err)
	}
	for _, c := range bConns {
		select {
		case err := <-c.done:
			t.Fatalf("%s: the other node was disconnected: %v", c.what, err)
		default:
		}
	}
}
