package main

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/derp"
	"meshd.dev/meshd/internal/tlspin"
	"meshd.dev/meshd/nat/stun"
	"meshd.dev/meshd/netmap"
)

// startDERP runs `meshd derp` with args and returns the DERP map node it
// printed and a function that stops it and returns its exit code.
func startDERP(t *testing.T, args ...string) (netmap.DERPNode, func() int) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	code := make(chan int, 1)
	go func() {
		code <- run(ctx, append([]string{"derp"}, args...), pw, io.Discard)
		pw.Close()
	}()
	node, found := readDERPNode(t, pr)
	if !found {
		cancel()
		t.Fatalf("meshd derp exited (code %d) without printing its node", <-code)
	}
	stopped := false
	stop := func() int {
		if stopped {
			return 0
		}
		stopped = true
		cancel()
		select {
		case c := <-code:
			return c
		case <-time.After(10 * time.Second):
			t.Fatal("meshd derp did not stop")
			return -1
		}
	}
	t.Cleanup(func() { stop() })
	return node, stop
}

// readDERPNode reads what `meshd derp` prints up to its DERP map node and
// returns that node; the rest of r is discarded in the background.
func readDERPNode(t *testing.T, r io.Reader) (node netmap.DERPNode, found bool) {
	t.Helper()
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "derp map node: "); ok {
			if err := json.Unmarshal([]byte(rest), &node); err != nil {
				t.Fatalf("printed node %q: %v", rest, err)
			}
			go io.Copy(io.Discard, r)
			return node, true
		}
	}
	return node, false
}

func TestDERPCommandRelaysAndAnswersSTUN(t *testing.T) {
	dir := t.TempDir()
	node, stop := startDERP(t, "--open-relay", "--listen", "127.0.0.1:0", "--stun-listen", "127.0.0.1:0", "--state-dir", dir)
	if node.Host != "127.0.0.1" || node.DERPPort == 0 || node.STUNPort <= 0 || len(node.CertFingerprint) != 64 {
		t.Fatalf("printed node %+v", node)
	}
	url := "https://" + net.JoinHostPort(node.Host, itoa(node.DERPPort))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ka, kb := netmap.NewNodePrivate(), netmap.NewNodePrivate()
	a, err := derp.Dial(ctx, url, derp.ClientOptions{NodeKey: ka, CertFingerprint: node.CertFingerprint})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := derp.Dial(ctx, url, derp.ClientOptions{NodeKey: kb, CertFingerprint: node.CertFingerprint})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if err := a.Send(kb.Public(), []byte("through the relay")); err != nil {
		t.Fatal(err)
	}
	for {
		m, err := b.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if p, ok := m.(derp.ReceivedPacket); ok {
			if p.Source != ka.Public() || string(p.Data) != "through the relay" {
				t.Fatalf("got %q from %s", p.Data, p.Source.ShortString())
			}
			break
		}
	}

	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	mapped, _, err := stun.Request(ctx, pc, netip.AddrPortFrom(netip.MustParseAddr(node.Host), uint16(node.STUNPort)))
	if err != nil || mapped != pc.LocalAddr().(*net.UDPAddr).AddrPort() {
		t.Fatalf("STUN: mapped %v, err %v", mapped, err)
	}

	if code := stop(); code != 0 {
		t.Fatalf("exit code %d after shutdown", code)
	}
	// Same state dir: same fingerprint, so pinned DERP maps keep working.
	node2, _ := startDERP(t, "--open-relay", "--listen", "127.0.0.1:0", "--stun-listen", "", "--state-dir", dir)
	if node2.CertFingerprint != node.CertFingerprint {
		t.Fatal("fingerprint changed across restarts with the same --state-dir")
	}
	if node2.STUNPort != -1 {
		t.Fatalf("STUN disabled but node says stun_port %d", node2.STUNPort)
	}
}

