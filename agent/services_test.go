package agent

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/agent/whois"
)

// TestHTTPSServiceNetstack: a daemon HTTPS service (what meshd k8s-proxy
// adds) listens in the netstack on the tailnet addresses with the node's
// certificate, tells its handler who calls through whois, keeps serve off
// its port, and follows the data plane down and up.
func TestHTTPSServiceNetstack(t *testing.T) {
	m := newFakeMesh(t)
	cert, pool := selfCert(t, "web.test")
	webOpts := m.options(filepath.Join(t.TempDir(), "web"))
	webOpts.GetCertificate = func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return cert, nil }
	webOpts.HTTPSServices = []HTTPSService{{
		Name: "test service", Port: 443,
		NewHandler: func(whoIs func(netip.Addr) (*whois.Response, bool)) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				ap := netip.MustParseAddrPort(r.RemoteAddr)
				who, ok := whoIs(ap.Addr())
				if !ok {
					http.Error(w, "unknown", http.StatusForbidden)
					return
				}
				io.WriteString(w, "hello "+who.Node.Hostname)
			})
		},
	}}
	web, _ := runStoppable(t, webOpts)
	ctx := context.Background()
	if _, err := web.Up(ctx, localapi.UpRequest{AuthKey: m.key, Coordinator: m.url, Hostname: "web"}); err != nil {
		t.Fatal(err)
	}
	client := m.join("client")
	st := waitStatus(t, web, "web to see client", func(st *localapi.Status) bool { return peerNamed(st, "client") != nil })
	waitStatus(t, client, "client to see web", func(st *localapi.Status) bool { return peerNamed(st, "web") != nil })
	var webIP netip.Addr
	for _, ip := range st.Self.IPs {
		if ip.Is4() {
			webIP = ip
		}
	}
	get := func() (string, error) {
		tr := &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: pool},
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return client.Dial(ctx, "tcp", netip.AddrPortFrom(webIP, 443).String())
			},
		}
		defer tr.CloseIdleConnections()
		resp, err := (&http.Client{Transport: tr, Timeout: 5 * time.Second}).Get("https://web.test/")
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return string(b), err
	}
	waitGet := func(step string) {
		t.Helper()
		var body string
		var err error
		// The first connection waits for the WireGuard handshake.
		for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); {
			if body, err = get(); err == nil {
				break
			}
		}
		if err != nil || body != "hello client" {
			t.Fatalf("%s: %q %v", step, body, err)
		}
	}
	waitGet("first start")

	if _, err := web.ServeAdd(ctx, localapi.ServeRequest{Proto: "https", Port: 443, Target: "8080"}); err == nil || !strings.Contains(err.Error(), "test service") {
		t.Errorf("serve on the service's port: %v, want a refusal naming the service", err)
	}

	if err := web.Down(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := get(); err == nil {
		t.Errorf("the service answered while the node is down")
	}
	if _, err := web.Up(ctx, localapi.UpRequest{}); err != nil {
		t.Fatal(err)
	}
	waitGet("after down and up")
}
