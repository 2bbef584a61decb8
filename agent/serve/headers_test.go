package serve

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"meshd.dev/meshd/agent/whois"
)

func TestIsIdentityHeader(t *testing.T) {
	tests := []struct {
		name string
		want bool
	}{
		{"Meshd-User-Login", true},
		{"meshd-user-login", true},
		{"MESHD-NODE-TAGS", true},
		{"Meshd_User_Login", true},
		{"meshd_app_capabilities", true},
		{"Meshd-Anything-New", true},
		{"Tailscale-User-Login", true},
		{"Tailscale-User-Profile-Pic", true},
		{"tailscale_app_capabilities", true},
		{"Tailscale-Funnel-Request", true},
		{"Meshd", false},
		{"Meshdx-User", false},
		{"X-Meshd-User-Login", false},
		{"Tailscalex", false},
		{"Authorization", false},
		{"", false},
	}
	for _, tt := range tests {
		if got := isIdentityHeader(tt.name); got != tt.want {
			t.Errorf("isIdentityHeader(%q) = %v, want %v", tt.name, got, tt.want)
		}
	}
}

// echoed is what the test backend saw of one request.
type echoed struct {
	Host    string
	Path    string
	Header  http.Header
	Trailer http.Header
}

// echoBackend serves on a loopback port and answers every request with
// what it saw, as JSON. It counts requests.
func echoBackend(t *testing.T) (addr string, hits *atomic.Int32) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hits = new(atomic.Int32)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		io.Copy(io.Discard, r.Body) // trailers arrive after the body
		json.NewEncoder(w).Encode(echoed{Host: r.Host, Path: r.URL.Path, Header: r.Header, Trailer: r.Trailer})
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String(), hits
}

// loopbackListen is the tests' ListenFunc: plain sockets on 127.0.0.x.
func loopbackListen(ap netip.AddrPort) (net.Listener, error) { return net.Listen("tcp", ap.String()) }

// freePort returns a TCP port free on 127.0.0.1 a moment ago.
func freePort(t *testing.T) uint16 {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return uint16(ln.Addr().(*net.TCPAddr).Port)
}

// rawRequest sends req (a request head and body exactly as written) to
// addr and returns the response.
func rawRequest(t *testing.T, addr, req string) *http.Response {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("response: %v", err)
	}
	return resp
}

var (
	alice = &whois.Response{
		Node: whois.Node{ID: 7, Hostname: "laptop", DNSName: "laptop.tailnet.internal.", Tags: []string{}},
		User: "alice@example.com",
		Capabilities: map[string][]json.RawMessage{
			"meshd.dev/cap/webapp": {json.RawMessage(`{"role": "admin"}`)},
			"example.com/cap/b":    {json.RawMessage(`1`), json.RawMessage(`"x"`)},
		},
	}
	ci = &whois.Response{
		Node:         whois.Node{ID: 9, Hostname: "ci-runner", DNSName: "ci-runner.tailnet.internal.", Tags: []string{"tag:ci", "tag:build"}},
		Capabilities: map[string][]json.RawMessage{},
	}
	noDNS = &whois.Response{
		Node: whois.Node{ID: 11, Hostname: "old", Tags: []string{}}, User: "bob", Capabilities: map[string][]json.RawMessage{},
	}
	unicode = &whois.Response{
		Node: whois.Node{ID: 12, Hostname: "u", DNSName: "u.t.", Tags: []string{}}, User: "zoë@exämple.com",
		Capabilities: map[string][]json.RawMessage{},
	}
	self = &whois.Response{Node: whois.Node{ID: 1, Hostname: "me", Tags: []string{}}, User: "alice@example.com", Self: true}
)

// identityOf is the identity headers a backend got, by lowercase name
// with "_" read as "-" (what a CGI-style backend would see).
func identityOf(h http.Header) map[string][]string {
	out := map[string][]string{}
	for k, v := range h {
		if isIdentityHeader(k) {
			key := strings.ReplaceAll(strings.ToLower(k), "_", "-")
			out[key] = append(out[key], v...)
		}
	}
	return out
}

