// Package derpcmp benchmarks meshd's DERP relay side by side with
// Tailscale's (tailscale.com v1.96.0, the server cmd/derper runs, driven by
// its own derphttp client). It is a separate module so the main module
// never depends on tailscale.com.
package derpcmp

import (
	"context"
	"crypto/tls"
	"encoding/pem"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/derp/derpserver"
	"tailscale.com/net/netmon"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"

	mderp "meshd.dev/meshd/derp"
	"meshd.dev/meshd/internal/tlspin"
	"meshd.dev/meshd/netmap"
)

// pair is two clients of one relay: a sends to b.
type pair struct {
	send func(pkt []byte) error
	// recv returns the next packet's bytes (nil for other messages).
	recv  func() ([]byte, error)
	close func()
}

// relayCert is the certificate both relays serve in TLS runs. Tailscale's
// client verifies against the system roots, which TestMain points at it
// through SSL_CERT_FILE; meshd's client pins its fingerprint.
var relayCert tls.Certificate

func TestMain(m *testing.M) {
	cert, err := mderp.NewSelfSignedCert([]string{"127.0.0.1"})
	if err != nil {
		panic(err)
	}
	relayCert = cert
	f, err := os.CreateTemp("", "derpcmp-ca-*.pem")
	if err != nil {
		panic(err)
	}
	pem.Encode(f, &pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]})
	f.Close()
	os.Setenv("SSL_CERT_FILE", f.Name())
	code := m.Run()
	os.Remove(f.Name())
	os.Exit(code)
}

func serve(h http.Handler, useTLS bool) *httptest.Server {
	if !useTLS {
		return httptest.NewServer(h)
	}
	hs := httptest.NewUnstartedServer(h)
	hs.TLS = &tls.Config{Certificates: []tls.Certificate{relayCert}, NextProtos: []string{"http/1.1"}}
	hs.StartTLS()
	return hs
}

func meshdPair(b *testing.B, useTLS bool) pair {
	s, err := mderp.NewServer(mderp.ServerOptions{PrivateKey: netmap.NewNodePrivate()})
	if err != nil {
		b.Fatal(err)
	}
	hs := serve(s, useTLS)
	ka, kb := netmap.NewNodePrivate(), netmap.NewNodePrivate()
	ctx := context.Background()
	fp := tlspin.Fingerprint(relayCert.Leaf)
	a, err := mderp.Dial(ctx, hs.URL, mderp.ClientOptions{NodeKey: ka, CertFingerprint: fp})
	if err != nil {
		b.Fatal(err)
	}
	c, err := mderp.Dial(ctx, hs.URL, mderp.ClientOptions{NodeKey: kb, CertFingerprint: fp})
	if err != nil {
		b.Fatal(err)
	}
	dst := kb.Public()
	return pair{
		send: func(pkt []byte) error { return a.Send(dst, pkt) },
		recv: func() ([]byte, error) {
			m, err := c.Recv()
			if p, ok := m.(mderp.ReceivedPacket); ok {
				return p.Data, nil
			}
			return nil, err
		},
		close: func() { a.Close(); c.Close(); s.Close(); hs.Close() },
	}
}

