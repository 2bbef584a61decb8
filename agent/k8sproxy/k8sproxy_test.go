package k8sproxy

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"meshd.dev/meshd/agent/whois"
)

// recorder is a fake API server that keeps the headers of each request.
type recorder struct {
	mu   sync.Mutex
	got  []http.Header
	reqs []string
}

func (rc *recorder) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	rc.mu.Lock()
	h := r.Header.Clone()
	for k, v := range r.Trailer {
		h["Trailer-"+k] = v
	}
	rc.got = append(rc.got, h)
	rc.reqs = append(rc.reqs, r.Method+" "+r.URL.RequestURI())
	rc.mu.Unlock()
	io.Copy(io.Discard, r.Body)
	fmt.Fprint(w, "upstream ok")
}

func (rc *recorder) last(t *testing.T) http.Header {
	t.Helper()
	rc.mu.Lock()
	defer rc.mu.Unlock()
	if len(rc.got) == 0 {
		t.Fatal("the upstream got no request")
	}
	return rc.got[len(rc.got)-1]
}

func (rc *recorder) count() int {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return len(rc.got)
}

func caps(vals ...string) map[string][]json.RawMessage {
	m := map[string][]json.RawMessage{}
	for _, v := range vals {
		name, val, _ := strings.Cut(v, "=")
		m[name] = append(m[name], json.RawMessage(val))
	}
	return m
}

