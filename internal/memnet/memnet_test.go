package memnet

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"
	"testing/synctest"
	"time"
)

var server = netip.MustParseAddrPort("192.0.2.1:443")

// TestAddresses: each end sees the other's address; the server sees the
// source the client dialled from, on a new port each time.
func TestAddresses(t *testing.T) {
	l := Listen(server)
	defer l.Close()
	tests := []struct {
		name string
		dial func() (net.Conn, error)
		src  netip.Addr
	}{
		{"Dial", func() (net.Conn, error) { return l.Dial(context.Background(), netip.MustParseAddr("10.0.0.2")) }, netip.MustParseAddr("10.0.0.2")},
		{"Dial IPv6", func() (net.Conn, error) { return l.Dial(context.Background(), netip.MustParseAddr("2001:db8::2")) }, netip.MustParseAddr("2001:db8::2")},
		{"DialContext", func() (net.Conn, error) { return l.DialContext(context.Background(), "tcp", "ignored:1") }, netip.MustParseAddr("127.0.0.1")},
	}
	ports := map[int]bool{}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			accepted := make(chan net.Conn, 1)
			go func() {
				c, _ := l.Accept()
				accepted <- c
			}()
			c, err := tt.dial()
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			s := <-accepted
			defer s.Close()
			from := s.RemoteAddr().(*net.TCPAddr)
			if from.AddrPort().Addr() != tt.src || c.LocalAddr().String() != from.String() {
				t.Fatalf("server sees %v, client is %v; want source %v", from, c.LocalAddr(), tt.src)
			}
			if ports[from.Port] {
				t.Fatalf("port %d handed out twice", from.Port)
			}
			ports[from.Port] = true
			if c.RemoteAddr().String() != server.String() || s.LocalAddr().String() != server.String() {
				t.Fatalf("client dialled %v, server is %v; want %v", c.RemoteAddr(), s.LocalAddr(), server)
			}
			go c.Write([]byte("hi"))
			buf := make([]byte, 2)
			if _, err := io.ReadFull(s, buf); err != nil || string(buf) != "hi" {
				t.Fatalf("read %q, %v", buf, err)
			}
		})
	}
}

func TestDialFails(t *testing.T) {
	l := Listen(server)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := l.Dial(ctx, netip.MustParseAddr("10.0.0.2")); !errors.Is(err, context.Canceled) {
		t.Fatalf("dial with a canceled context: %v", err)
	}
	l.Close()
	if _, err := l.Dial(context.Background(), netip.MustParseAddr("10.0.0.2")); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("dial after Close: %v", err)
	}
	if _, err := l.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept after Close: %v", err)
	}
}

// TestDeadlineInBubble: a read deadline on a connection fires at its exact
// time on the bubble's clock, which is what the package is for.
func TestDeadlineInBubble(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := Listen(server)
		defer l.Close()
		go func() {
			s, err := l.Accept()
			if err == nil {
				io.Copy(io.Discard, s) // never writes
				s.Close()
			}
		}()
		c, err := l.DialContext(context.Background(), "tcp", "")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		start := time.Now()
		c.SetReadDeadline(start.Add(10 * time.Second))
		_, err = c.Read(make([]byte, 1))
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() || time.Since(start) != 10*time.Second {
			t.Fatalf("read ended after %v with %v; want a timeout after 10s", time.Since(start), err)
		}
	})
}
