package control

import (
	"bufio"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/derp"
	"meshd.dev/meshd/internal/connlimit"
	"meshd.dev/meshd/internal/tlspin"
	"meshd.dev/meshd/netmap"
)

// Adversarial tests of the coordinator's connection limits, each against a
// real coordinator with raw clients. The limits are times, so the tests
// run in synctest bubbles on in-memory connections (memserver_test.go):
// each bound is checked exactly, in no wall time, whatever the load.

// dialFrom connects to ts, a coordinator of startMemServer, from the
// address src.
func dialFrom(t *testing.T, src string, ts *testServer) net.Conn {
	t.Helper()
	c, err := ts.dial(context.Background(), src)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// tlsFrom completes a TLS handshake with the coordinator, pinned, offering
// only proto, and presenting mk's certificate when mk is not nil.
func tlsFrom(t *testing.T, src string, ts *testServer, proto string, mk ed25519.PrivateKey) *tls.Conn {
	t.Helper()
	cfg := tlspin.ClientConfig(func() string { return ts.Fingerprint() })
	cfg.NextProtos = []string{proto}
	if mk != nil {
		cert, err := tlspin.SelfSigned(mk, "raw", nil)
		if err != nil {
			t.Fatal(err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	c := tls.Client(dialFrom(t, src, ts), cfg)
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if err := c.Handshake(); err != nil {
		t.Fatalf("TLS handshake from %s: %v", src, err)
	}
	c.SetDeadline(time.Time{})
	return c
}

// serverClosed reports whether the peer closed c within d: a read ends
// with EOF or a reset rather than the timeout. Bytes sent before are
// discarded. c must have no other reader.
func serverClosed(c net.Conn, d time.Duration) bool {
	c.SetReadDeadline(time.Now().Add(d))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	return !(errors.As(err, &ne) && ne.Timeout())
}

// get sends one keep-alive HTTP/1.1 request on c and reads the answer.
func get(c net.Conn, br *bufio.Reader, path, token string) (int, error) {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	auth := ""
	if token != "" {
		auth = "Authorization: Bearer " + token + "\r\n"
	}
	if _, err := fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: coord\r\n%s\r\n", path, auth); err != nil {
		return 0, err
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return 0, err
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode, nil
}

func adminToken(t *testing.T, ts *testServer) string {
	t.Helper()
	b, err := os.ReadFile(ts.AdminTokenPath())
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// trickle sends one byte of body per second until the connection fails
// or done is closed.
func trickle(w io.Writer, done <-chan struct{}) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		if _, err := w.Write([]byte("{")); err != nil {
			return
		}
		select {
		case <-done:
			return
		case <-t.C:
		}
	}
}

// TestTricklingBodyIsCut: a client that sends its headers and then one
// byte of body per second is disconnected within the body bound, whether
// the handler reads the body, gives up on it, or never reads it (then
// net/http drains it before answering: that drain is bounded too).
func TestTricklingBodyIsCut(t *testing.T) {
	const bound = connlimit.DefaultBodyTimeout
	// The handshake deadline is long so that only the body bound can cut
	// the unauthenticated cases.
	opts := ServerOptions{Limits: connlimit.Limits{HandshakeTimeout: time.Hour}}
	tests := []struct {
		name, method, path string
		token              string // "admin": the admin token
		machine            bool   // present a machine key
	}{
		{"admin handler that never reads the body", "POST", "/admin/v1/keys/nope/revoke", "admin", false},
		{"admin handler that reads the body", "POST", "/admin/v1/keys", "admin", false},
		{"policy upload", "PUT", "/admin/v1/policy", "admin", false},
		{"admin refused before reading", "POST", "/admin/v1/keys", "wrong", false},
		{"machine registration", "POST", "/machine/register", "", true},
		{"public endpoint", "POST", DERPMapPath, "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			synctest.Test(t, func(t *testing.T) {
				ts := startMemServer(t, opts)
				token := tt.token
				if token == "admin" {
					token = adminToken(t, ts)
				}
				var mk ed25519.PrivateKey
				if tt.machine {
					_, mk, _ = ed25519.GenerateKey(rand.Reader)
				}
				c := tlsFrom(t, "127.0.0.1", ts, "http/1.1", mk)
				auth := ""
				if token != "" {
					auth = "Authorization: Bearer " + token + "\r\n"
				}
				fmt.Fprintf(c, "%s %s HTTP/1.1\r\nHost: coord\r\n%sContent-Length: 1000\r\n\r\n", tt.method, tt.path, auth)
				done := make(chan struct{})
				defer close(done)
				go trickle(c, done)
				start := time.Now()
				if !serverClosed(c, time.Hour) {
					t.Fatal("still connected an hour after the headers")
				}
				if took := time.Since(start); took > bound {
					t.Fatalf("closed %v after the headers; the body bound is %v", took, bound)
				}
			})
		})
	}
	t.Run("HTTP/2 stream", func(t *testing.T) {
		t.Parallel()
		synctest.Test(t, func(t *testing.T) {
			ts := startMemServer(t, opts)
			pr, pw := io.Pipe()
			done := make(chan struct{})
			defer close(done)
			go trickle(pw, done)
			req, _ := http.NewRequest("POST", ts.url+"/admin/v1/keys", pr)
			req.Header.Set("Authorization", "Bearer "+adminToken(t, ts))
			start := time.Now()
			resp, err := memHTTP(t, ts, nil).Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if took := time.Since(start); took > bound || resp.StatusCode != http.StatusBadRequest || resp.ProtoMajor != 2 {
				t.Fatalf("%s %d after %v; want HTTP/2 400 within %v", resp.Proto, resp.StatusCode, took, bound)
			}
		})
	})
}