// setup runs a proxy on 127.0.0.1 whose caller (127.0.0.1 itself) is who;
// nil who means whois does not know the address.
func setup(t *testing.T, mode Mode, who *whois.Response) (addr string, rc *recorder) {
	t.Helper()
	rc = &recorder{}
	up := httptest.NewServer(rc)
	t.Cleanup(up.Close)
	u, _ := url.Parse(up.URL)
	tok := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tok, []byte("proxy-sa-token\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	p, err := New(Options{
		Mode: mode, Upstream: u, Transport: http.DefaultTransport, TokenFile: tok,
		WhoIs: func(ip netip.Addr) (*whois.Response, bool) {
			if who == nil || ip != netip.MustParseAddr("127.0.0.1") {
				return nil, false
			}
			return who, true
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(p)
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://"), rc
}

// raw sends req as bytes, so that header names keep whatever case and
// spelling the test gives them, and returns the status code and body.
func raw(t *testing.T, addr, req string) (int, string) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, strings.ReplaceAll(req, "\n", "\r\n")); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

var alice = &whois.Response{
	Node: whois.Node{ID: 1, Hostname: "laptop", DNSName: "laptop.meshd.internal."},
	User: "alice@example.com",
	Capabilities: caps(
		`tailscale.com/cap/kubernetes={"impersonate":{"groups":["viewers"]}}`,
		`meshd.dev/cap/kubernetes={"impersonate":{"groups":["system:masters","viewers"]}}`,
		`meshd.dev/cap/webapp={"impersonate":{"groups":["not-kubernetes"]}}`,
	),
}

var ci = &whois.Response{
	Node:         whois.Node{ID: 2, Hostname: "ci", DNSName: "ci.meshd.internal.", Tags: []string{"tag:ci"}},
	Capabilities: caps(`tailscale.com/cap/kubernetes={"impersonate":{"groups":["deployers"]}}`),
}

// TestImpersonation sends forged credentials in every spelling a caller
// might try and checks that the API server sees exactly the proxy's.
func TestImpersonation(t *testing.T) {
	forged := "Authorization: Bearer stolen\n" +
		"authorization: Basic Zm9vOmJhcg==\n" +
		"Impersonate-User: system:admin\n" +
		"IMPERSONATE-GROUP: system:masters\n" +
		"impersonate-group: evil\n" +
		"Impersonate-Uid: 0\n" +
		"Impersonate-Extra-Scopes: all\n" +
		"Impersonate_User: system:admin\n" +
		"X-Remote-User: system:admin\n" +
		"X-Remote-Group: system:masters\n" +
		"Connection: Impersonate-Group, X-Keep\n" +
		"X-Keep: 1\n"
	tests := []struct {
		name   string
		who    *whois.Response
		req    string
		user   string
		groups []string
	}{
		{"user, no forgery", alice, "GET /api/v1/pods HTTP/1.1\nHost: k8s\n\n", "alice@example.com", []string{"system:masters", "viewers"}},
		{"user, forged headers", alice, "GET /api/v1/pods HTTP/1.1\nHost: k8s\n" + forged + "\n", "alice@example.com", []string{"system:masters", "viewers"}},
		{"tagged, forged headers", ci, "GET /apis HTTP/1.1\nHost: k8s\n" + forged + "\n", "ci.meshd.internal", []string{"deployers", "tag:ci"}},
		{"forged in trailers", alice, "POST /api/v1/namespaces HTTP/1.1\nHost: k8s\nTrailer: Impersonate-User, Authorization\nTransfer-Encoding: chunked\n\n2\n{}\n0\nImpersonate-User: system:admin\nAuthorization: Bearer stolen\n\n", "alice@example.com", []string{"system:masters", "viewers"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			addr, rc := setup(t, ModeAuth, tt.who)
			code, body := raw(t, addr, tt.req)
			if code != http.StatusOK {
				t.Fatalf("status %d: %s", code, body)
			}
			h := rc.last(t)
			if got := h.Values("Impersonate-User"); !slices.Equal(got, []string{tt.user}) {
				t.Errorf("Impersonate-User = %q, want %q", got, tt.user)
			}
			if got := h.Values("Impersonate-Group"); !slices.Equal(got, tt.groups) {
				t.Errorf("Impersonate-Group = %q, want %q", got, tt.groups)
			}
			if got := h.Values("Authorization"); !slices.Equal(got, []string{"Bearer proxy-sa-token"}) {
				t.Errorf("Authorization = %q, want the proxy's token only", got)
			}
			for k := range h {
				n := strings.ToLower(strings.ReplaceAll(k, "_", "-"))
				if strings.HasPrefix(n, "x-remote-") || strings.HasPrefix(n, "trailer-") ||
					(strings.HasPrefix(n, "impersonate-") && k != "Impersonate-User" && k != "Impersonate-Group") {
					t.Errorf("forwarded %s: %q", k, h[k])
				}
			}
		})
	}
}

func TestDenied(t *testing.T) {
	bob := &whois.Response{Node: whois.Node{ID: 3, DNSName: "bob.meshd.internal."}, User: "bob@example.com",
		Capabilities: caps(`meshd.dev/cap/webapp={}`)}
	self := &whois.Response{Node: whois.Node{ID: 0, DNSName: "proxy.meshd.internal."}, Self: true}
	malformed := &whois.Response{Node: whois.Node{ID: 4, DNSName: "m.meshd.internal."}, User: "m@example.com",
		Capabilities: caps(`meshd.dev/cap/kubernetes={"impersonate":{"groups":"system:masters"}}`)}
	recorded := &whois.Response{Node: whois.Node{ID: 5, DNSName: "r.meshd.internal."}, User: "r@example.com",
		Capabilities: caps(`tailscale.com/cap/kubernetes={"impersonate":{"groups":["a"]},"enforceRecorder":true}`)}
	tests := []struct {
		name string
		who  *whois.Response
		path string
		body string
	}{
		{"no capability", bob, "/api", "tailscale.com/cap/kubernetes"},
		{"unknown address", nil, "/api", "tailnet peers only"},
		{"the node itself", self, "/api", "tailnet peers only"},
		{"malformed capability", malformed, "/api", "meshd.dev/cap/kubernetes"},
		{"exec needs a recorder", recorded, "/api/v1/namespaces/default/pods/p/exec", "session recording"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			addr, rc := setup(t, ModeAuth, tt.who)
			code, body := raw(t, addr, "GET "+tt.path+" HTTP/1.1\nHost: k8s\nAuthorization: Bearer x\n\n")
			if code != http.StatusForbidden || !strings.Contains(body, tt.body) {
				t.Errorf("got %d %q, want 403 mentioning %q", code, body, tt.body)
			}
			if n := rc.count(); n != 0 {
				t.Errorf("the upstream got %d requests", n)
			}
		})
	}
	// The recorder rule still allows what is not a session.
	addr, rc := setup(t, ModeAuth, recorded)
	if code, body := raw(t, addr, "GET /api/v1/pods HTTP/1.1\nHost: k8s\n\n"); code != http.StatusOK {
		t.Fatalf("list pods with enforceRecorder: %d %s", code, body)
	}
	if got := rc.last(t).Values("Impersonate-Group"); !slices.Equal(got, []string{"a"}) {
		t.Errorf("groups %q", got)
	}
}

