package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"testing"
	"time"

	"meshd.dev/meshd/derp"
	"meshd.dev/meshd/internal/connlimit"
	"meshd.dev/meshd/internal/tlspin"
	"meshd.dev/meshd/netmap"
)

// Adversarial tests of the standalone relay's connection limits: a real
// `meshd derp` server on loopback and raw clients.

// limitSlack is what a bound may be overrun by on a loaded machine.
const limitSlack = 1500 * time.Millisecond

// startOpenRelay runs the relay as `meshd derp --open-relay` does, with
// lim instead of the default limits.
func startOpenRelay(t *testing.T, lim connlimit.Limits) netmap.DERPNode {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	c := &cli{stdout: pw, stderr: io.Discard, log: slog.New(slog.DiscardHandler)}
	done := make(chan error, 1)
	go func() {
		done <- c.runDERP(ctx, derpConfig{listen: "127.0.0.1:0", limits: lim})
		pw.Close()
	}()
	node, found := readDERPNode(t, pr)
	if !found {
		cancel()
		t.Fatalf("relay did not start: %v", <-done)
	}
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("relay: %v", err)
		}
	})
	return node
}

func relayAddr(n netmap.DERPNode) string { return net.JoinHostPort(n.Host, strconv.Itoa(n.DERPPort)) }

// dialRelayFrom opens a TCP connection to the relay from loopback address
// src (127.0.0.2 is a second source: all of 127/8 is on lo).
func dialRelayFrom(t *testing.T, src string, n netmap.DERPNode) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", relayAddr(n))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func tlsToRelay(t *testing.T, src string, n netmap.DERPNode) *tls.Conn {
	t.Helper()
	cfg := tlspin.ClientConfig(func() string { return n.CertFingerprint })
	cfg.NextProtos = []string{"http/1.1"}
	c := tls.Client(dialRelayFrom(t, src, n), cfg)
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if err := c.Handshake(); err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Time{})
	return c
}

// peerClosed reports whether the relay closed c within d.
func peerClosed(c net.Conn, d time.Duration) bool {
	c.SetReadDeadline(time.Now().Add(d))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	return !(errors.As(err, &ne) && ne.Timeout())
}

// TestRelayClosesUnauthenticatedConnections: whatever a client does short
// of completing the relay handshake (no TLS, a TLS handshake it never
// finishes, a trickled request body, an upgrade without the relay
// handshake) its connection is closed at the handshake timeout; a relay
// client that completed it stays.
func TestRelayClosesUnauthenticatedConnections(t *testing.T) {
	const hs = time.Second
	node := startOpenRelay(t, connlimit.Limits{HandshakeTimeout: hs})
	tests := []struct {
		name string
		open func(t *testing.T) net.Conn
	}{
		{"TCP without a TLS handshake", func(t *testing.T) net.Conn { return dialRelayFrom(t, "127.0.0.1", node) }},
		{"TLS handshake never finished", func(t *testing.T) net.Conn {
			c := dialRelayFrom(t, "127.0.0.1", node)
			c.Write([]byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01}) // a ClientHello record, 1 of 512 bytes
			return c
		}},
		{"trickled request body", func(t *testing.T) net.Conn {
			c := tlsToRelay(t, "127.0.0.1", node)
			fmt.Fprintf(c, "POST / HTTP/1.1\r\nHost: relay\r\nContent-Length: 1000\r\n\r\n")
			go func() {
				for {
					if _, err := c.Write([]byte("x")); err != nil {
						return
					}
					time.Sleep(time.Second)
				}
			}()
			return c
		}},
		{"upgraded without the relay handshake", func(t *testing.T) net.Conn {
			c := tlsToRelay(t, "127.0.0.1", node)
			fmt.Fprintf(c, "GET /derp HTTP/1.1\r\nHost: relay\r\nUpgrade: meshd-derp\r\nConnection: Upgrade\r\n\r\n")
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
				t.Fatalf("upgrade: %v %v", resp, err)
			}
			return c
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			start := time.Now()
			c := tt.open(t)
			if !peerClosed(c, hs+limitSlack-time.Since(start)) {
				t.Fatalf("still connected %v after connecting; handshake timeout %v", time.Since(start).Round(time.Millisecond), hs)
			}
		})
	}
	t.Run("relay client", func(t *testing.T) {
		t.Parallel()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		k := netmap.NewNodePrivate()
		dc, err := derp.Dial(ctx, "https://"+relayAddr(node), derp.ClientOptions{NodeKey: k, CertFingerprint: node.CertFingerprint})
		if err != nil {
			t.Fatal(err)
		}
		defer dc.Close()
		time.Sleep(2 * hs) // past the handshake deadline
		if err := dc.Send(k.Public(), []byte("still here")); err != nil {
			t.Fatal(err)
		}
		for {
			m, err := dc.Recv()
			if err != nil {
				t.Fatalf("relay client after the handshake deadline: %v", err)
			}
			if p, ok := m.(derp.ReceivedPacket); ok && string(p.Data) == "still here" {
				return
			}
		}
	})
}

// TestRelayConnectionCapPerIP: `meshd derp --max-conns-per-ip 2` closes a
// third connection from one address at once, while another address is
// still served.
func TestRelayConnectionCapPerIP(t *testing.T) {
	node, _ := startDERP(t, "--open-relay", "--listen", "127.0.0.1:0", "--stun-listen", "", "--max-conns-per-ip", "2")
	for range 2 {
		dialRelayFrom(t, "127.0.0.1", node)
	}
	if !peerClosed(dialRelayFrom(t, "127.0.0.1", node), 5*time.Second) {
		t.Fatal("third connection from one address stayed open under --max-conns-per-ip 2")
	}
	c := tlsToRelay(t, "127.0.0.2", node)
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "GET /derp/probe HTTP/1.1\r\nHost: relay\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil || resp.StatusCode != http.StatusNoContent {
		t.Fatalf("another address: %v %v", resp, err)
	}
}