// TestConnectionCaps: connections over the per-source or the total cap
// are closed as soon as they are accepted, while another source (under
// the per-source cap) still gets served, and a closed connection frees
// its place.
func TestConnectionCaps(t *testing.T) {
	tests := []struct {
		name             string
		perSource, total int
		overSource       string // source of the connection over the cap
		servedSource     string // "": nobody else fits
	}{
		{"per source", 3, 100, "127.0.0.1", "127.0.0.2"},
		{"total", 100, 3, "127.0.0.2", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				ts := startMemServer(t, ServerOptions{Limits: connlimit.Limits{PerSource: tt.perSource, Total: tt.total, HandshakeTimeout: time.Hour}})
				held := make([]net.Conn, 3)
				for i := range held {
					held[i] = tlsFrom(t, "127.0.0.1", ts, "http/1.1", nil)
				}
				// Refused at accept: closed before any time passes. A
				// connection let in stays open for the header timeout
				// (the TLS handshake's bound).
				over := dialFrom(t, tt.overSource, ts)
				if !serverClosed(over, time.Second) {
					t.Fatalf("connection from %s over the cap stayed open", tt.overSource)
				}
				if tt.servedSource != "" {
					c := tlsFrom(t, tt.servedSource, ts, "http/1.1", nil)
					if _, err := get(c, bufio.NewReader(c), DERPMapPath, ""); err != nil {
						t.Fatalf("other source not served: %v", err)
					}
				}
				held[0].Close()
				synctest.Wait() // the coordinator has seen it close
				if serverClosed(dialFrom(t, tt.overSource, ts), time.Second) {
					t.Fatal("a closed connection did not free its place")
				}
			})
		})
	}
}

// unauthEnv is a coordinator with a short handshake deadline and what
// TestUnauthenticatedConnectionsClosed's clients use.
type unauthEnv struct {
	ts       *testServer
	admin    string  // the admin token
	enrolled rawNode // a registered machine
	stranger ed25519.PrivateKey
	mapBody  []byte // enrolled's map request (no stream)
}

