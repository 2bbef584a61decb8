package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/agent/certs"
	"meshd.dev/meshd/netmap"
)

// waitDNSName waits for a's map to give it a DNS name and the tailnet CA.
func waitDNSName(t *testing.T, a *Agent) string {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		a.mu.Lock()
		var name string
		var ca []byte
		if a.nm != nil {
			name, ca = strings.TrimSuffix(a.nm.Self.DNSName, "."), a.nm.TLSCA
		}
		a.mu.Unlock()
		if name != "" && ca != nil {
			return name
		}
		if time.Now().After(deadline) {
			t.Fatal("no DNS name and tailnet CA in the map")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// serveTLS runs an HTTPS server on loopback with cfg until the test ends
// and returns its port.
func serveTLS(t *testing.T, cfg *tls.Config) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{
		Handler:   http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("hello over tls\n")) }),
		TLSConfig: cfg, ReadHeaderTimeout: 5 * time.Second,
		ErrorLog: log.New(io.Discard, "", 0), // refused handshakes are what the test expects
	}
	go srv.ServeTLS(ln, "", "")
	t.Cleanup(func() { srv.Close() })
	return strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
}

// curl fetches https://host:port/ from the server on loopback port with
// curl, trusting cacert ("" for the system's trust store), never -k.
// It returns curl's exit code and output.
func curl(t *testing.T, host, port, cacert string) (int, string) {
	t.Helper()
	hp := host
	if strings.Contains(host, ":") {
		hp = "[" + host + "]"
	}
	args := []string{"-sS", "--max-time", "10", "--connect-to", hp + ":" + port + ":127.0.0.1:" + port}
	if cacert != "" {
		args = append(args, "--cacert", cacert)
	}
	u := "https://" + hp + ":" + port + "/"
	out, err := exec.Command("curl", append(args, u)...).CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode(), string(out)
	}
	if err != nil {
		t.Fatalf("curl: %v (the test needs curl installed)", err)
	}
	return 0, string(out)
}

// TestCurlTrustsTailnetCertificate: curl, trusting only the tailnet CA the
// daemon saved (--cacert, no -k), fetches https://NODE.meshd.internal/ from
// a TLS server that uses Agent.GetCertificate, and by the node's tailnet
// addresses; it refuses the same server under another node's name (no
// certificate for it) and a server presenting this node's certificate for
// another name, and without the tailnet CA it trusts neither.
func TestCurlTrustsTailnetCertificate(t *testing.T) {
	m := newTestMesh(t)
	web := m.join("web")
	other := m.join("other")
	name := waitDNSName(t, web)
	otherName := waitDNSName(t, other)
	if name != "web."+netmap.DefaultDNSSuffix {
		t.Fatalf("dns name %q", name)
	}
	caFile := filepath.Join(web.opts.StateDir, certs.CAFile)
	port := serveTLS(t, &tls.Config{GetCertificate: web.GetCertificate})

	if code, out := curl(t, name, port, caFile); code != 0 || out != "hello over tls\n" {
		t.Fatalf("curl https://%s/ --cacert tailnet CA: exit %d: %s", name, code, out)
	}
	// The trailing-dot form is the same name.
	if code, out := curl(t, name+".", port, caFile); code != 0 {
		t.Errorf("curl https://%s./: exit %d: %s", name, code, out)
	}
	web.mu.Lock()
	addrs := netmap.AddrsOf(web.nm.Self.Addresses)
	web.mu.Unlock()
	for _, ip := range addrs {
		if code, out := curl(t, ip.String(), port, caFile); code != 0 {
			t.Errorf("curl https://%s/: exit %d: %s", ip, code, out)
		}
	}
	// Asked for another node's name, the server has no certificate: the
	// handshake fails (exit 35), before curl even sees one to refuse.
	if code, out := curl(t, otherName, port, caFile); code != 35 {
		t.Errorf("curl https://%s/ from %s's server: exit %d, want 35 (handshake refused): %s", otherName, name, code, out)
	}
	// This node's certificate, presented as another name's: curl refuses
	// it for the name (exit 60: peer certificate cannot be authenticated).
	c, err := web.GetCertificate(&tls.ClientHelloInfo{ServerName: name})
	if err != nil {
		t.Fatal(err)
	}
	static := serveTLS(t, &tls.Config{Certificates: []tls.Certificate{*c}})
	if code, out := curl(t, otherName, static, caFile); code != 60 || !strings.Contains(out, "subject") {
		t.Errorf("curl https://%s/ with %s's certificate: exit %d, want 60 (name mismatch): %s", otherName, name, code, out)
	}
	if code, _ := curl(t, name, static, caFile); code != 0 {
		t.Errorf("the static server under its own name: exit %d", code)
	}
	// Without the tailnet CA, nothing is trusted.
	if code, out := curl(t, name, port, ""); code != 60 {
		t.Errorf("curl without --cacert: exit %d, want 60: %s", code, out)
	}
	if _, err := web.CertPair(context.Background(), otherName); err == nil || !strings.Contains(err.Error(), "only for its own name") {
		t.Errorf("CertPair for another node's name: %v", err)
	}
}
