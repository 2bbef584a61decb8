package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"meshd.dev/meshd/agent"
	"meshd.dev/meshd/nat/stun"
	"meshd.dev/meshd/netmap"
)

// startSTUN runs a STUN server on a loopback port for the test.
func startSTUN(t *testing.T) int {
	t.Helper()
	st, err := stun.Listen("127.0.0.1:0", nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { st.Serve(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return int(st.AddrPort().Port())
}

// closedUDPPort is a loopback UDP port nothing listens on.
func closedUDPPort(t *testing.T) int {
	t.Helper()
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	return pc.LocalAddr().(*net.UDPAddr).Port
}

// netcheckLab is a DERP map over loopback: regions 1 and 2 answer STUN,
// region 3 answers nothing on UDP but accepts TCP on its DERP port, region
// 4 answers nothing at all.
func netcheckLab(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	m := fmt.Sprintf(`{"regions": [
  {"id": 1, "code": "one", "nodes": [{"name": "1a", "host": "127.0.0.1", "stun_only": true, "stun_port": %d}]},
  {"id": 2, "code": "two", "nodes": [{"name": "2a", "host": "127.0.0.1", "stun_only": true, "stun_port": %d}]},
  {"id": 3, "code": "tcp", "nodes": [{"name": "3a", "host": "127.0.0.1", "derp_port": %d, "stun_port": %d}]},
  {"id": 4, "code": "dark", "nodes": [{"name": "4a", "host": "127.0.0.1", "stun_only": true, "stun_port": %d}]},
]}`, startSTUN(t), startSTUN(t), ln.Addr().(*net.TCPAddr).Port, closedUDPPort(t), closedUDPPort(t))
	return writeFile(t, t.TempDir(), "derpmap.hujson", m)
}

func runNetcheck(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := run(context.Background(), append([]string{"netcheck", "--timeout", "1s"}, args...), &stdout, &stderr)
	return code, stdout.String(), stderr.String()
}

func TestNetcheckJSON(t *testing.T) {
	code, out, errOut := runNetcheck(t, "--derp-map", netcheckLab(t), "--json")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	var r netcheckJSON
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if !r.UDP || !r.IPv4 || r.IPv6 {
		t.Errorf("udp %v ipv4 %v ipv6 %v", r.UDP, r.IPv4, r.IPv6)
	}
	// Loopback is no NAT: the servers see the probing socket itself, the
	// same from both.
	if !r.GlobalV4.IsValid() || r.GlobalV4.Addr().String() != "127.0.0.1" || r.GlobalV4.Port() == 0 {
		t.Errorf("global v4 %v", r.GlobalV4)
	}
	if r.MappingVariesByDest == nil || *r.MappingVariesByDest {
		t.Errorf("mapping varies by dest: %v", r.MappingVariesByDest)
	}
	if len(r.Regions) != 4 {
		t.Fatalf("regions %+v", r.Regions)
	}
	// Preferred is the fastest reachable region (region 3 counts too: its
	// relay is usable over TCP).
	best := 0
	for _, g := range r.Regions {
		if g.LatencyMS != nil && (best == 0 || *g.LatencyMS < *r.Regions[best-1].LatencyMS) {
			best = g.ID
		}
	}
	if r.PreferredDERP == 0 || r.PreferredDERP == 4 || *r.Regions[r.PreferredDERP-1].LatencyMS > *r.Regions[best-1].LatencyMS {
		t.Errorf("preferred %d, fastest is %d: %+v", r.PreferredDERP, best, r.Regions)
	}
	for i, want := range []struct {
		code, via string
	}{{"one", "udp"}, {"two", "udp"}, {"tcp", "tcp"}, {"dark", ""}} {
		g := r.Regions[i]
		if g.ID != i+1 || g.Code != want.code || g.Via != want.via || (g.LatencyMS != nil) != (want.via != "") {
			t.Errorf("region %d: %+v, want code %s via %q", i+1, g, want.code, want.via)
		}
		if g.LatencyMS != nil && (*g.LatencyMS <= 0 || *g.LatencyMS > 1000) {
			t.Errorf("region %d latency %vms", i+1, *g.LatencyMS)
		}
	}
}

func TestNetcheckText(t *testing.T) {
	code, out, errOut := runNetcheck(t, "--derp-map", netcheckLab(t))
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	for _, re := range []string{
		`(?m)^\tUDP: yes$`,
		`(?m)^\tIPv4: yes, 127\.0\.0\.1:\d+$`,
		`(?m)^\tIPv6: no$`,
		`(?m)^\tMappingVariesByDestIP: no$`,
		`(?m)^\tNearest DERP: [123] \((one|two|tcp)\)$`,
		`(?m)^\t\t- 1  one +\d+\.\dms$`,
		`(?m)^\t\t- 2 +two +\d+\.\dms$`,
		`(?m)^\t\t- 3 +tcp +\d+\.\dms \(TCP\)$`,
		`(?m)^\t\t- 4 +dark +unreachable$`,
	} {
		if !regexp.MustCompile(re).MatchString(out) {
			t.Errorf("output lacks %s:\n%s", re, out)
		}
	}
}

// TestNetcheckStateDir reads the DERP map from the map the agent saved.
func TestNetcheckStateDir(t *testing.T) {
	dir := t.TempDir()
	st, err := agent.OpenStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	port := startSTUN(t)
	nm := &netmap.NetworkMap{
		Epoch: "e1", Version: 3,
		Self: netmap.Node{ID: 1, Hostname: "gpu1", NodeKey: netmap.NewNodePrivate().Public(), DiscoKey: netmap.NewDiscoPrivate().Public()},
		DERPMap: netmap.DERPMap{Regions: []netmap.DERPRegion{{ID: 9, Code: "coord", Nodes: []netmap.DERPNode{
			{Name: "9a", Host: "127.0.0.1", STUNOnly: true, STUNPort: port},
		}}}},
	}
	if err := st.SaveNetworkMap(nm); err != nil {
		t.Fatal(err)
	}
	// The daemon would still hold the store open; netcheck must not need it.
	defer st.Close()
	code, out, errOut := runNetcheck(t, "--state-dir", dir)
	if code != 0 || !strings.Contains(out, "Nearest DERP: 9 (coord)") {
		t.Fatalf("exit %d: %s%s", code, out, errOut)
	}

	empty := t.TempDir()
	code, _, errOut = runNetcheck(t, "--state-dir", empty)
	if code != 1 || !strings.Contains(errOut, "no saved network map at "+filepath.Join(empty, "netmap.json")) {
		t.Errorf("empty state dir: exit %d %q", code, errOut)
	}
}

func TestNetcheckBadInput(t *testing.T) {
	bad := writeFile(t, t.TempDir(), "m.hujson", `{"regions": [{"id": 1, "code": "x", "nodes": [{"name": "1a", "host": "h"}]}]}`)
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"--derp-map", bad}, 1, bad + `:1:47: region 1 node 1 needs a "derp_port"`},
		{[]string{"--derp-map", bad, "extra"}, 2, "unexpected arguments"},
		{[]string{"--state-dir", filepath.Dir(writeFile(t, t.TempDir(), "netmap.json", `{"full": true}`))}, 1, "has no DERP map (the coordinator sent none): pass --derp-map FILE"},
	} {
		code, _, errOut := runNetcheck(t, tc.args...)
		if code != tc.code || !strings.Contains(errOut, tc.want) {
			t.Errorf("%q: exit %d %q, want %d and %q", tc.args, code, errOut, tc.code, tc.want)
		}
	}
	// A corrupt saved map is reported with its path.
	dir := t.TempDir()
	writeFile(t, dir, "netmap.json", `{"full": true, "derp_map": {"regions": [{"id": -1}]}}`)
	code, _, errOut := runNetcheck(t, "--state-dir", dir)
	if code != 1 || !strings.Contains(errOut, filepath.Join(dir, "netmap.json")) {
		t.Errorf("corrupt saved map: exit %d %q", code, errOut)
	}
}