func TestDERPCommandRejectsBadFlags(t *testing.T) {
	dir := t.TempDir()
	badKey := filepath.Join(dir, "bad.key")
	os.WriteFile(badKey, []byte("not hex"), 0o600)
	goodKey := filepath.Join(dir, "mesh.key")
	os.WriteFile(goodKey, []byte(strings.Repeat("ab", 32)+"\n"), 0o600)
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"mesh-with without key", []string{"--mesh-with", "https://127.0.0.1:1#ab"}, "needs --mesh-key-file"},
		{"bad mesh key", []string{"--mesh-key-file", badKey}, "64 hex digits"},
		{"missing mesh key file", []string{"--mesh-key-file", filepath.Join(dir, "nope")}, "no such file"},
		{"mesh-with not a URL", []string{"--mesh-key-file", goodKey, "--mesh-with", "relay2:443"}, "https://HOST:PORT"},
		{"negative rate", []string{"--client-rate-mbit", "-1"}, "client-rate"},
		{"stray argument", []string{"extra"}, "unexpected arguments"},
		{"open relay not asked for", nil, "refusing to run an open relay"},
		{"open relay not asked for, says what to do", nil, "pass --coordinator URL --coordinator-token-file FILE"},
		{"open relay and coordinator", []string{"--open-relay", "--coordinator", "https://127.0.0.1:1", "--coordinator-token-file", goodKey}, "drop one of them"},
		{"zero per-IP cap", []string{"--open-relay", "--max-conns-per-ip", "0"}, "must be positive"},
		{"negative total cap", []string{"--open-relay", "--max-conns", "-1"}, "must be positive"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stderr strings.Builder
			// Bounded: a relay that wrongly starts serves until ctx ends.
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			code := run(ctx, append([]string{"derp", "--listen", "127.0.0.1:0"}, tt.args...), io.Discard, &stderr)
			if code != 2 || !strings.Contains(stderr.String(), tt.want) {
				t.Fatalf("exit %d, stderr %q; want 2 mentioning %q", code, stderr.String(), tt.want)
			}
		})
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func TestDERPCommandRegionMesh(t *testing.T) {
	keyFile := filepath.Join(t.TempDir(), "mesh.key")
	if err := os.WriteFile(keyFile, []byte(strings.Repeat("c3", 32)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// Certificates made up front, so each relay can pin the other's.
	var dirs [2]string
	var fps [2]string
	var urls [2]string
	for i := range 2 {
		dirs[i] = t.TempDir()
		cert, err := derp.LoadOrCreateCert(dirs[i], []string{"127.0.0.1"})
		if err != nil {
			t.Fatal(err)
		}
		fps[i] = tlspin.Fingerprint(cert.Leaf)
		urls[i] = "https://127.0.0.1:" + strconv.Itoa(freePort(t))
	}
	for i := range 2 {
		other := 1 - i
		node, _ := startDERP(t, "--open-relay", "--listen", strings.TrimPrefix(urls[i], "https://"), "--stun-listen", "",
			"--state-dir", dirs[i], "--mesh-key-file", keyFile, "--mesh-with", urls[other]+"#"+fps[other])
		if node.CertFingerprint != fps[i] {
			t.Fatalf("relay %d serves fingerprint %s, want the one in its state dir", i, node.CertFingerprint)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	ka, kb := netmap.NewNodePrivate(), netmap.NewNodePrivate()
	a, err := derp.Dial(ctx, urls[0], derp.ClientOptions{NodeKey: ka, CertFingerprint: fps[0]})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := derp.Dial(ctx, urls[1], derp.ClientOptions{NodeKey: kb, CertFingerprint: fps[1]})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	got := make(chan []byte, 1)
	go func() {
		for {
			m, err := b.Recv()
			if err != nil {
				return
			}
			if p, ok := m.(derp.ReceivedPacket); ok && p.Source == ka.Public() {
				got <- append([]byte(nil), p.Data...)
				return
			}
		}
	}()
	// Until the relays have meshed, relay 0 answers "not here"; keep
	// sending until the packet crosses.
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		if err := a.Send(kb.Public(), []byte("across the region")); err != nil {
			t.Fatal(err)
		}
		select {
		case d := <-got:
			if string(d) != "across the region" {
				t.Fatalf("got %q", d)
			}
			return
		case <-tick.C:
		case <-ctx.Done():
			t.Fatal("packet never crossed the mesh")
		}
	}
}
