/* SPDX-License-Identifier: MIT
 *
 * Copyright (C) 2026 meshd authors: this file is meshd's, not upstream's.
 */

package device_test

import (
	"context"
	"crypto/ecdh"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	stock "golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun"
	"golang.zx2c4.com/wireguard/tun/netstack"

	"meshd.dev/meshd/internal/wireguard/device"
)

// wgDevice is what the test needs of either device package.
type wgDevice interface {
	IpcSet(string) error
	IpcGet() (string, error)
	Up() error
	Close()
}

// interopEnd is one end of the tunnel: a device, its netstack and its
// tunnel address.
type interopEnd struct {
	dev  wgDevice
	net  *netstack.Net
	addr netip.Addr
	priv *ecdh.PrivateKey
}

func newInteropEnd(t *testing.T, addr string, fork bool) *interopEnd {
	t.Helper()
	e := &interopEnd{addr: netip.MustParseAddr(addr)}
	tdev, tnet, err := netstack.CreateNetTUN([]netip.Addr{e.addr}, nil, 1420)
	if err != nil {
		t.Fatalf("netstack: %v", err)
	}
	e.net = tnet
	if e.priv, err = ecdh.X25519().GenerateKey(rand.Reader); err != nil {
		t.Fatal(err)
	}
	e.dev = newDevice(tdev, fork)
	t.Cleanup(e.dev.Close)
	if err := e.dev.IpcSet("private_key=" + hex.EncodeToString(e.priv.Bytes()) + "\nlisten_port=0\n"); err != nil {
		t.Fatalf("configure: %v", err)
	}
	if err := e.dev.Up(); err != nil {
		t.Fatalf("up: %v", err)
	}
	return e
}

func newDevice(tdev tun.Device, fork bool) wgDevice {
	// The real UDP bind, with GSO and GRO where the kernel has them.
	if fork {
		d := device.NewDevice(tdev, conn.NewDefaultBind(), device.NewLogger(device.LogLevelError, "fork: "))
		d.SetRunToCompletion(true)
		return d
	}
	return stock.NewDevice(tdev, conn.NewDefaultBind(), stock.NewLogger(stock.LogLevelError, "stock: "))
}

func (e *interopEnd) port(t *testing.T) int {
	t.Helper()
	cfg, err := e.dev.IpcGet()
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(cfg) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "listen_port="); ok {
			p, err := strconv.Atoi(v)
			if err != nil {
				t.Fatal(err)
			}
			return p
		}
	}
	t.Fatal("no listen_port in the device's configuration")
	return 0
}

// peerWith configures e to reach o on loopback.
func (e *interopEnd) peerWith(t *testing.T, o *interopEnd) {
	t.Helper()
	cfg := fmt.Sprintf("public_key=%s\nendpoint=127.0.0.1:%d\nallowed_ip=%s/32\n",
		hex.EncodeToString(o.priv.PublicKey().Bytes()), o.port(t), o.addr)
	if err := e.dev.IpcSet(cfg); err != nil {
		t.Fatalf("configure peer: %v", err)
	}
}

// TestInteropWithStock runs a TCP transfer of a few MB, checked by hash,
// and a numbered UDP stream, checked for order, each way between the fork
// (running batches to completion) and stock wireguard-go, over real UDP
// sockets on loopback.
func TestInteropWithStock(t *testing.T) {
	fork := newInteropEnd(t, "10.99.0.1", true)
	upstream := newInteropEnd(t, "10.99.0.2", false)
	fork.peerWith(t, upstream)
	upstream.peerWith(t, fork)
	forkDev := fork.dev.(*device.Device)

	tests := []struct {
		name     string
		from, to *interopEnd
	}{
		{"fork to stock", fork, upstream},
		{"stock to fork", upstream, fork},
	}
	for i, tt := range tests {
		t.Run(tt.name+" TCP", func(t *testing.T) {
			tcpTransfer(t, tt.from, tt.to, uint16(7000+i), 8<<20)
		})
		t.Run(tt.name+" UDP order", func(t *testing.T) {
			udpOrder(t, tt.from, tt.to, uint16(7100+i), 2000)
		})
	}
	st := forkDev.InlineStats()
	if st.OutInline == 0 || st.InInline == 0 {
		t.Errorf("fork stats %+v: want batches run to completion both ways", st)
	}
	t.Logf("fork: %+v", st)
}

func tcpTransfer(t *testing.T, from, to *interopEnd, port uint16, size int) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	ln, err := to.net.ListenTCPAddrPort(netip.AddrPortFrom(to.addr, port))
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	defer ln.Close()
	type result struct {
		sum [sha256.Size]byte
		n   int64
		err error
	}
	got := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- result{err: err}
			return
		}
		defer c.Close()
		h := sha256.New()
		n, err := io.Copy(h, c)
		var r result
		copy(r.sum[:], h.Sum(nil))
		r.n, r.err = n, err
		got <- r
	}()

	c, err := from.net.DialContextTCPAddrPort(ctx, netip.AddrPortFrom(to.addr, port))
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	data := make([]byte, size)
	rng := mrand.NewChaCha8([32]byte{byte(port)})
	_, _ = rng.Read(data)
	want := sha256.Sum256(data)
	if _, err := c.Write(data); err != nil {
		t.Fatalf("write: %v", err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatalf("close write: %v", err)
	}
	defer c.Close()
	select {
	case r := <-got:
		if r.err != nil {
			t.Fatalf("receive: %v", r.err)
		}
		if r.n != int64(size) || r.sum != want {
			t.Fatalf("received %d bytes, sha256 %x; sent %d, sha256 %x", r.n, r.sum, size, want)
		}
	case <-ctx.Done():
		t.Fatal("transfer did not finish")
	}
}

// udpOrder sends n numbered datagrams, in windows so as not to overrun the
// receiving netstack's socket buffer, and checks that those that arrive
// arrive in order (UDP may drop, it must not reorder here) and that nearly
// all arrive.
func udpOrder(t *testing.T, from, to *interopEnd, port uint16, n int) {
	rx, err := to.net.ListenUDPAddrPort(netip.AddrPortFrom(to.addr, port))
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	defer rx.Close()
	tx, err := from.net.DialUDPAddrPort(netip.AddrPort{}, netip.AddrPortFrom(to.addr, port))
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer tx.Close()

	const window = 100
	seen := make(chan int, n) // each sequence number received, in order of arrival
	done := make(chan error, 1)
	go func() {
		defer close(seen)
		buf := make([]byte, 2048)
		last := -1
		for last < n-1 {
			if err := rx.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
				done <- err
				return
			}
			m, err := rx.Read(buf)
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					done <- nil // the rest was dropped
					return
				}
				done <- err
				return
			}
			seq := int(binary.BigEndian.Uint32(buf[:m]))
			if seq <= last {
				done <- fmt.Errorf("datagram %d after %d: reordered", seq, last)
				return
			}
			last = seq
			seen <- seq
		}
		done <- nil
	}()
	msg := make([]byte, 200)
	received := 0
	for start := 0; start < n; start += window {
		end := min(start+window, n)
		for seq := start; seq < end; seq++ {
			binary.BigEndian.PutUint32(msg, uint32(seq))
			if _, err := tx.Write(msg); err != nil {
				t.Fatalf("send %d: %v", seq, err)
			}
		}
		// Wait for the window's last datagram, or for the receiver to
		// give up on it.
		for seq := range seen {
			received++
			if seq >= end-1 {
				break
			}
		}
	}
	for range seen {
		received++
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if received < n*9/10 {
		t.Fatalf("%d of %d datagrams arrived", received, n)
	}
}
