package main

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/derp"
	"meshd.dev/meshd/internal/promtest"
	"meshd.dev/meshd/netmap"
)

// TestDERPMetricsScrape: `meshd derp --metrics-listen` serves its counters
// in the Prometheus text format, and they follow real relayed packets:
// clients connected, packets and bytes relayed, packets to a node that is
// not there dropped.
func TestDERPMetricsScrape(t *testing.T) {
	mport := freePort(t)
	murl := "http://127.0.0.1:" + itoa(mport) + "/metrics"
	node, stop := startDERP(t, "--open-relay", "--listen", "127.0.0.1:0", "--stun-listen", "", "--metrics-listen", "127.0.0.1:"+itoa(mport))
	defer stop()
	before, err := promtest.Scrape(nil, murl)
	if err != nil {
		t.Fatal(err)
	}
	if v, ok := before.Value("meshd_derp_clients"); !ok || v != 0 {
		t.Fatalf("clients before any: %v %v (%s)", v, ok, before)
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
	const n, size = 20, 1000
	pkt := []byte(strings.Repeat("x", size))
	for range n {
		if err := a.Send(kb.Public(), pkt); err != nil {
			t.Fatal(err)
		}
	}
	for got := 0; got < n; {
		m, err := b.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := m.(derp.ReceivedPacket); ok {
			got++
		}
	}
	if err := a.Send(netmap.NewNodePrivate().Public(), pkt); err != nil { // nobody there
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		f, err := promtest.Scrape(nil, murl)
		if err != nil {
			t.Fatal(err)
		}
		clients, _ := f.Value("meshd_derp_clients")
		relayed, _ := f.Value("meshd_derp_packets_total", "outcome", "relayed")
		dropped, _ := f.Value("meshd_derp_packets_total", "outcome", "dropped")
		bytes, _ := f.Value("meshd_derp_relayed_bytes_total")
		if clients == 2 && relayed == n && bytes == n*size && dropped == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %d packets of %d bytes and one to nobody: clients %v relayed %v bytes %v dropped %v", n, size, clients, relayed, bytes, dropped)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestMetricsListenTaken: a --metrics-listen address that cannot be
// listened on fails the command at start, naming the flag.
func TestMetricsListenTaken(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var out strings.Builder
	code := run(context.Background(), []string{"derp", "--open-relay", "--listen", "127.0.0.1:0", "--stun-listen", "", "--metrics-listen", ln.Addr().String()}, &out, &out)
	if code == 0 || !strings.Contains(out.String(), "--metrics-listen") {
		t.Fatalf("exit %d: %s", code, out.String())
	}
}

// TestMetricsTailnetPortRange: a port the daemon cannot listen on is
// refused before anything starts.
func TestMetricsTailnetPortRange(t *testing.T) {
	var out strings.Builder
	code := run(context.Background(), []string{"daemon", "--tun", "userspace", "--state-dir", t.TempDir(), "--metrics-tailnet-port", "70000"}, &out, &out)
	if code == 0 || !strings.Contains(out.String(), "--metrics-tailnet-port 70000") {
		t.Fatalf("exit %d: %s", code, out.String())
	}
}