// TestNoAuth: the caller's own credentials reach the API server untouched,
// the proxy's token never does; non-peers are still refused.
func TestNoAuth(t *testing.T) {
	addr, rc := setup(t, ModeNoAuth, &whois.Response{Node: whois.Node{ID: 3, DNSName: "bob.meshd.internal."}, User: "bob@example.com"})
	code, body := raw(t, addr, "GET /api HTTP/1.1\nHost: k8s\nAuthorization: Bearer bobs-own\nImpersonate-User: someone\n\n")
	if code != http.StatusOK {
		t.Fatalf("status %d %s", code, body)
	}
	h := rc.last(t)
	if got := h.Values("Authorization"); !slices.Equal(got, []string{"Bearer bobs-own"}) {
		t.Errorf("Authorization = %q", got)
	}
	if got := h.Get("Impersonate-User"); got != "someone" {
		t.Errorf("Impersonate-User = %q: the caller's own request should pass", got)
	}
	addr, rc = setup(t, ModeNoAuth, nil)
	if code, _ := raw(t, addr, "GET /api HTTP/1.1\nHost: k8s\n\n"); code != http.StatusForbidden || rc.count() != 0 {
		t.Errorf("unknown caller: %d, upstream got %d", code, rc.count())
	}
}

func TestStripCredentials(t *testing.T) {
	h := http.Header{
		"Authorization": {"a"}, "authorization": {"b"}, "Impersonate-User": {"u"}, "impersonate_group": {"g"},
		"IMPERSONATE-EXTRA-X": {"x"}, "Impersonate-Uid": {"1"}, "X-Remote-Extra-Y": {"y"}, "Proxy-Authorization": {"p"},
		"Accept": {"application/json"}, "User-Agent": {"kubectl"}, "X-Impersonate-User": {"kept: not a header the API server reads"},
	}
	StripCredentials(h)
	var keys []string
	for k := range h {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	if want := []string{"Accept", "User-Agent", "X-Impersonate-User"}; !slices.Equal(keys, want) {
		t.Errorf("left %q, want %q", keys, want)
	}
}

func TestParseMode(t *testing.T) {
	for _, tt := range []struct {
		in string
		ok bool
	}{{"auth", true}, {"noauth", true}, {"", false}, {"Auth", false}, {"none", false}} {
		if _, err := ParseMode(tt.in); (err == nil) != tt.ok {
			t.Errorf("ParseMode(%q) err = %v", tt.in, err)
		}
	}
}

// TestUpgrade: exec, attach and port-forward upgrade the connection
// (SPDY or WebSocket); the upgraded request carries the proxy's
// impersonation, not the caller's, and bytes flow both ways after it.
func TestUpgrade(t *testing.T) {
	var mu sync.Mutex
	var got http.Header
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "SPDY/3.1" {
			http.Error(w, "want an upgrade", http.StatusBadRequest)
			return
		}
		mu.Lock()
		got = r.Header.Clone()
		mu.Unlock()
		c, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\r\n")
		brw.Flush()
		buf := make([]byte, 4)
		if _, err := io.ReadFull(brw, buf); err == nil {
			c.Write(append([]byte("echo:"), buf...))
		}
	}))
	defer up.Close()
	u, _ := url.Parse(up.URL)
	tok := filepath.Join(t.TempDir(), "token")
	os.WriteFile(tok, []byte("proxy-sa-token"), 0o600)
	p, err := New(Options{Mode: ModeAuth, Upstream: u, Transport: &http.Transport{}, TokenFile: tok,
		WhoIs: func(netip.Addr) (*whois.Response, bool) { return alice, true }})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(p)
	defer srv.Close()
	c, err := net.Dial("tcp", strings.TrimPrefix(srv.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "POST /api/v1/namespaces/default/pods/web-1/exec?command=sh HTTP/1.1\r\nHost: k8s\r\n"+
		"Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\nImpersonate-User: system:admin\r\nImpersonate-Group: evil\r\nAuthorization: Bearer stolen\r\n\r\n")
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %v %v", resp, err)
	}
	io.WriteString(c, "ping")
	echo := make([]byte, 9)
	if _, err := io.ReadFull(br, echo); err != nil || string(echo) != "echo:ping" {
		t.Fatalf("after the upgrade: %q %v", echo, err)
	}
	mu.Lock()
	defer mu.Unlock()
	if got.Get("Impersonate-User") != "alice@example.com" || !slices.Equal(got.Values("Impersonate-Group"), []string{"system:masters", "viewers"}) ||
		!slices.Equal(got.Values("Authorization"), []string{"Bearer proxy-sa-token"}) {
		t.Errorf("upgraded request reached the API server with %v", got)
	}
}
