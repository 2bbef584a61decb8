package agent

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/agent/serve"
)

// headerEcho is a backend on 127.0.0.1 that answers with the request
// headers it got, as JSON.
func headerEcho(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(r.Header)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

// selfCert makes a CA and a certificate for name signed by it.
func selfCert(t *testing.T, name string) (*tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name}, DNSNames: []string{name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true,
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(c)
	return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, pool
}

// fetchThrough GETs url from agent from's side of the tailnet and returns
// the headers the echo backend saw.
func fetchThrough(t *testing.T, from *Agent, url string, tlsConf *tls.Config) (http.Header, error) {
	t.Helper()
	client := &http.Client{Timeout: 15 * time.Second, Transport: &http.Transport{
		DialContext: from.Dial, TLSClientConfig: tlsConf,
	}}
	defer client.CloseIdleConnections()
	resp, err := client.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return nil, fmt.Errorf("%s: %s", resp.Status, b)
	}
	var h http.Header
	return h, json.NewDecoder(resp.Body).Decode(&h)
}

// runStoppable runs an agent with opts until stop (or the test's end).
func runStoppable(t *testing.T, opts Options) (*Agent, func()) {
	t.Helper()
	a, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Run: %v", err)
			}
			a.Close()
		})
	}
	t.Cleanup(stop)
	return a, stop
}

// TestServeNetstack: in userspace mode, a peer reaches `serve --http` and
// `--https` on the node's tailnet address through the netstack; the
// backend sees the peer's identity, not the header the peer forged; the
// configuration survives a daemon restart; and HTTPS is refused with a
// clear error where the agent has no certificate source.
func TestServeNetstack(t *testing.T) {
	m := newFakeMesh(t)
	backend := headerEcho(t)
	cert, pool := selfCert(t, "web.test")
	webOpts := m.options(filepath.Join(t.TempDir(), "web"))
	webOpts.GetCertificate = func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return cert, nil }
	web, stopWeb := runStoppable(t, webOpts)
	if _, err := web.Up(context.Background(), localapi.UpRequest{AuthKey: m.key, Coordinator: m.url, Hostname: "web"}); err != nil {
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

	ctx := context.Background()
	if _, err := web.ServeAdd(ctx, localapi.ServeRequest{Proto: "http", Port: 80, Target: "http://" + backend}); err != nil {
		t.Fatal(err)
	}
	sst, err := web.ServeAdd(ctx, localapi.ServeRequest{Proto: "https", Port: 443, Target: backend})
	if err != nil {
		t.Fatal(err)
	}
	if len(sst.Entries) != 2 || len(sst.Entries[0].Listening) != len(st.Self.IPs) || sst.Message != "" {
		t.Fatalf("serve status: %+v", sst)
	}

	get := func(step, scheme string, port uint16) http.Header {
		t.Helper()
		tr := &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: pool},
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return client.Dial(ctx, "tcp", netip.AddrPortFrom(webIP, port).String())
			},
		}
		defer tr.CloseIdleConnections()
		req, _ := http.NewRequest("GET", scheme+"://web.test/", nil)
		req.Header.Set("Meshd-User-Login", "mallory@evil.com")
		req.Header.Set("Tailscale-User-Login", "mallory@evil.com")
		var resp *http.Response
		var err error
		// The first connection after a start waits for the WireGuard
		// handshake.
		for deadline := time.Now().Add(20 * time.Second); ; {
			if resp, err = (&http.Client{Transport: tr, Timeout: 5 * time.Second}).Do(req); err == nil || time.Now().After(deadline) {
				break
			}
		}
		if err != nil {
			t.Fatalf("%s: %s: %v", step, scheme, err)
		}
		defer resp.Body.Close()
		var h http.Header
		if resp.StatusCode != http.StatusOK || json.NewDecoder(resp.Body).Decode(&h) != nil {
			t.Fatalf("%s: %s: %s", step, scheme, resp.Status)
		}
		if h.Get(serve.HeaderNodeName) != "client" || h.Get(serve.HeaderNodeTags) != "tag:test" ||
			h.Get(serve.HeaderUserLogin) != "" || h.Get(serve.HeaderTailscaleUserLogin) != "" {
			t.Fatalf("%s: %s backend saw %v", step, scheme, h)
		}
		return h
	}
	get("first start", "http", 80)
	if h := get("first start", "https", 443); h.Get("X-Forwarded-Proto") != "https" {
		t.Fatalf("https: X-Forwarded-Proto %q", h.Get("X-Forwarded-Proto"))
	}

	// A restart finds the configuration in the state dir (0600).
	stopWeb()
	fi, err := os.Stat(filepath.Join(webOpts.StateDir, serveFile))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("serve.json: %v, mode %v", err, fi.Mode())
	}
	web, _ = runStoppable(t, webOpts)
	waitStatus(t, web, "web running again", func(st *localapi.Status) bool { return st.BackendState == localapi.StateRunning })
	get("after a restart", "http", 80)
	get("after a restart", "https", 443)

	// The listeners follow the data plane: down closes them, up opens
	// them again.
	if err := web.Down(ctx); err != nil {
		t.Fatal(err)
	}
	if sst, _ := web.ServeStatus(ctx); len(sst.Entries) != 2 || len(sst.Entries[0].Listening) != 0 || !strings.Contains(sst.Message, "not up") {
		t.Fatalf("serve status while down: %+v", sst)
	}
	if _, err := web.Up(ctx, localapi.UpRequest{}); err != nil {
		t.Fatal(err)
	}
	get("after down and up", "http", 80)

	// Without a certificate source, HTTPS is refused and nothing changes.
	noCA, _ := runStoppable(t, m.options(filepath.Join(t.TempDir(), "noca")))
	_, err = noCA.ServeAdd(ctx, localapi.ServeRequest{Proto: "https", Port: 443, Target: backend})
	if err == nil || !strings.Contains(err.Error(), "HTTPS needs a certificate from the tailnet CA") {
		t.Fatalf("https without a CA: %v", err)
	}
	if sst, _ := noCA.ServeStatus(ctx); len(sst.Entries) != 0 {
		t.Fatalf("refused https entry listed: %+v", sst)
	}
}

