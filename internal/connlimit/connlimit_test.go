package connlimit

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// pipeListener hands out in-memory connections, so the limits can be
// tested inside a synctest bubble with its fake clock.
type pipeListener struct {
	conns  chan net.Conn
	closed chan struct{}
	once   sync.Once
}

func newPipeListener() *pipeListener {
	return &pipeListener{conns: make(chan net.Conn), closed: make(chan struct{})}
}

// sourceConn is a server-side pipe end that says where it comes from.
type sourceConn struct {
	net.Conn
	src string
}

func (l *pipeListener) dial(src string) net.Conn {
	client, server := net.Pipe()
	select {
	case l.conns <- &sourceConn{server, src}:
	case <-l.closed:
		client.Close()
	}
	return client
}

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

func (l *pipeListener) Close() error   { l.once.Do(func() { close(l.closed) }); return nil }
func (l *pipeListener) Addr() net.Addr { return pipeAddr{} }

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "pipe" }

func sourceOf(c net.Conn) (string, error) {
	if sc, ok := c.(*sourceConn); ok && sc.src != "" {
		return sc.src, nil
	}
	return "", errors.New("no source")
}

// closedWithin reports whether the server closed c (a read ends with EOF)
// within d, ignoring any bytes the server sent first.
func closedWithin(c net.Conn, d time.Duration) bool {
	c.SetReadDeadline(time.Now().Add(d))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	return err == nil || !(errors.As(err, &ne) && ne.Timeout())
}

type addrConn struct {
	net.Conn
	addr net.Addr
}

func (c addrConn) RemoteAddr() net.Addr { return c.addr }

func TestRemoteIP(t *testing.T) {
	tests := []struct {
		addr    net.Addr
		want    string
		wantErr bool
	}{
		{&net.TCPAddr{IP: net.ParseIP("192.0.2.1"), Port: 5}, "192.0.2.1", false},
		{&net.TCPAddr{IP: net.ParseIP("::ffff:192.0.2.1"), Port: 5}, "192.0.2.1", false},
		{&net.TCPAddr{IP: net.ParseIP("2001:db8:1:2:3:4:5:6"), Port: 7}, "2001:db8:1:2::/64", false},
		{&net.TCPAddr{IP: net.ParseIP("2001:db8:1:2:ffff::1"), Port: 7}, "2001:db8:1:2::/64", false},
		{&net.TCPAddr{IP: net.ParseIP("fe80::1"), Port: 1, Zone: "eth0"}, "fe80::/64", false},
		{pipeAddr{}, "", true},
		{&net.UnixAddr{Name: "@", Net: "unix"}, "", true},
	}
	for _, tt := range tests {
		t.Run(tt.addr.String(), func(t *testing.T) {
			got, err := RemoteIP(addrConn{addr: tt.addr})
			if (err != nil) != tt.wantErr || got != tt.want {
				t.Fatalf("RemoteIP(%s) = %q, %v; want %q, error %v", tt.addr, got, err, tt.want, tt.wantErr)
			}
		})
	}
}

func TestCaps(t *testing.T) {
	// A step dials from src, or closes the connection dialled at step
	// close-1 (close > 0).
	type step struct {
		src       string // "" with close == 0: a connection without a source
		close     int
		wantAdmit bool
	}
	tests := []struct {
		name             string
		perSource, tot   int
		steps            []step
		wantRefused      uint64
		wantOpenAtTheEnd int
	}{
		{"per source", 2, 10, []step{
			{src: "a", wantAdmit: true}, {src: "a", wantAdmit: true}, {src: "a"},
			{src: "b", wantAdmit: true}, // another source still gets in
			{close: 1}, {src: "a", wantAdmit: true}, {src: "a"},
		}, 2, 3},
		{"total", 5, 2, []step{
			{src: "a", wantAdmit: true}, {src: "b", wantAdmit: true}, {src: "c"}, {src: "a"},
			{close: 2}, {src: "c", wantAdmit: true},
		}, 2, 2},
		{"no source", 5, 5, []step{{src: ""}, {src: "a", wantAdmit: true}}, 1, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				pl := newPipeListener()
				l := Limits{PerSource: tt.perSource, Total: tt.tot, Source: sourceOf, AuthenticatedAtAccept: true}.Listener(pl)
				accepted := make(chan net.Conn)
				go func() {
					defer close(accepted)
					for {
						c, err := l.Accept()
						if err != nil {
							return
						}
						accepted <- c
					}
				}()
				server := map[int]net.Conn{}
				for i, s := range tt.steps {
					if s.close > 0 {
						server[s.close-1].Close()
						continue
					}
					var client net.Conn
					go func() { client = pl.dial(s.src) }()
					synctest.Wait()
					select {
					case c := <-accepted:
						server[i] = c
						if !s.wantAdmit {
							t.Fatalf("step %d: connection from %q admitted", i, s.src)
						}
					default:
						if s.wantAdmit {
							t.Fatalf("step %d: connection from %q refused", i, s.src)
						}
						// A refused connection is closed at once.
						if _, err := client.Read(make([]byte, 1)); err != io.EOF {
							t.Fatalf("step %d: refused connection read: %v, want EOF", i, err)
						}
					}
				}
				st := l.Stats()
				if st.Refused != tt.wantRefused || st.Open != tt.wantOpenAtTheEnd {
					t.Fatalf("stats %+v, want %d refused and %d open", st, tt.wantRefused, tt.wantOpenAtTheEnd)
				}
				pl.Close()
				<-accepted
				for _, c := range server {
					c.Close()
				}
			})
		})
	}
}