// TestUnauthenticatedConnectionsClosed: a connection is closed at the
// handshake timeout whatever it does (no TLS, a TLS handshake it never
// finishes, public requests, an idle HTTP/2 connection, requests that
// prove nothing) until a request authenticates it; then it stays.
func TestUnauthenticatedConnectionsClosed(t *testing.T) {
	// Shorter than the header timeout (which bounds the TLS handshake
	// too), so that only the handshake deadline can close the connections
	// at hs.
	const hs = 3 * time.Second
	setup := func(t *testing.T) *unauthEnv {
		ts := startMemServer(t, ServerOptions{Limits: connlimit.Limits{HandshakeTimeout: hs}, KeepAliveInterval: hs / 4})
		key := ts.key(t, AuthKeyOptions{Reusable: true, Preauthorized: true, User: "alice"})
		e := &unauthEnv{ts: ts, admin: adminToken(t, ts), enrolled: enrolRaw(t, ts, key, "enrolled")}
		_, e.stranger, _ = ed25519.GenerateKey(rand.Reader)
		e.mapBody, _ = json.Marshal(netmap.MapRequest{Version: netmap.ProtocolVersion, NodeKey: e.enrolled.nk.Public(), DiscoKey: e.enrolled.dk.Public()})
		return e
	}
	post := func(c net.Conn, br *bufio.Reader, path string, body []byte) (int, error) {
		fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: coord\r\nContent-Length: %d\r\n\r\n%s", path, len(body), body)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			return 0, err
		}
		io.Copy(io.Discard, resp.Body)
		return resp.StatusCode, nil
	}
	tests := []struct {
		name string
		// open connects and does what the client does before waiting.
		open     func(t *testing.T, e *unauthEnv) net.Conn
		wantKept bool
	}{
		{"TCP without a TLS handshake", func(t *testing.T, e *unauthEnv) net.Conn { return dialFrom(t, "127.0.0.1", e.ts) }, false},
		{"TLS handshake never finished", func(t *testing.T, e *unauthEnv) net.Conn {
			c := dialFrom(t, "127.0.0.1", e.ts)
			c.Write([]byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01}) // a ClientHello record, 1 of 512 bytes
			return c
		}, false},
		{"public requests only", func(t *testing.T, e *unauthEnv) net.Conn {
			c := tlsFrom(t, "127.0.0.1", e.ts, "http/1.1", nil)
			br := bufio.NewReader(c)
			for range 4 { // until hs/4 before the deadline
				if code, err := get(c, br, DERPMapPath, ""); err != nil || code != http.StatusNotFound {
					t.Fatalf("public request: %d %v", code, err)
				}
				time.Sleep(hs / 5)
			}
			return c
		}, false},
		{"idle HTTP/2", func(t *testing.T, e *unauthEnv) net.Conn {
			c := tlsFrom(t, "127.0.0.1", e.ts, "h2", nil)
			c.Write([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"))
			return c
		}, false},
		{"wrong admin token", func(t *testing.T, e *unauthEnv) net.Conn {
			c := tlsFrom(t, "127.0.0.1", e.ts, "http/1.1", nil)
			if code, err := get(c, bufio.NewReader(c), "/admin/v1/nodes", "msadm-wrong"); err != nil || code != http.StatusUnauthorized {
				t.Fatalf("wrong token: %d %v", code, err)
			}
			return c
		}, false},
		{"machine key not enrolled", func(t *testing.T, e *unauthEnv) net.Conn {
			c := tlsFrom(t, "127.0.0.1", e.ts, "http/1.1", e.stranger)
			if code, err := post(c, bufio.NewReader(c), "/machine/map", e.mapBody); err != nil || code == http.StatusOK {
				t.Fatalf("unknown machine's map request: %d %v", code, err)
			}
			return c
		}, false},
		{"admin token", func(t *testing.T, e *unauthEnv) net.Conn {
			c := tlsFrom(t, "127.0.0.1", e.ts, "http/1.1", nil)
			if code, err := get(c, bufio.NewReader(c), "/admin/v1/nodes", e.admin); err != nil || code != http.StatusOK {
				t.Fatalf("admin request: %d %v", code, err)
			}
			return c
		}, true},
		{"enrolled machine", func(t *testing.T, e *unauthEnv) net.Conn {
			c := tlsFrom(t, "127.0.0.1", e.ts, "http/1.1", e.enrolled.mk)
			if code, err := post(c, bufio.NewReader(c), "/machine/map", e.mapBody); err != nil || code != http.StatusOK {
				t.Fatalf("enrolled machine's map request: %d %v", code, err)
			}
			return c
		}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			synctest.Test(t, func(t *testing.T) {
				e := setup(t)
				start := time.Now()
				c := tt.open(t, e)
				if tt.wantKept {
					if serverClosed(c, 2*hs) {
						t.Fatalf("authenticated connection closed after %v", time.Since(start))
					}
					return
				}
				if !serverClosed(c, 2*hs) {
					t.Fatalf("unauthenticated connection still open %v after connecting", time.Since(start))
				}
				if took := time.Since(start); took != hs {
					t.Fatalf("unauthenticated connection closed %v after connecting; want at the handshake timeout, %v", took, hs)
				}
			})
		})
	}

	t.Run("map stream over HTTP/2", func(t *testing.T) {
		// How nodes talk to the coordinator: the stream (keep-alives every
		// hs/4) must outlive the handshake deadline.
		t.Parallel()
		synctest.Test(t, func(t *testing.T) {
			e := setup(t)
			body, _ := json.Marshal(netmap.MapRequest{Version: netmap.ProtocolVersion, NodeKey: e.enrolled.nk.Public(), DiscoKey: e.enrolled.dk.Public(), Stream: true})
			resp, err := memHTTP(t, e.ts, e.enrolled.mk).Post(e.ts.url+"/machine/map", "application/json", strings.NewReader(string(body)))
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			if resp.StatusCode != http.StatusOK || resp.ProtoMajor != 2 {
				t.Fatalf("%s %d", resp.Proto, resp.StatusCode)
			}
			start := time.Now()
			for time.Since(start) < 2*hs {
				if _, _, err := controlclient.ReadMapResponse(resp.Body, nil); err != nil {
					t.Fatalf("map stream ended %v after it opened: %v", time.Since(start), err)
				}
			}
		})
	})
	t.Run("map stream of the node client (HTTP/1.1)", func(t *testing.T) {
		// controlclient streams over HTTP/1.1, a connection of its own:
		// the stream must outlive the handshake deadline and the request
		// body's read deadline (connlimit.LimitBody), which on HTTP/1.1
		// is the connection's.
		t.Parallel()
		synctest.Test(t, func(t *testing.T) {
			e := setup(t)
			c, err := controlclient.NewClient(controlclient.ClientOptions{
				URL: e.ts.url, MachineKey: e.enrolled.mk, NodeKey: e.enrolled.nk, ServerPin: e.ts.Fingerprint(),
				DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) { return e.ts.dial(ctx, "127.0.0.1") },
			})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() {
				done <- c.Follow(ctx, netmap.MapRequest{NodeKey: e.enrolled.nk.Public(), DiscoKey: e.enrolled.dk.Public()}, func(*netmap.NetworkMap) {})
			}()
			session := func() *session {
				e.ts.hub.mu.Lock()
				defer e.ts.hub.mu.Unlock()
				if ss := e.ts.hub.sessions[netmap.NodeID(1)]; len(ss) == 1 {
					return ss[0]
				}
				return nil
			}
			synctest.Wait()
			first := session()
			if first == nil {
				t.Fatal("no map stream open")
			}
			time.Sleep(2 * max(hs, connlimit.DefaultBodyTimeout))
			if now := session(); now != first {
				t.Fatalf("the stream was replaced (%p, then %p) within %v", first, now, 2*max(hs, connlimit.DefaultBodyTimeout))
			}
			cancel()
			if err := <-done; !errors.Is(err, context.Canceled) {
				t.Fatalf("Follow: %v", err)
			}
		})
	})
	t.Run("embedded relay client", func(t *testing.T) {
		t.Parallel()
		synctest.Test(t, func(t *testing.T) {
			e := setup(t)
			ds, err := derp.NewServer(derp.ServerOptions{PrivateKey: netmap.NewNodePrivate(), Verify: e.ts.VerifyNodeKey})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { ds.Close() })
			e.ts.Handle("/derp", ds)
			dc, err := derp.Dial(context.Background(), e.ts.url, derp.ClientOptions{
				NodeKey: e.enrolled.nk, CertFingerprint: e.ts.Fingerprint(),
				DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) { return e.ts.dial(ctx, "127.0.0.1") },
			})
			if err != nil {
				t.Fatal(err)
			}
			defer dc.Close()
			time.Sleep(2 * hs) // past the handshake deadline
			if err := dc.Send(e.enrolled.nk.Public(), []byte("still here")); err != nil {
				t.Fatal(err)
			}
			for {
				m, err := dc.Recv()
				if err != nil {
					t.Fatalf("relay connection of a node that completed the DERP handshake: %v", err)
				}
				if p, ok := m.(derp.ReceivedPacket); ok && string(p.Data) == "still here" {
					return
				}
			}
		})
	})
}