// TestServeConfigCorrupt: an unusable serve.json does not stop the daemon;
// it is moved aside, nothing is served (less exposed, never more), and
// serve status says why until the next change.
func TestServeConfigCorrupt(t *testing.T) {
	tests := []struct{ name, content string }{
		{"not json", "{entries: "},
		{"remote target", `{"entries":[{"proto":"http","port":80,"target":"http://10.0.0.1"}]}`},
		{"unknown field", `{"entries":[],"funnel":true}`},
		{"port twice", `{"entries":[{"proto":"tcp","port":22,"target":"127.0.0.1:22"},{"proto":"tcp","port":22,"target":"127.0.0.1:23"}]}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newFakeMesh(t)
			dir := filepath.Join(t.TempDir(), "n")
			if err := os.MkdirAll(dir, 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, serveFile), []byte(tt.content), 0o600); err != nil {
				t.Fatal(err)
			}
			a, _ := runStoppable(t, m.options(dir))
			st, err := a.ServeStatus(context.Background())
			if err != nil || len(st.Entries) != 0 || !strings.Contains(st.Message, "moved to") {
				t.Fatalf("serve status: %+v, %v", st, err)
			}
			aside, _ := filepath.Glob(filepath.Join(dir, serveFile+".corrupt-*"))
			if len(aside) != 1 {
				t.Fatalf("moved aside: %v", aside)
			}
			if b, _ := os.ReadFile(aside[0]); string(b) != tt.content {
				t.Fatalf("the moved file lost its content: %q", b)
			}
			if _, err := a.ServeAdd(context.Background(), localapi.ServeRequest{Proto: "tcp", Port: 22, Target: "22"}); err != nil {
				t.Fatal(err)
			}
			if st, _ := a.ServeStatus(context.Background()); strings.Contains(st.Message, "moved to") {
				t.Fatalf("message after a new configuration: %q", st.Message)
			}
		})
	}
}

func FuzzLoadServeConfig(f *testing.F) {
	f.Add([]byte(`{"entries":[{"proto":"http","port":80,"target":"http://127.0.0.1:3000"}]}`))
	f.Add([]byte(`{"entries":[{"proto":"tcp","port":22,"target":"127.0.0.1:22"},{"proto":"https","port":443,"target":"http://[::1]:8080/x"}]}`))
	f.Add([]byte(`{"entries":[{"proto":"http","port":80,"target":"http://10.0.0.1"}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		dir := t.TempDir()
		s, err := OpenStore(dir)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		os.WriteFile(filepath.Join(dir, serveFile), data, 0o600)
		c, err := s.LoadServeConfig()
		var ce *CorruptFileError
		if err != nil && !errors.As(err, &ce) {
			t.Fatalf("error is not a CorruptFileError: %v", err)
		}
		if err == nil {
			if verr := c.Validate(); verr != nil {
				t.Fatalf("loaded an invalid config: %v", verr)
			}
			if err := s.SaveServeConfig(c); err != nil {
				t.Fatal(err)
			}
			again, err := s.LoadServeConfig()
			if err != nil || len(again.Entries) != len(c.Entries) {
				t.Fatalf("round trip: %+v, %v", again, err)
			}
		}
	})
}