func TestHandshakeTimeout(t *testing.T) {
	const timeout = 3 * time.Second
	tests := []struct {
		name         string
		atAccept     bool
		authAfter    time.Duration // < 0: never
		wantClosedAt time.Duration // 0: stays open
	}{
		{"never authenticated", false, -1, timeout},
		{"authenticated in time", false, time.Second, 0},
		{"authenticated too late", false, timeout + time.Second, timeout},
		{"authenticated at accept", true, -1, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				pl := newPipeListener()
				l := Limits{HandshakeTimeout: timeout, Source: sourceOf, AuthenticatedAtAccept: tt.atAccept}.Listener(pl)
				go pl.dial("a")
				c, err := l.Accept()
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				start := time.Now()
				if tt.authAfter >= 0 {
					time.AfterFunc(tt.authAfter, func() {
						ok := c.(*Conn).Authenticate()
						if ok != (tt.wantClosedAt == 0) {
							t.Errorf("Authenticate after %v = %v", tt.authAfter, ok)
						}
					})
				}
				c.SetReadDeadline(start.Add(time.Minute))
				_, err = c.Read(make([]byte, 1))
				got := time.Since(start)
				if tt.wantClosedAt == 0 {
					var ne net.Error
					if !errors.As(err, &ne) || !ne.Timeout() {
						t.Fatalf("read ended after %v with %v; want the connection open until the test's own deadline", got, err)
					}
					return
				}
				if !errors.Is(err, net.ErrClosed) && !errors.Is(err, io.ErrClosedPipe) || got != tt.wantClosedAt {
					t.Fatalf("read ended after %v with %v; want closed after %v", got, err, tt.wantClosedAt)
				}
				if st := l.Stats(); st.HandshakeTimeouts != 1 || st.Open != 0 {
					t.Fatalf("stats %+v, want one timeout and nothing open", st)
				}
			})
		})
	}
}

// TestLimitBody drives a real http.Server over in-memory connections with
// clients that trickle their body, and with one that streams a long
// response after a complete body.
func TestLimitBody(t *testing.T) {
	const bound = 5 * time.Second
	tests := []struct {
		name    string
		handler http.HandlerFunc
		// trickle: body bytes sent one per second (of 100 declared)
		trickle bool
		// wantCut: the connection is closed within bound; else the
		// response streams for longer than bound.
		wantCut bool
	}{
		{"handler reads", func(w http.ResponseWriter, r *http.Request) { io.Copy(io.Discard, r.Body) }, true, true},
		{"handler returns without reading", func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("no")) }, true, true},
		{"handler reads part", func(w http.ResponseWriter, r *http.Request) { r.Body.Read(make([]byte, 1)) }, true, true},
		{"stream after a complete body", func(w http.ResponseWriter, r *http.Request) {
			io.Copy(io.Discard, r.Body)
			for i := range 4 {
				select {
				case <-r.Context().Done():
					return
				case <-time.After(bound / 2):
				}
				fmt.Fprintf(w, "tick %d\n", i)
				w.(http.Flusher).Flush()
			}
		}, false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				pl := newPipeListener()
				lim := Limits{BodyTimeout: bound, Source: sourceOf, AuthenticatedAtAccept: true}
				srv := lim.Server(tt.handler)
				done := make(chan struct{})
				go func() { srv.Serve(lim.Listener(pl)); close(done) }()
				defer func() { srv.Close(); <-done }()

				c := pl.dial("a")
				defer c.Close()
				body := strings.Repeat("x", 100)
				if tt.trickle {
					trickled := make(chan struct{})
					go func() {
						defer close(trickled)
						fmt.Fprintf(c, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
						for i := range body {
							if _, err := c.Write([]byte{body[i]}); err != nil {
								return
							}
							time.Sleep(time.Second)
						}
					}()
					start := time.Now()
					closed := closedWithin(c, time.Minute)
					got := time.Since(start)
					c.Close()
					<-trickled
					if !closed {
						t.Fatal("connection of a trickling client still open after a minute")
					}
					if got > bound {
						t.Fatalf("trickling client cut after %v, want within %v", got, bound)
					}
					return
				}
				go fmt.Fprintf(c, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n%s", body)
				start := time.Now()
				resp, err := http.ReadResponse(bufio.NewReader(c), nil)
				if err != nil {
					t.Fatal(err)
				}
				data, err := io.ReadAll(resp.Body)
				if err != nil || strings.Count(string(data), "tick") != 4 {
					t.Fatalf("stream read %q, %v; want 4 ticks", data, err)
				}
				if got := time.Since(start); got <= bound {
					t.Fatalf("stream took %v, want longer than the body bound %v", got, bound)
				}
			})
		})
	}
}

// TestAuthenticateThroughContext: a handler finds its connection from the
// request context, under the http.Server Limits.Server builds.
func TestAuthenticateThroughContext(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		pl := newPipeListener()
		lim := Limits{HandshakeTimeout: 2 * time.Second, Source: sourceOf}
		l := lim.Listener(pl)
		srv := lim.Server(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/login" && !Authenticate(r.Context()) {
				t.Error("Authenticate found no connection")
			}
		}))
		done := make(chan struct{})
		go func() { srv.Serve(l); close(done) }()
		defer func() { srv.Close(); <-done }()
		for _, tc := range []struct {
			path     string
			wantOpen bool
		}{{"/public", false}, {"/login", true}} {
			c := pl.dial("a")
			br := bufio.NewReader(c)
			fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: x\r\n\r\n", tc.path)
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			// Keep-alive: the connection stays until the idle timeout
			// (2m) unless the handshake deadline closes it first.
			c.SetReadDeadline(time.Now().Add(time.Minute))
			_, err = br.ReadByte()
			var ne net.Error
			open := errors.As(err, &ne) && ne.Timeout()
			if open != tc.wantOpen {
				t.Errorf("%s: connection open after a minute: %v (read: %v)", tc.path, open, err)
			}
			c.Close()
		}
	})
}