func tailscalePair(b *testing.B, useTLS bool) pair {
	s := derpserver.New(key.NewNode(), logger.Discard)
	hs := serve(derpserver.Handler(s), useTLS)
	ka, kb := key.NewNode(), key.NewNode()
	mk := func(k key.NodePrivate) *derphttp.Client {
		c, err := derphttp.NewClient(k, hs.URL+"/derp", logger.Discard, netmon.NewStatic())
		if err != nil {
			b.Fatal(err)
		}
		if err := c.Connect(context.Background()); err != nil {
			b.Fatal(err)
		}
		return c
	}
	a, c := mk(ka), mk(kb)
	dst := kb.Public()
	return pair{
		send: func(pkt []byte) error { return a.Send(dst, pkt) },
		recv: func() ([]byte, error) {
			m, err := c.Recv()
			if p, ok := m.(derp.ReceivedPacket); ok {
				return p.Data, nil
			}
			return nil, err
		},
		close: func() { a.Close(); c.Close(); s.Close(); hs.Close() },
	}
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// relay sends b.N packets of size bytes from a to b and reports what
// arrived. With window 0 the sender blasts as fast as its connection takes
// packets; relays drop when a receiver's queue is full, so delivered
// throughput, not sent, is the figure. With a window the sender keeps at
// most that many packets in flight, like a flow-controlled stream through
// the tunnel, which measures relay capacity without loss.
func relay(b *testing.B, p pair, size, window int) {
	defer p.close()
	// Wait until both ends are registered: send probes until one arrives.
	warm := make([]byte, size)
	warm[0] = 0xfe
	got := make(chan struct{})
	var delivered, bytes atomic.Int64
	end := make(chan struct{})
	var credit chan struct{}
	if window > 0 {
		credit = make(chan struct{}, window)
	}
	var recvErr error
	go func() {
		warmed := false
		for {
			d, err := p.recv()
			if err != nil {
				// A relay that dropped the receiver (e.g. as a slow
				// reader on an overloaded machine) ends the run.
				recvErr = err
				close(end)
				return
			}
			if d == nil {
				continue
			}
			switch d[0] {
			case 0xfe:
				if !warmed {
					warmed = true
					close(got)
				}
			case 0xff:
				close(end)
				return
			default:
				delivered.Add(1)
				bytes.Add(int64(len(d)))
				if credit != nil {
					select {
					case <-credit:
					default:
					}
				}
			}
		}
	}()
	for warming := true; warming; {
		p.send(warm)
		select {
		case <-got:
			warming = false
		case <-end:
			b.Fatalf("receiver lost its relay connection while warming up: %v", recvErr)
		case <-time.After(10 * time.Millisecond):
		}
	}
	pkt := make([]byte, size)
	fin := make([]byte, size)
	fin[0] = 0xff
	b.ResetTimer()
	cpu0, t0 := cpuTime(), time.Now()
	var stall *time.Timer
	for range b.N {
		if credit != nil {
			select {
			case credit <- struct{}{}:
			default:
				// Window full: wait for a delivery, or after a while
				// count the oldest packet as lost so a drop cannot
				// stall the run.
				if stall == nil {
					stall = time.NewTimer(50 * time.Millisecond)
				} else {
					stall.Reset(50 * time.Millisecond)
				}
				select {
				case credit <- struct{}{}:
				case <-stall.C:
					// The receiver may have freed credit meanwhile;
					// never block on taking it back.
					select {
					case <-credit:
					default:
					}
					credit <- struct{}{}
				}
			}
		}
		if err := p.send(pkt); err != nil {
			b.Fatal(err)
		}
	}
	// The end marker may itself be dropped; repeat until it lands.
	for done := false; !done; {
		p.send(fin)
		select {
		case <-end:
			done = true
		case <-time.After(time.Millisecond):
		}
	}
	elapsed, cpu := time.Since(t0), cpuTime()-cpu0
	b.StopTimer()
	if recvErr != nil {
		b.Fatalf("receiver lost its relay connection: %v", recvErr)
	}
	n := delivered.Load()
	b.ReportMetric(float64(bytes.Load())*8/elapsed.Seconds()/1e9, "Gbit/s")
	b.ReportMetric(float64(n)/elapsed.Seconds(), "pkts/s")
	b.ReportMetric(100*float64(n)/float64(b.N), "%delivered")
	if n > 0 {
		b.ReportMetric(float64(cpu.Nanoseconds())/float64(n), "cpu-ns/pkt")
	}
}

var impls = []struct {
	name string
	mk   func(*testing.B, bool) pair
}{{"meshd", meshdPair}, {"tailscale", tailscalePair}}

// BenchmarkRelay: a sender as fast as TCP lets it (relays drop the excess).
func BenchmarkRelay(b *testing.B) {
	for _, size := range []int{64, 1420, 8192} {
		for _, impl := range impls {
			b.Run(fmt.Sprintf("blast/%dB/%s", size, impl.name), func(b *testing.B) {
				relay(b, impl.mk(b, false), size, 0)
			})
		}
	}
}

// BenchmarkRelayWindowed: at most 32 packets in flight (Tailscale's
// per-client queue depth), so neither relay needs to drop; over plain
// HTTP and over TLS as deployed.
func BenchmarkRelayWindowed(b *testing.B) {
	for _, useTLS := range []bool{false, true} {
		transport := map[bool]string{false: "http", true: "tls"}[useTLS]
		for _, size := range []int{64, 1420, 8192} {
			for _, impl := range impls {
				b.Run(fmt.Sprintf("window32/%s/%dB/%s", transport, size, impl.name), func(b *testing.B) {
					relay(b, impl.mk(b, useTLS), size, 32)
				})
			}
		}
	}
}

// BenchmarkRelayOneInFlight: one packet at a time, so nothing can be
// coalesced: per-packet relay latency (ns/op) and cost.
func BenchmarkRelayOneInFlight(b *testing.B) {
	for _, impl := range impls {
		b.Run(fmt.Sprintf("window1/http/1420B/%s", impl.name), func(b *testing.B) {
			relay(b, impl.mk(b, false), 1420, 1)
		})
	}
}