// TestIdentityHeaders runs requests written byte for byte, forged
// identity headers in every spelling included, through a real serve
// listener and ReverseProxy to a backend that echoes what it saw: the
// backend sees exactly the caller's identity, once, and nothing the
// caller sent under an identity name.
func TestIdentityHeaders(t *testing.T) {
	backend, hits := echoBackend(t)
	var who atomic.Pointer[whois.Response]
	s := New(Options{WhoIs: func(ip netip.Addr) (*whois.Response, bool) {
		if ip != netip.MustParseAddr("127.0.0.1") {
			t.Errorf("whois asked about %v, want the caller 127.0.0.1", ip)
		}
		w := who.Load()
		return w, w != nil
	}}, Config{})
	s.Attach(loopbackListen, []netip.Addr{netip.MustParseAddr("127.0.0.1")})
	defer s.Detach()
	port := freePort(t)
	e, err := NewEntry(HTTP, port, "http://"+backend+"/base")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Add(e, func(Config) error { return nil }); err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)

	aliceHeaders := map[string][]string{
		"meshd-user-login":       {"alice@example.com"},
		"meshd-user-name":        {"alice"},
		"meshd-node-name":        {"laptop.tailnet.internal"},
		"meshd-node-id":          {"7"},
		"meshd-app-capabilities": {`{"example.com/cap/b":[1,"x"],"meshd.dev/cap/webapp":[{"role":"admin"}]}`},
		"tailscale-user-login":   {"alice@example.com"},
		"tailscale-user-name":    {"alice"},
		"tailscale-headers-info": {tailscaleHeadersInfo},
	}
	ciHeaders := map[string][]string{
		"meshd-node-name":        {"ci-runner.tailnet.internal"},
		"meshd-node-id":          {"9"},
		"meshd-node-tags":        {"tag:ci,tag:build"},
		"meshd-app-capabilities": {"{}"},
		"tailscale-headers-info": {tailscaleHeadersInfo},
	}
	forged := "Meshd-User-Login: mallory@evil.com\r\n" +
		"meshd-user-login: mallory2@evil.com\r\n" +
		"MESHD-USER-LOGIN: mallory3@evil.com\r\n" +
		"Meshd_User_Login: mallory4@evil.com\r\n" +
		"meshd_user_name: mallory\r\n" +
		"Meshd-Node-Tags: tag:admin\r\n" +
		"Meshd-Node-ID: 1\r\n" +
		"Meshd-Node-Name: server.tailnet.internal\r\n" +
		"Meshd-App-Capabilities: {\"meshd.dev/cap/webapp\":[{\"role\":\"root\"}]}\r\n" +
		"Meshd-Future-Header: x\r\n" +
		"Tailscale-User-Login: mallory@evil.com\r\n" +
		"tailscale-user-login: mallory@evil.com\r\n" +
		"Tailscale_User_Name: Mallory\r\n" +
		"Tailscale-User-Profile-Pic: https://evil.com/a.png\r\n" +
		"Tailscale-App-Capabilities: {}\r\n"
	tests := []struct {
		name    string
		who     *whois.Response
		headers string // extra request header lines
		body    string // a chunked body with trailers, if set
		want    map[string][]string
		check   func(t *testing.T, got echoed)
	}{
		{name: "user caller", who: alice, want: aliceHeaders},
		{name: "tagged caller: tags, no user", who: ci, want: ciHeaders},
		{name: "forged headers, user caller", who: alice, headers: forged, want: aliceHeaders},
		{name: "forged user headers, tagged caller", who: ci, headers: forged, want: ciHeaders},
		{
			name: "Connection naming an identity header cannot drop it", who: alice, want: aliceHeaders,
			headers: "Connection: Meshd-User-Login, Tailscale-User-Login, keep-alive\r\n",
		},
		{
			name: "forged identity in trailers", who: alice, want: aliceHeaders,
			headers: "Transfer-Encoding: chunked\r\nTrailer: Meshd-User-Login, Tailscale-User-Login\r\n",
			body:    "3\r\nabc\r\n0\r\nMeshd-User-Login: mallory@evil.com\r\nTailscale-User-Login: mallory@evil.com\r\n\r\n",
			check: func(t *testing.T, got echoed) {
				if len(identityOf(got.Trailer)) != 0 {
					t.Errorf("trailers reached the backend: %v", got.Trailer)
				}
			},
		},
		{
			name: "forwarding headers are the proxy's own", who: alice, want: aliceHeaders,
			headers: "X-Forwarded-For: 10.9.9.9\r\nX-Forwarded-Host: evil.com\r\nX-Forwarded-Proto: https\r\nForwarded: for=10.9.9.9\r\n",
			check: func(t *testing.T, got echoed) {
				if xff := got.Header.Values("X-Forwarded-For"); !slices.Equal(xff, []string{"127.0.0.1"}) {
					t.Errorf("X-Forwarded-For %q, want the caller only", xff)
				}
				if h := got.Header.Get("X-Forwarded-Host"); h != "laptop-facing.example:80" {
					t.Errorf("X-Forwarded-Host %q", h)
				}
				if p := got.Header.Get("X-Forwarded-Proto"); p != "http" {
					t.Errorf("X-Forwarded-Proto %q", p)
				}
				if f := got.Header.Get("Forwarded"); f != "" {
					t.Errorf("Forwarded %q reached the backend", f)
				}
			},
		},
		{
			name: "no DNS name: the hostname", who: noDNS,
			want: map[string][]string{
				"meshd-user-login": {"bob"}, "meshd-user-name": {"bob"}, "meshd-node-name": {"old"}, "meshd-node-id": {"11"},
				"meshd-app-capabilities": {"{}"}, "tailscale-user-login": {"bob"}, "tailscale-user-name": {"bob"},
				"tailscale-headers-info": {tailscaleHeadersInfo},
			},
		},
		{
			name: "non-ASCII login is Q-encoded", who: unicode,
			want: map[string][]string{
				"meshd-user-login": {"=?utf-8?q?zo=C3=AB@ex=C3=A4mple.com?="}, "meshd-user-name": {"=?utf-8?q?zo=C3=AB?="},
				"meshd-node-name": {"u.t"}, "meshd-node-id": {"12"}, "meshd-app-capabilities": {"{}"},
				"tailscale-user-login": {"=?utf-8?q?zo=C3=AB@ex=C3=A4mple.com?="}, "tailscale-user-name": {"=?utf-8?q?zo=C3=AB?="},
				"tailscale-headers-info": {tailscaleHeadersInfo},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			who.Store(tt.who)
			req := "GET /x HTTP/1.1\r\nHost: laptop-facing.example:80\r\n" + tt.headers
			if tt.body != "" {
				req = strings.Replace(req, "GET", "POST", 1) + "\r\n" + tt.body
			} else {
				req += "\r\n"
			}
			resp := rawRequest(t, addr, req)
			defer resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				b, _ := io.ReadAll(resp.Body)
				t.Fatalf("status %s: %s", resp.Status, b)
			}
			var got echoed
			if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
				t.Fatal(err)
			}
			if ids := identityOf(got.Header); !mapsEqual(ids, tt.want) {
				t.Errorf("backend saw identity headers\n%v\nwant\n%v", ids, tt.want)
			}
			if got.Host != "laptop-facing.example:80" || got.Path != "/base/x" {
				t.Errorf("backend saw Host %q path %q, want the caller's Host and /base/x", got.Host, got.Path)
			}
			if tt.check != nil {
				tt.check(t, got)
			}
		})
	}

	// Callers serve does not speak for get 403 and never reach the backend.
	before := hits.Load()
	for _, w := range []*whois.Response{nil, self} {
		who.Store(w)
		resp := rawRequest(t, addr, "GET / HTTP/1.1\r\nHost: x\r\nMeshd-User-Login: alice@example.com\r\n\r\n")
		resp.Body.Close()
		if resp.StatusCode != http.StatusForbidden {
			t.Errorf("caller %+v: status %s, want 403", w, resp.Status)
		}
	}
	if n := hits.Load() - before; n != 0 {
		t.Errorf("the backend got %d requests from callers that are not peers", n)
	}
}

func mapsEqual(a, b map[string][]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if !slices.Equal(v, b[k]) {
			return false
		}
	}
	return true
}