// TestMapStreamsPerNode: a node that opens 10 map streams holds at most
// MaxStreamsPerNode of them; the newest win and the oldest are closed.
func TestMapStreamsPerNode(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	n := newTestNode(t, ts.url, ts.Fingerprint())
	n.mustRegister(t, ts.key(t, AuthKeyOptions{Preauthorized: true, User: "alice"}), "greedy")
	hc := machineHTTP(t, ts.Fingerprint(), n.mk)
	body, _ := json.Marshal(netmap.MapRequest{Version: netmap.ProtocolVersion, NodeKey: n.nk.Public(), DiscoKey: n.dk.Public(), Stream: true})

	const opened = 10
	ended := make([]chan error, opened)
	for i := range opened {
		req, _ := http.NewRequest("POST", ts.url+"/machine/map", strings.NewReader(string(body)))
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { resp.Body.Close() })
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("stream %d: %s", i, controlclient.ReadAPIError(resp))
		}
		if _, _, err := controlclient.ReadMapResponse(resp.Body, nil); err != nil {
			t.Fatalf("stream %d: first frame: %v", i, err)
		}
		ended[i] = make(chan error, 1)
		go func() {
			_, err := io.Copy(io.Discard, resp.Body)
			ended[i] <- err
		}()
	}
	for i := range opened - MaxStreamsPerNode {
		select {
		case <-ended[i]:
		case <-time.After(10 * time.Second):
			t.Fatalf("stream %d of %d still open: a node may hold at most %d", i, opened, MaxStreamsPerNode)
		}
	}
	waitFor(t, "the dropped sessions to unsubscribe", func() bool {
		ts.hub.mu.Lock()
		defer ts.hub.mu.Unlock()
		return len(ts.hub.sessions[n.id]) == MaxStreamsPerNode
	})
	for i := opened - MaxStreamsPerNode; i < opened; i++ {
		select {
		case err := <-ended[i]:
			t.Fatalf("stream %d (one of the newest %d) ended: %v", i, MaxStreamsPerNode, err)
		default:
		}
	}
	if !ts.hub.online(n.id) {
		t.Fatal("node offline while it holds streams")
	}
}