// TestNetcheckCoordinator: `meshd netcheck --coordinator URL` fetches the
// map of a real coordinator (with its embedded relay and STUN server on
// loopback) over the pinned channel and measures against it, the pin taken
// from --fingerprint or from a node registered with that coordinator.
func TestNetcheckCoordinator(t *testing.T) {
	cr := startCoordinatorArgs(t)
	registered := t.TempDir()
	st, err := agent.OpenStore(registered)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.SaveLogin(&agent.Login{CoordinatorURL: cr.url, ServerPin: cr.fingerprint, NodeID: 1}); err != nil {
		t.Fatal(err)
	}
	defer st.Close() // held as the daemon would: netcheck must not need the lock

	for _, tc := range []struct {
		name string
		args []string
	}{
		{"--fingerprint", []string{"--coordinator", cr.url, "--fingerprint", cr.fingerprint, "--state-dir", t.TempDir()}},
		{"pin of the registered node", []string{"--coordinator", cr.url, "--state-dir", registered}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, out, errOut := runNetcheck(t, append(tc.args, "--json")...)
			if code != 0 {
				t.Fatalf("exit %d: %s", code, errOut)
			}
			var r netcheckJSON
			if err := json.Unmarshal([]byte(out), &r); err != nil {
				t.Fatalf("%v: %s", err, out)
			}
			if !r.UDP || !r.GlobalV4.IsValid() || r.GlobalV4.Addr().String() != "127.0.0.1" {
				t.Errorf("udp %v global v4 %v: the embedded STUN server did not answer", r.UDP, r.GlobalV4)
			}
			if len(r.Regions) != 1 || r.Regions[0].ID != 1 || r.Regions[0].Code != "coord" || r.Regions[0].Via != "udp" || r.PreferredDERP != 1 {
				t.Errorf("regions %+v preferred %d, want the coordinator's region 1 over UDP", r.Regions, r.PreferredDERP)
			}
		})
	}

	other := strings.Repeat("ab", 32)
	for _, tc := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"wrong fingerprint", []string{"--coordinator", cr.url, "--fingerprint", other}, 1, "coordinator presented " + cr.fingerprint + ", expected " + other},
		{"malformed fingerprint", []string{"--coordinator", cr.url, "--fingerprint", "abc"}, 1, "want 64 hex digits"},
		{"no pin", []string{"--coordinator", cr.url, "--state-dir", t.TempDir()}, 2, "pass --fingerprint"},
		{"node of another coordinator", []string{"--coordinator", "https://127.0.0.1:1", "--state-dir", registered}, 2, "is registered with \"" + cr.url + "\""},
		{"two maps", []string{"--coordinator", cr.url, "--derp-map", "m.hujson"}, 2, "pass one"},
		{"fingerprint alone", []string{"--fingerprint", cr.fingerprint}, 2, "pass --coordinator URL too"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, errOut := runNetcheck(t, tc.args...)
			if code != tc.code || !strings.Contains(errOut, tc.want) {
				t.Fatalf("exit %d %q, want %d and %q", code, errOut, tc.code, tc.want)
			}
		})
	}
}
