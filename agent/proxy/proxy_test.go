package proxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

func TestReadRequest(t *testing.T) {
	for _, tc := range []struct {
		name    string
		in      []byte
		want    string
		wantRep byte // 0 with wantErr: no reply expected
		wantErr bool
	}{
		{name: "ipv4", in: []byte{5, 1, 0, 1, 100, 64, 0, 2, 0x1f, 0x90}, want: "100.64.0.2:8080"},
		{name: "ipv6", in: append(append([]byte{5, 1, 0, 4}, bytes.Repeat([]byte{0}, 15)...), 1, 0, 80), want: "[::1]:80"},
		{name: "domain", in: append([]byte{5, 1, 0, 3, 11}, append([]byte("inference-1"), 0, 80)...), want: "inference-1:80"},
		{name: "bind command", in: []byte{5, 2, 0, 1, 1, 2, 3, 4, 0, 80}, wantErr: true, wantRep: repCommandNotSupported},
		{name: "udp associate", in: []byte{5, 3, 0, 1, 1, 2, 3, 4, 0, 80}, wantErr: true, wantRep: repCommandNotSupported},
		{name: "bad atyp", in: []byte{5, 1, 0, 9, 1, 2, 3, 4, 0, 80}, wantErr: true, wantRep: repAddrNotSupported},
		{name: "empty domain", in: []byte{5, 1, 0, 3, 0, 0, 80}, wantErr: true, wantRep: repAddrNotSupported},
		{name: "domain with colon", in: append([]byte{5, 1, 0, 3, 3}, append([]byte("a:b"), 0, 80)...), wantErr: true, wantRep: repAddrNotSupported},
		{name: "port zero", in: []byte{5, 1, 0, 1, 1, 2, 3, 4, 0, 0}, wantErr: true, wantRep: repAddrNotSupported},
		{name: "wrong version", in: []byte{4, 1, 0, 1, 1, 2, 3, 4, 0, 80}, wantErr: true, wantRep: repGeneralFailure},
		{name: "reserved set", in: []byte{5, 1, 7, 1, 1, 2, 3, 4, 0, 80}, wantErr: true, wantRep: repGeneralFailure},
		{name: "truncated address", in: []byte{5, 1, 0, 1, 1, 2}, wantErr: true},
		{name: "truncated domain", in: []byte{5, 1, 0, 3, 10, 'a'}, wantErr: true},
		{name: "empty", in: nil, wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := readRequest(bytes.NewReader(tc.in))
			if tc.wantErr {
				if err == nil {
					t.Fatalf("got %q, want error", got)
				}
				var se *socksError
				rep := byte(0)
				if errors.As(err, &se) {
					rep = se.rep
				}
				if rep != tc.wantRep {
					t.Fatalf("reply code %d, want %d (%v)", rep, tc.wantRep, err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}

func TestReadGreeting(t *testing.T) {
	for _, tc := range []struct {
		in      []byte
		ok, err bool
	}{
		{[]byte{5, 1, 0}, true, false},
		{[]byte{5, 2, 2, 0}, true, false},
		{[]byte{5, 1, 2}, false, false},
		{[]byte{5, 0}, false, true},
		{[]byte{4, 1, 0}, false, true},
		{[]byte{5, 3, 0}, false, true},
	} {
		ok, err := readGreeting(bytes.NewReader(tc.in))
		if ok != tc.ok || (err != nil) != tc.err {
			t.Errorf("readGreeting(%v) = %v, %v", tc.in, ok, err)
		}
	}
}

func FuzzReadRequest(f *testing.F) {
	f.Add([]byte{5, 1, 0, 1, 100, 64, 0, 2, 0x1f, 0x90})
	f.Add(append([]byte{5, 1, 0, 3, 11}, append([]byte("inference-1"), 0, 80)...))
	f.Add(append(append([]byte{5, 1, 0, 4}, bytes.Repeat([]byte{0}, 15)...), 1, 0, 80))
	f.Add([]byte{5, 2, 0, 3, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		// The greeting parser must not panic on the same bytes either.
		readGreeting(bytes.NewReader(data))
		target, err := readRequest(bytes.NewReader(data))
		if err != nil {
			return
		}
		host, port, err := net.SplitHostPort(target)
		if err != nil || host == "" || port == "0" {
			t.Fatalf("accepted request yields bad target %q: %v", target, err)
		}
	})
}

// echoServer returns the address of a loopback TCP server that echoes.
func echoServer(t *testing.T) string {
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
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	return ln.Addr().String()
}

// startProxy runs serve on a loopback listener with a dialer that maps the
// name "peer" to target, the way the agent maps peer hostnames.
func startProxy(t *testing.T, serve func(*Server) func(context.Context, net.Listener) error, target string) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
		host, _, _ := net.SplitHostPort(addr)
		switch host {
		case "peer":
			var d net.Dialer
			return d.DialContext(ctx, network, target)
		case "refused":
			return nil, fmt.Errorf("dial: connection refused")
		}
		return nil, fmt.Errorf("%s: %w", host, ErrNoRoute)
	}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- serve(s)(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	return ln.Addr().String()
}

func TestSOCKS5Connect(t *testing.T) {
	addr := startProxy(t, func(s *Server) func(context.Context, net.Listener) error { return s.ServeSOCKS5 }, echoServer(t))
	for _, tc := range []struct {
		host    string
		wantRep byte
	}{
		{"peer", repSucceeded},
		{"nowhere", repHostUnreachable},
		{"refused", repConnectionRefused},
	} {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		req := []byte{5, 1, 0, 5, 1, 0, 3, byte(len(tc.host))}
		req = append(append(req, tc.host...), 0, 80)
		// Greeting, request and first data in one write: the server must
		// not lose bytes it read ahead.
		req = append(req, "hello"...)
		if _, err := c.Write(req); err != nil {
			t.Fatal(err)
		}
		br := bufio.NewReader(c)
		sel := make([]byte, 2)
		if _, err := io.ReadFull(br, sel); err != nil || sel[1] != authNone {
			t.Fatalf("%s: method selection %v, %v", tc.host, sel, err)
		}
		rep := make([]byte, 10)
		if _, err := io.ReadFull(br, rep); err != nil {
			t.Fatalf("%s: reply: %v", tc.host, err)
		}
		if rep[1] != tc.wantRep {
			t.Fatalf("%s: reply code %d, want %d", tc.host, rep[1], tc.wantRep)
		}
		if tc.wantRep == repSucceeded {
			got := make([]byte, 5)
			if _, err := io.ReadFull(br, got); err != nil || string(got) != "hello" {
				t.Fatalf("echo through proxy: %q, %v", got, err)
			}
		}
		c.Close()
	}
}

func TestSOCKS5RefusesAuthOnlyClient(t *testing.T) {
	addr := startProxy(t, func(s *Server) func(context.Context, net.Listener) error { return s.ServeSOCKS5 }, echoServer(t))
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	c.Write([]byte{5, 1, 2}) // username/password only
	sel := make([]byte, 2)
	if _, err := io.ReadFull(c, sel); err != nil || sel[1] != authNoAcceptable {
		t.Fatalf("selection %v, %v; want no acceptable methods", sel, err)
	}
}

func TestHTTPConnect(t *testing.T) {
	addr := startProxy(t, func(s *Server) func(context.Context, net.Listener) error { return s.ServeHTTPConnect }, echoServer(t))
	for _, tc := range []struct {
		req      string
		wantCode int
	}{
		{"CONNECT peer:80 HTTP/1.1\r\nHost: peer:80\r\n\r\n", 200},
		{"CONNECT nowhere:80 HTTP/1.1\r\nHost: nowhere:80\r\n\r\n", 404},
		{"CONNECT refused:80 HTTP/1.1\r\nHost: refused:80\r\n\r\n", 502},
		{"CONNECT peer HTTP/1.1\r\nHost: peer\r\n\r\n", 400},
		{"CONNECT peer:0 HTTP/1.1\r\nHost: peer:0\r\n\r\n", 400},
		{"GET http://peer/ HTTP/1.1\r\nHost: peer\r\n\r\n", 405},
		{"garbage\r\n\r\n", 400},
	} {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.WriteString(c, tc.req); err != nil {
			t.Fatal(err)
		}
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("%q: %v", tc.req, err)
		}
		if resp.StatusCode != tc.wantCode {
			t.Fatalf("%q: status %d, want %d", strings.SplitN(tc.req, "\r", 2)[0], resp.StatusCode, tc.wantCode)
		}
		if tc.wantCode == 200 {
			io.WriteString(c, "ping")
			got := make([]byte, 4)
			if _, err := io.ReadFull(br, got); err != nil || string(got) != "ping" {
				t.Fatalf("echo through CONNECT: %q, %v", got, err)
			}
		}
		c.Close()
	}
}
