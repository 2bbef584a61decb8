package derp

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"golang.org/x/crypto/nacl/box"
	"golang.org/x/time/rate"

	"meshd.dev/meshd/internal/tlspin"
	"meshd.dev/meshd/netmap"
)

type testServer struct {
	*Server
	url string
	hs  *httptest.Server
}

func newTestServer(t testing.TB, opts ServerOptions) *testServer {
	t.Helper()
	if opts.PrivateKey.IsZero() {
		opts.PrivateKey = netmap.NewNodePrivate()
	}
	s, err := NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(s)
	t.Cleanup(func() { s.Close(); hs.Close() })
	return &testServer{Server: s, url: hs.URL, hs: hs}
}

func dial(t testing.TB, url string, key netmap.NodePrivate) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// Tests manage read deadlines themselves.
	c, err := Dial(ctx, url, ClientOptions{NodeKey: key, IdleTimeout: -1})
	if err != nil {
		t.Fatalf("dial %s: %v", url, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// recvMsg returns the next message that is not a keep-alive, failing the
// test after a deadline.
func recvMsg(t testing.TB, c *Client) Message {
	t.Helper()
	c.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	defer c.conn.SetReadDeadline(time.Time{})
	for {
		m, err := c.Recv()
		if err != nil {
			t.Fatalf("recv: %v", err)
		}
		if _, ok := m.(KeepAlive); ok {
			continue
		}
		if p, ok := m.(ReceivedPacket); ok {
			p.Data = bytes.Clone(p.Data)
			return p
		}
		return m
	}
}

func recvPacket(t testing.TB, c *Client) ReceivedPacket {
	t.Helper()
	for {
		switch m := recvMsg(t, c).(type) {
		case ReceivedPacket:
			return m
		case Health:
			continue
		default:
			t.Fatalf("want a packet, got %#v", m)
		}
	}
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestSendRecvByKey(t *testing.T) {
	srv := newTestServer(t, ServerOptions{})
	ka, kb, kc := netmap.NewNodePrivate(), netmap.NewNodePrivate(), netmap.NewNodePrivate()
	a, b, c := dial(t, srv.url, ka), dial(t, srv.url, kb), dial(t, srv.url, kc)
	waitFor(t, "three clients", func() bool { return srv.Stats().Clients == 3 })

	for _, size := range []int{0, 1, 1420, 9000, MaxPacketSize} {
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			pkt := make([]byte, size)
			for i := range pkt {
				pkt[i] = byte(i*7 + size)
			}
			if err := a.Send(kb.Public(), pkt); err != nil {
				t.Fatal(err)
			}
			// A packet for C sent after the one for B: if C could see B's
			// traffic, C's first packet would be B's.
			marker := []byte("for-c")
			if err := a.Send(kc.Public(), marker); err != nil {
				t.Fatal(err)
			}
			got := recvPacket(t, b)
			if got.Source != ka.Public() || !bytes.Equal(got.Data, pkt) {
				t.Fatalf("B got %d bytes from %s, want %d bytes from A", len(got.Data), got.Source.ShortString(), size)
			}
			gotC := recvPacket(t, c)
			if gotC.Source != ka.Public() || !bytes.Equal(gotC.Data, marker) {
				t.Fatalf("C got %q from %s, want only its own marker", gotC.Data, gotC.Source.ShortString())
			}
		})
	}
	if err := a.Send(kb.Public(), make([]byte, MaxPacketSize+1)); err == nil {
		t.Fatal("client sent a packet above MaxPacketSize")
	}
}

func TestPingPongAndPeerGone(t *testing.T) {
	srv := newTestServer(t, ServerOptions{})
	ka, kb := netmap.NewNodePrivate(), netmap.NewNodePrivate()
	a, b := dial(t, srv.url, ka), dial(t, srv.url, kb)

	data := NewPingData()
	if err := a.Ping(data); err != nil {
		t.Fatal(err)
	}
	if m, ok := recvMsg(t, a).(Pong); !ok || m.Data != data {
		t.Fatalf("want pong %x, got %#v", data, m)
	}

	nobody := netmap.NewNodePrivate().Public()
	if err := a.Send(nobody, []byte("x")); err != nil {
		t.Fatal(err)
	}
	if m, ok := recvMsg(t, a).(PeerGone); !ok || m.Key != nobody || m.Reason != PeerGoneNotHere {
		t.Fatalf("want PeerGone(not here) for unknown key, got %#v", m)
	}

	if err := a.Send(kb.Public(), []byte("hi")); err != nil {
		t.Fatal(err)
	}
	recvPacket(t, b)
	b.Close()
	if m, ok := recvMsg(t, a).(PeerGone); !ok || m.Key != kb.Public() || m.Reason != PeerGoneDisconnected {
		t.Fatalf("want PeerGone(disconnected) for B, got %#v", m)
	}
}

func TestNewestConnectionForKeyWins(t *testing.T) {
	srv := newTestServer(t, ServerOptions{})
	ka, kb := netmap.NewNodePrivate(), netmap.NewNodePrivate()
	a := dial(t, srv.url, ka)
	old := dial(t, srv.url, kb)
	waitFor(t, "two clients", func() bool { return srv.Stats().Clients == 2 })
	cur := dial(t, srv.url, kb)
	// The old connection is closed by the server.
	old.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		_, err := old.Recv()
		if err == nil {
			continue
		}
		if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || strings.Contains(err.Error(), "reset") {
			break
		}
		t.Fatalf("old connection: want closed by server, got %v", err)
	}
	if err := a.Send(kb.Public(), []byte("to-new")); err != nil {
		t.Fatal(err)
	}
	if got := recvPacket(t, cur); string(got.Data) != "to-new" {
		t.Fatalf("new connection got %q", got.Data)
	}
	if n := srv.Stats().Clients; n != 2 {
		t.Fatalf("clients = %d, want 2", n)
	}
}

func TestTLSPinnedFingerprint(t *testing.T) {
	cert, err := NewSelfSignedCert([]string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewServer(ServerOptions{PrivateKey: netmap.NewNodePrivate()})
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewUnstartedServer(s)
	hs.Config.ErrorLog = log.New(io.Discard, "", 0) // the failing cases log TLS errors by design
	hs.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"http/1.1"}}
	hs.StartTLS()
	t.Cleanup(func() { s.Close(); hs.Close() })

	fp := tlspin.Fingerprint(cert.Leaf)
	other, _ := NewSelfSignedCert(nil)
	tests := []struct {
		name    string
		fp      string
		wantErr string
	}{
		{"pinned", fp, ""},
		{"pinned upper case", strings.ToUpper(fp), ""},
		{"wrong pin", tlspin.Fingerprint(other.Leaf), "does not match the pinned"},
		{"malformed pin", "abc", "hex digits"},
		{"no pin, self-signed", "", "certificate"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			c, err := Dial(ctx, hs.URL, ClientOptions{NodeKey: netmap.NewNodePrivate(), CertFingerprint: tt.fp})
			if tt.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				c.Close()
				return
			}
			if err == nil {
				c.Close()
				t.Fatal("connected despite bad pin")
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error %q does not mention %q", err, tt.wantErr)
			}
		})
	}
}

// rawConn speaks the protocol by hand up to the client info, so tests can
// send what a real Client never would.
type rawConn struct {
	conn      net.Conn
	br        *bufio.Reader
	bw        *bufio.Writer
	serverKey netmap.NodePublic
	nonce     [nonceLen]byte
}

func rawDial(t testing.TB, url string) *rawConn {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	return rawHandshake(t, conn)
}

// rawHandshake upgrades conn and reads the server key; conn is closed when
// the test ends.
func rawHandshake(t testing.TB, conn net.Conn) *rawConn {
	t.Helper()
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	r := &rawConn{conn: conn, br: bufio.NewReader(conn), bw: bufio.NewWriter(conn)}
	fmt.Fprintf(r.bw, "GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: %s\r\nConnection: Upgrade\r\n\r\n", upgradeProtocol)
	r.bw.Flush()
	resp, err := http.ReadResponse(r.br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %v %v", resp, err)
	}
	typ, p, err := readFrame(r.br, nil)
	if err != nil || typ != frameServerKey {
		t.Fatalf("server key frame: %v %v", typ, err)
	}
	r.serverKey = keyFrom(p[len(magic):])
	copy(r.nonce[:], p[len(magic)+keyLen:])
	return r
}

func (r *rawConn) sendInfo(claimed netmap.NodePublic, sealWith netmap.NodePrivate, nonce [nonceLen]byte, info clientInfo) []byte {
	plain, _ := json.Marshal(info)
	sealed := box.Seal(nil, plain, &nonce, (*[32]byte)(&r.serverKey), (*[32]byte)(&sealWith))
	writeFrame(r.bw, frameClientInfo, claimed[:], sealed)
	r.bw.Flush()
	return sealed
}

// result reads the server's answer to the client info: "" when accepted,
// else the rejection text.
func (r *rawConn) result(t testing.TB) string {
	t.Helper()
	typ, p, err := readFrame(r.br, nil)
	if err != nil {
		t.Fatalf("read handshake result: %v", err)
	}
	switch typ {
	case frameServerInfo:
		return ""
	case frameHealth:
		if len(p) == 0 {
			t.Fatal("rejection without a reason")
		}
		return string(p)
	}
	t.Fatalf("unexpected frame 0x%02x", byte(typ))
	return ""
}

func TestClientInfoForgeryRejected(t *testing.T) {
	victim := netmap.NewNodePrivate()
	attacker := netmap.NewNodePrivate()
	srv := newTestServer(t, ServerOptions{})

	// A genuine handshake, captured for the replay case.
	genuine := rawDial(t, srv.url)
	captured := genuine.sendInfo(victim.Public(), victim, genuine.nonce, clientInfo{Version: 1})
	if msg := genuine.result(t); msg != "" {
		t.Fatalf("genuine client rejected: %s", msg)
	}

	var lowOrder netmap.NodePublic // the all-zero point has order 1
	tests := []struct {
		name string
		do   func(r *rawConn)
		want string
	}{
		{"claims victim key, seals with own", func(r *rawConn) {
			r.sendInfo(victim.Public(), attacker, r.nonce, clientInfo{Version: 1})
		}, "does not hold that key"},
		{"replays a captured client info", func(r *rawConn) {
			writeFrame(r.bw, frameClientInfo, func() []byte { k := victim.Public(); return k[:] }(), captured)
			r.bw.Flush()
		}, "does not hold that key"},
		{"seals over a nonce of its own choosing", func(r *rawConn) {
			var n [nonceLen]byte
			r.sendInfo(victim.Public(), victim, n, clientInfo{Version: 1}) // only the victim could, and it still fails
		}, "does not hold that key"},
		{"low-order public key", func(r *rawConn) {
			r.sendInfo(lowOrder, attacker, r.nonce, clientInfo{Version: 1})
		}, "not a valid Curve25519"},
		{"non-canonical key encoding", func(r *rawConn) {
			k := victim.Public()
			k[31] |= 0x80 // same point for X25519, different bytes
			r.sendInfo(k, victim, r.nonce, clientInfo{Version: 1})
		}, "not a valid Curve25519"},
		{"mesh key on a server without mesh", func(r *rawConn) {
			r.sendInfo(attacker.Public(), attacker, r.nonce, clientInfo{Version: 1, MeshKey: strings.Repeat("ab", 32)})
		}, "mesh key rejected"},
		{"wrong first frame", func(r *rawConn) {
			writeFrame(r.bw, frameSendPacket, make([]byte, keyLen+3))
			r.bw.Flush()
		}, "expected client info"},
		{"truncated client info", func(r *rawConn) {
			writeFrame(r.bw, frameClientInfo, make([]byte, keyLen))
			r.bw.Flush()
		}, "too short"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := rawDial(t, srv.url)
			tt.do(r)
			msg := r.result(t)
			if !strings.Contains(msg, tt.want) {
				t.Fatalf("rejection %q, want it to mention %q", msg, tt.want)
			}
			if _, _, err := readFrame(r.br, nil); err == nil {
				t.Fatal("server kept a rejected connection open")
			}
		})
	}
	// The genuine victim connection still receives its packets.
	sender := dial(t, srv.url, netmap.NewNodePrivate())
	sender.Send(victim.Public(), []byte("still yours"))
	genuine.conn.SetDeadline(time.Now().Add(5 * time.Second))
	for {
		typ, p, err := readFrame(genuine.br, nil)
		if err != nil {
			t.Fatal(err)
		}
		if typ == frameRecvPacket {
			if string(p[keyLen:]) != "still yours" {
				t.Fatalf("victim got %q", p[keyLen:])
			}
			break
		}
	}
}

func TestVerifyHook(t *testing.T) {
	allowed := netmap.NewNodePrivate()
	var mu sync.Mutex
	asked := map[netmap.NodePublic]int{}
	srv := newTestServer(t, ServerOptions{Verify: func(ctx context.Context, k netmap.NodePublic) error {
		mu.Lock()
		asked[k]++
		mu.Unlock()
		if k != allowed.Public() {
			return errors.New("unknown to the coordinator")
		}
		return nil
	}})
	dial(t, srv.url, allowed)
	stranger := netmap.NewNodePrivate()
	_, err := Dial(context.Background(), srv.url, ClientOptions{NodeKey: stranger})
	if err == nil || !strings.Contains(err.Error(), "unknown to the coordinator") {
		t.Fatalf("stranger: want rejection carrying the verifier's reason, got %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if asked[allowed.Public()] != 1 || asked[stranger.Public()] != 1 {
		t.Fatalf("verify calls = %v, want one per client", asked)
	}
}

// A client that stops reading is disconnected once a write to it has been
// blocked for the write timeout, to the nanosecond in virtual time
// (synctest); the relay serves everyone else without delay meanwhile, and
// the sender learns the client is gone.
func TestSlowReaderDisconnected(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv := newBubbleRelay(t, ServerOptions{SendQueueDepth: 8})
		ka, kslow, kfast := netmap.NewNodePrivate(), netmap.NewNodePrivate(), netmap.NewNodePrivate()
		a := srv.dial(t, ClientOptions{NodeKey: ka})
		fromFast := drain(srv.dial(t, ClientOptions{NodeKey: kfast}))
		// The slow client never reads; a pipe has no buffer, so the relay's
		// first write to it blocks.
		srv.dial(t, ClientOptions{NodeKey: kslow})
		gone := make(chan time.Time, 1)
		go func() {
			for {
				m, err := a.Recv()
				if err != nil {
					return
				}
				if g, ok := m.(PeerGone); ok && g.Key == kslow.Public() && g.Reason == PeerGoneDisconnected {
					select {
					case gone <- time.Now():
					default:
					}
				}
			}
		}()

		start := time.Now()
		for range 3 * 8 { // more than its queue holds
			if err := a.Send(kslow.Public(), make([]byte, 1400)); err != nil {
				t.Fatal(err)
			}
		}
		if err := a.Send(kfast.Public(), []byte("during")); err != nil {
			t.Fatal(err)
		}
		if got := nextPacket(t, fromFast); string(got.Data) != "during" || time.Since(start) != 0 {
			t.Fatalf("fast client got %q after %v, want it at once", got.Data, time.Since(start))
		}
		time.Sleep(DefaultWriteTimeout - time.Nanosecond)
		synctest.Wait()
		if st := srv.Stats(); st.SlowDisconnects != 0 || st.Clients != 3 {
			t.Fatalf("%v into a blocked write: %+v, want the slow client still connected", time.Since(start), st)
		}
		time.Sleep(time.Nanosecond)
		synctest.Wait()
		if st := srv.Stats(); st.SlowDisconnects != 1 || st.Clients != 2 {
			t.Fatalf("%v into a blocked write: %+v, want the slow client disconnected", time.Since(start), st)
		}
		select {
		case at := <-gone:
			if d := at.Sub(start); d != DefaultWriteTimeout {
				t.Fatalf("sender told %v after the write blocked, want %v", d, DefaultWriteTimeout)
			}
		default:
			t.Fatal("sender not told that the slow reader is gone")
		}
		// The server keeps serving everyone else.
		if err := a.Send(kfast.Public(), []byte("after")); err != nil {
			t.Fatal(err)
		}
		if got := nextPacket(t, fromFast); string(got.Data) != "after" {
			t.Fatalf("fast client got %q", got.Data)
		}
	})
}

// The relay reads each client at its configured rate: a noisy client gets
// its burst and then the rate, to the packet, and a quiet client's packets
// are not delayed by it at all. Both are exact in virtual time (synctest).
func TestRateLimitPerClient(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const (
			limit   = 256 << 10 // bytes per second
			payload = 16 << 10
			frame   = frameHeaderLen + keyLen + payload // what the limiter counts per packet
			run     = 10 * time.Second
		)
		srv := newBubbleRelay(t, ServerOptions{ClientRate: rate.Limit(limit)})
		ksink, kpeer := netmap.NewNodePrivate(), netmap.NewNodePrivate()
		// No virtual time passes while dialling: the noisy client's token
		// bucket starts now.
		start := time.Now()
		noisy, quiet := srv.dial(t, ClientOptions{}), srv.dial(t, ClientOptions{})
		sink, peer := srv.dial(t, ClientOptions{NodeKey: ksink}), srv.dial(t, ClientOptions{NodeKey: kpeer})
		info := noisy.ServerInfo()
		if info.RateBytesPerSec != limit || info.BurstBytes < frame {
			t.Fatalf("server info rate %d burst %d, want %d and at least one frame", info.RateBytesPerSec, info.BurstBytes, limit)
		}
		// The packets the bucket admits by the end of the run: the burst,
		// then the rate.
		admitted := (info.BurstBytes + limit*int(run/time.Second)) / frame
		drain(noisy)
		drain(quiet)
		fromQuiet := drain(peer)

		go func() { // twice what the bucket admits, as fast as the relay reads
			pkt := make([]byte, payload)
			for range 2 * admitted {
				if noisy.Send(ksink.Public(), pkt) != nil {
					return
				}
			}
		}()
		var received atomic.Int64
		go func() {
			for {
				m, err := sink.Recv()
				if err != nil {
					return
				}
				if p, ok := m.(ReceivedPacket); ok {
					received.Add(int64(len(p.Data)))
				}
			}
		}()

		// Once the noisy client has spent its burst and waits for tokens,
		// the quiet client's small packets still get through at once.
		synctest.Wait()
		for i := range 20 {
			msg := []byte(fmt.Sprint("quiet-", i))
			if err := quiet.Send(kpeer.Public(), msg); err != nil {
				t.Fatal(err)
			}
			if got := nextPacket(t, fromQuiet); !bytes.Equal(got.Data, msg) {
				t.Fatalf("peer got %q, want %q", got.Data, msg)
			}
		}
		if d := time.Since(start); d != 0 {
			t.Fatalf("the quiet client's packets waited %v behind the noisy client", d)
		}
		time.Sleep(run)
		synctest.Wait()
		if got := received.Load(); got != int64(admitted*payload) {
			t.Fatalf("noisy client relayed %d packets of %d bytes in %v; a bucket of %d bytes refilled at %d/s admits %d",
				got/payload, payload, run, info.BurstBytes, limit, admitted)
		}
	})
}

func TestGarbageAndOversizedFlood(t *testing.T) {
	srv := newTestServer(t, ServerOptions{})
	ka, kb := netmap.NewNodePrivate(), netmap.NewNodePrivate()
	a, b := dial(t, srv.url, ka), dial(t, srv.url, kb)

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	attack := func(name string, f func(rng *rand.Rand) error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(len(name)), 1))
			for ctx.Err() == nil {
				if err := f(rng); err != nil && ctx.Err() == nil {
					t.Errorf("%s: %v", name, err)
					return
				}
			}
		}()
	}
	hostport := strings.TrimPrefix(srv.url, "http://")
	// Raw garbage instead of HTTP.
	attack("garbage tcp", func(rng *rand.Rand) error {
		c, err := net.Dial("tcp", hostport)
		if err != nil {
			return err
		}
		defer c.Close()
		junk := make([]byte, 4096)
		for i := range junk {
			junk[i] = byte(rng.Uint32())
		}
		c.Write(junk)
		return nil
	})
	// Authenticated clients sending garbage frames and oversized headers:
	// the server must drop them, not allocate what they announce.
	attack("authenticated garbage", func(rng *rand.Rand) error {
		c, err := Dial(ctx, srv.url, ClientOptions{NodeKey: netmap.NewNodePrivate(), IdleTimeout: -1})
		if err != nil {
			return nil // the server may be busy; ctx cancel also lands here
		}
		defer c.Close()
		var hdr [frameHeaderLen]byte
		hdr[0] = byte(frameSendPacket)
		binary.BigEndian.PutUint32(hdr[1:], 1<<31)
		junk := make([]byte, 2048)
		for i := range junk {
			junk[i] = byte(rng.Uint32())
		}
		if rng.IntN(2) == 0 {
			c.queueRaw(hdr[:])
		} else {
			c.queueRaw(junk)
		}
		// Let the flusher hand the bytes to the kernel before half-closing.
		if err := flushed(c); err != nil {
			return err
		}
		// Random junk may announce a frame that is within limits and wait
		// for its payload; ending our side makes the outcome deterministic.
		c.conn.(*net.TCPConn).CloseWrite()
		// The server hangs up on it.
		c.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		for {
			if _, err := c.Recv(); err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					return fmt.Errorf("server kept a garbage-sending client: %w", err)
				}
				return nil
			}
		}
	})
	attack("oversized packets", func(rng *rand.Rand) error {
		c, err := Dial(ctx, srv.url, ClientOptions{NodeKey: netmap.NewNodePrivate()})
		if err != nil {
			return nil
		}
		defer c.Close()
		dst := kb.Public()
		c.queue(frameSendPacket, dst[:], make([]byte, MaxPacketSize+1))
		flushed(c)
		return nil
	})

	for i := range 300 {
		msg := []byte(fmt.Sprint("legit-", i))
		if err := a.Send(kb.Public(), msg); err != nil {
			t.Fatal(err)
		}
		if got := recvPacket(t, b); !bytes.Equal(got.Data, msg) || got.Source != ka.Public() {
			t.Fatalf("packet %d: got %q from %s", i, got.Data, got.Source.ShortString())
		}
	}
	cancel()
	wg.Wait()
	if st := srv.Stats(); st.Clients < 2 {
		t.Fatalf("well-behaved clients lost: %+v", st)
	}
}

// flushed waits until c's queued bytes were handed to the kernel.
func flushed(c *Client) error {
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
		c.wmu.Lock()
		done := len(c.pending) == 0 && c.spare != nil
		err := c.werr
		c.wmu.Unlock()
		if done || err != nil {
			return nil
		}
		if time.Now().After(deadline) {
			return errors.New("queued bytes never written")
		}
	}
}

func TestMeshDeliversAcrossServers(t *testing.T) {
	meshKey := hex.EncodeToString(bytes.Repeat([]byte{7}, 32))
	s1 := newTestServer(t, ServerOptions{MeshKey: meshKey})
	s2 := newTestServer(t, ServerOptions{MeshKey: meshKey})
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for _, pair := range [][2]*testServer{{s1, s2}, {s2, s1}} {
		wg.Add(1)
		go func() { defer wg.Done(); pair[0].RunMeshPeer(ctx, pair[1].url, "") }()
	}
	t.Cleanup(func() { cancel(); wg.Wait() })

	ka, kb := netmap.NewNodePrivate(), netmap.NewNodePrivate()
	a, b := dial(t, s1.url, ka), dial(t, s2.url, kb)
	waitFor(t, "s1 to learn B", func() bool { return s1.Stats().RemoteKeys == 1 })
	waitFor(t, "s2 to learn A", func() bool { return s2.Stats().RemoteKeys == 1 })

	for i := range 50 {
		msg := []byte(fmt.Sprint("across-", i))
		if err := a.Send(kb.Public(), msg); err != nil {
			t.Fatal(err)
		}
		if got := recvPacket(t, b); got.Source != ka.Public() || !bytes.Equal(got.Data, msg) {
			t.Fatalf("B got %q from %s", got.Data, got.Source.ShortString())
		}
		if err := b.Send(ka.Public(), msg); err != nil {
			t.Fatal(err)
		}
		if got := recvPacket(t, a); got.Source != kb.Public() || !bytes.Equal(got.Data, msg) {
			t.Fatalf("A got %q from %s", got.Data, got.Source.ShortString())
		}
	}
	// The counter moves after the queue hand-off, so the mesh reader can
	// deliver the last packet before it is counted.
	waitFor(t, "s1 to count 50 forwarded packets", func() bool { return s1.Stats().PacketsForwarded >= 50 })
	// B leaves: s1 forgets it and tells A it is not here.
	b.Close()
	waitFor(t, "s1 to forget B", func() bool { return s1.Stats().RemoteKeys == 0 })
	a.Send(kb.Public(), []byte("late"))
	if m, ok := recvMsg(t, a).(PeerGone); !ok || m.Key != kb.Public() {
		t.Fatalf("want PeerGone for B, got %#v", m)
	}

	// A mesh peer with the wrong key is refused.
	_, err := Dial(context.Background(), s1.url, ClientOptions{NodeKey: netmap.NewNodePrivate(), MeshKey: strings.Repeat("01", 32)})
	if err == nil || !strings.Contains(err.Error(), "mesh key rejected") {
		t.Fatalf("wrong mesh key: got %v", err)
	}
}

func TestMeshPeerDownReportsHealth(t *testing.T) {
	meshKey := strings.Repeat("5a", 32)
	s1 := newTestServer(t, ServerOptions{MeshKey: meshKey})
	s2 := newTestServer(t, ServerOptions{MeshKey: meshKey})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); s1.RunMeshPeer(ctx, s2.url, "") }()
	t.Cleanup(func() { cancel(); <-done })

	a := dial(t, s1.url, netmap.NewNodePrivate())
	b := dial(t, s2.url, netmap.NewNodePrivate())
	waitFor(t, "s1 to learn B", func() bool { return s1.Stats().RemoteKeys == 1 })
	// s2 goes away: s1's clients are told, and s1 forgets s2's clients.
	s2.Close()
	s2.hs.Close()
	b.Close()
	for {
		m := recvMsg(t, a)
		if h, ok := m.(Health); ok {
			if !strings.Contains(h.Problem, "unreachable") {
				t.Fatalf("health %q", h.Problem)
			}
			break
		}
	}
	waitFor(t, "s1 to forget B", func() bool { return s1.Stats().RemoteKeys == 0 })
	// A client connecting while the problem lasts hears about it at once.
	late := dial(t, s1.url, netmap.NewNodePrivate())
	if h, ok := recvMsg(t, late).(Health); !ok || h.Problem == "" {
		t.Fatalf("late client got %#v, want the current health problem", h)
	}
}

func TestMeshFramesRefusedFromClients(t *testing.T) {
	srv := newTestServer(t, ServerOptions{MeshKey: strings.Repeat("aa", 32)})
	kb := netmap.NewNodePrivate()
	b := dial(t, srv.url, kb)
	for _, tt := range []struct {
		name string
		send func(c *Client) error
	}{
		{"watch", func(c *Client) error { return c.watchConns() }},
		{"forward with forged source", func(c *Client) error {
			return c.forward(netmap.NewNodePrivate().Public(), kb.Public(), []byte("forged"))
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := dial(t, srv.url, netmap.NewNodePrivate())
			if err := tt.send(c); err != nil {
				t.Fatal(err)
			}
			c.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			for {
				m, err := c.Recv()
				if err != nil {
					var ne net.Error
					if errors.As(err, &ne) && ne.Timeout() {
						t.Fatal("server kept a client that sent a mesh-only frame")
					}
					break
				}
				if _, ok := m.(PeerPresent); ok {
					t.Fatal("non-mesh client received presence")
				}
			}
		})
	}
	// B never saw the forged packet: the next thing it gets is real.
	a := dial(t, srv.url, netmap.NewNodePrivate())
	a.Send(kb.Public(), []byte("real"))
	if got := recvPacket(t, b); string(got.Data) != "real" {
		t.Fatalf("B got %q", got.Data)
	}
}

func TestUpgradeRequired(t *testing.T) {
	srv := newTestServer(t, ServerOptions{})
	resp, err := http.Get(srv.url + "/derp")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUpgradeRequired {
		t.Fatalf("plain GET: status %d, want 426", resp.StatusCode)
	}
	_, err = Dial(context.Background(), "ftp://x", ClientOptions{NodeKey: netmap.NewNodePrivate()})
	if err == nil || !strings.Contains(err.Error(), "scheme") {
		t.Fatalf("bad scheme: %v", err)
	}
}

func TestServerRestartClientsRedial(t *testing.T) {
	// A relay restart drops every connection; clients see an error from
	// Recv and reconnect with a new Dial to the same state (key, cert).
	key := netmap.NewNodePrivate()
	s1, err := NewServer(ServerOptions{PrivateKey: key})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	hs := &http.Server{Handler: s1}
	go hs.Serve(ln)
	ka, kb := netmap.NewNodePrivate(), netmap.NewNodePrivate()
	a := dial(t, "http://"+addr, ka)
	s1.Close()
	hs.Close()
	if _, err := a.Recv(); err == nil {
		t.Fatal("client did not notice the relay going away")
	}

	s2, err := NewServer(ServerOptions{PrivateKey: key})
	if err != nil {
		t.Fatal(err)
	}
	ln2, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	hs2 := &http.Server{Handler: s2}
	go hs2.Serve(ln2)
	t.Cleanup(func() { s2.Close(); hs2.Close() })
	a2, b := dial(t, "http://"+addr, ka), dial(t, "http://"+addr, kb)
	if a2.ServerPublicKey() != key.Public() {
		t.Fatal("restarted relay has a different key")
	}
	a2.Send(kb.Public(), []byte("again"))
	if got := recvPacket(t, b); string(got.Data) != "again" {
		t.Fatalf("got %q", got.Data)
	}
}

func TestLoadOrCreateKeepsIdentity(t *testing.T) {
	dir := t.TempDir()
	c1, err := LoadOrCreateCert(dir, []string{"127.0.0.1", "derp.example"})
	if err != nil {
		t.Fatal(err)
	}
	c2, err := LoadOrCreateCert(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	if tlspin.Fingerprint(c1.Leaf) != tlspin.Fingerprint(c2.Leaf) {
		t.Fatal("fingerprint changed across restarts")
	}
	if got := c1.Leaf.DNSNames; len(got) != 1 || got[0] != "derp.example" {
		t.Fatalf("DNS names %v", got)
	}
	k1, err := LoadOrCreateServerKey(dir)
	if err != nil {
		t.Fatal(err)
	}
	k2, err := LoadOrCreateServerKey(dir)
	if err != nil || k1 != k2 {
		t.Fatalf("server key not kept: %v", err)
	}
}

// The first packets to a peer are usually sent while the relay is still
// being dialled; they must go out once it connects, not be lost (losing a
// WireGuard handshake costs its 5 s retry).
func TestReconnectingClientHoldsPacketsUntilConnected(t *testing.T) {
	s, err := NewServer(ServerOptions{PrivateKey: netmap.NewNodePrivate()})
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(s)
	t.Cleanup(func() { hs.Close(); s.Close() })
	ka, kb := netmap.NewNodePrivate(), netmap.NewNodePrivate()
	a := dial(t, hs.URL, ka)

	rc := NewReconnectingClient(hs.URL, ClientOptions{NodeKey: kb}, nil)
	for i := range maxHeld + 5 {
		if err := rc.Send(ka.Public(), []byte(fmt.Sprintf("held %d", i))); err != nil {
			t.Fatalf("send before connecting: %v", err)
		}
	}
	if err := rc.Send(ka.Public(), make([]byte, MaxPacketSize+1)); err == nil {
		t.Fatal("oversized packet accepted while not connected")
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); rc.Run(ctx, nil) }()
	t.Cleanup(func() { cancel(); <-done })

	// The oldest 5 were dropped to keep the queue bounded; the rest arrive in order.
	for i := 5; i < maxHeld+5; i++ {
		if p := recvPacket(t, a); string(p.Data) != fmt.Sprintf("held %d", i) {
			t.Fatalf("packet %d: got %q", i, p.Data)
		}
	}
}

// Packets sent while the held ones are being flushed must not overtake
// them: one sender's packets arrive in the order it sent them (some of the
// oldest may be dropped by the bounded hold queue, none reordered).
func TestReconnectingClientKeepsOrderAcrossConnect(t *testing.T) {
	for round := range 5 {
		s, err := NewServer(ServerOptions{PrivateKey: netmap.NewNodePrivate()})
		if err != nil {
			t.Fatal(err)
		}
		hs := httptest.NewServer(s)
		ka, kb := netmap.NewNodePrivate(), netmap.NewNodePrivate()
		a := dial(t, hs.URL, ka)
		rc := NewReconnectingClient(hs.URL, ClientOptions{NodeKey: kb}, nil)

		const total = 400
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		sent := make(chan struct{})
		go func() {
			defer close(sent)
			for i := range total {
				if i == maxHeld/2 {
					// Connect while the sender keeps going, so sends race
					// the flush of the held ones.
					go func() { defer close(done); rc.Run(ctx, nil) }()
				}
				if err := rc.Send(ka.Public(), binary.BigEndian.AppendUint32(nil, uint32(i))); err != nil {
					t.Errorf("send %d: %v", i, err)
					return
				}
				time.Sleep(20 * time.Microsecond)
			}
		}()
		last := -1
		for last < total-1 {
			p := recvPacket(t, a)
			seq := int(binary.BigEndian.Uint32(p.Data))
			if seq <= last {
				t.Fatalf("round %d: packet %d arrived after packet %d", round, seq, last)
			}
			last = seq
		}
		<-sent
		cancel()
		<-done
		a.Close()
		hs.Close()
		s.Close()
	}
}

func TestReconnectingClientSurvivesRelayRestart(t *testing.T) {
	// In a bubble the redial backoff is virtual time and synctest.Wait
	// says when the client has settled, so nothing is polled.
	synctest.Test(t, func(t *testing.T) {
		key := netmap.NewNodePrivate()
		var relay atomic.Pointer[bubbleRelay] // the relay at bubbleURL now
		relay.Store(newBubbleRelay(t, ServerOptions{PrivateKey: key}))
		dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
			return relay.Load().ln.dialWrapped(nil)(ctx, network, addr)
		}

		ka, kb := netmap.NewNodePrivate(), netmap.NewNodePrivate()
		rc := NewReconnectingClient(bubbleURL, ClientOptions{NodeKey: kb, DialContext: dial}, nil)
		got := make(chan string, 16)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() {
			defer close(done)
			rc.Run(ctx, func(m Message) {
				if p, ok := m.(ReceivedPacket); ok {
					got <- string(p.Data)
				}
			})
		}()
		t.Cleanup(func() { cancel(); <-done })
		synctest.Wait()
		if !rc.Connected() {
			t.Fatal("not connected once the first dial settled")
		}
		next := func(what string) string {
			t.Helper()
			select {
			case m := <-got:
				return m
			case <-time.After(time.Second):
				t.Fatalf("no packet %s", what)
			}
			return ""
		}

		// Packets reach the reconnecting client; it can send too.
		a := relay.Load().dial(t, ClientOptions{NodeKey: ka})
		pkts := drain(a)
		a.Send(kb.Public(), []byte("before"))
		if m := next("before the restart"); m != "before" {
			t.Fatalf("got %q", m)
		}
		if err := rc.Send(ka.Public(), []byte("from rc")); err != nil {
			t.Fatal(err)
		}
		if p := nextPacket(t, pkts); string(p.Data) != "from rc" {
			t.Fatalf("a got %q", p.Data)
		}

		relay.Load().stop()
		synctest.Wait()
		if rc.Connected() {
			t.Fatal("the relay is gone and the client still says it is connected")
		}
		// Held for the next connection (and dropped there: ka is not on
		// the new relay).
		if err := rc.Send(ka.Public(), []byte("x")); err != nil {
			t.Fatalf("send while down: %v", err)
		}
		s2 := newBubbleRelay(t, ServerOptions{PrivateKey: key})
		relay.Store(s2)
		time.Sleep(5 * time.Second) // the backoff's longest delay
		synctest.Wait()
		if !rc.Connected() || s2.Stats().Clients != 1 {
			t.Fatalf("a backoff's longest delay after the relay came back: connected %v, clients %d", rc.Connected(), s2.Stats().Clients)
		}
		a2 := s2.dial(t, ClientOptions{NodeKey: ka})
		drain(a2)
		a2.Send(kb.Public(), []byte("after"))
		if m := next("after the relay restarted"); m != "after" {
			t.Fatalf("got %q", m)
		}
	})
}

// A client notices a relay that went silent after exactly its idle
// timeout, and keep-alives hold an idle connection up. The timeouts are in
// virtual time (synctest), so the margins are exact rather than wide.
func TestClientIdleTimeout(t *testing.T) {
	for _, tt := range []struct {
		name      string
		keepAlive time.Duration
		idle      time.Duration
		wantDead  bool
	}{
		// A silent relay (keep-alives far apart) is declared dead.
		{"silent relay", time.Hour, 300 * time.Millisecond, true},
		// Keep-alives at the default interval hold up a connection whose
		// idle timeout is only just longer.
		{"keep-alives", DefaultKeepAlive, DefaultKeepAlive + time.Millisecond, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				srv := newBubbleRelay(t, ServerOptions{KeepAlive: tt.keepAlive})
				c := srv.dial(t, ClientOptions{IdleTimeout: tt.idle})
				errc := make(chan error, 1)
				start := time.Now()
				go func() {
					for {
						if _, err := c.Recv(); err != nil {
							errc <- err
							return
						}
					}
				}()
				select {
				case err := <-errc:
					var ne net.Error
					if !tt.wantDead || !errors.As(err, &ne) || !ne.Timeout() {
						t.Fatalf("Recv failed after %v with %v", time.Since(start), err)
					}
					if d := time.Since(start); d != tt.idle {
						t.Fatalf("silent relay noticed after %v, want the idle timeout %v", d, tt.idle)
					}
				case <-time.After(10 * time.Minute):
					if tt.wantDead {
						t.Fatal("silent relay not noticed")
					}
				}
			})
		})
	}
	// The default follows the relay's announced keep-alive interval.
	synctest.Test(t, func(t *testing.T) {
		srv := newBubbleRelay(t, ServerOptions{KeepAlive: 7 * time.Second})
		c := srv.dial(t, ClientOptions{IdleTimeout: -1})
		c2 := srv.dial(t, ClientOptions{})
		if c.idle >= 0 || c2.idle != 19*time.Second || c2.keepAlive != 7*time.Second {
			t.Fatalf("idle timeouts %v (disabled) and %v (default), want <0 and 19s", c.idle, c2.idle)
		}
	})
}

// A client the relay heard nothing from for three keep-alive intervals is
// dropped at exactly that deadline; one that is idle but sends its
// keep-alives stays. Virtual time (synctest) lets the test use the real
// default interval and look at both sides of the deadline.
func TestServerDropsSilentClients(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv := newBubbleRelay(t, ServerOptions{})
		silence := 3 * DefaultKeepAlive
		ka, kb := netmap.NewNodePrivate(), netmap.NewNodePrivate()
		// A's client sends keep-alives on its own while idle.
		a := srv.dial(t, ClientOptions{NodeKey: ka})
		got := drain(a)
		// B handshakes by hand and then never sends a byte, like a node
		// whose network vanished; it still reads what the relay sends.
		r := srv.rawDial(t)
		r.sendInfo(kb.Public(), kb, r.nonce, clientInfo{Version: 1})
		if msg := r.result(t); msg != "" {
			t.Fatal(msg)
		}
		r.conn.SetDeadline(time.Time{})
		go io.Copy(io.Discard, r.br)
		start := time.Now()

		time.Sleep(silence - time.Nanosecond)
		synctest.Wait()
		if n := srv.Stats().Clients; n != 2 {
			t.Fatalf("%v after B's last byte: clients = %d, want 2 (B dropped early)", time.Since(start), n)
		}
		time.Sleep(time.Nanosecond)
		synctest.Wait()
		if st := srv.Stats(); st.Clients != 1 || st.SlowDisconnects != 0 {
			t.Fatalf("%v after B's last byte: %+v, want B (only) dropped, for silence", time.Since(start), st)
		}
		// A, idle but alive, is still there many intervals later.
		time.Sleep(time.Hour)
		synctest.Wait()
		if n := srv.Stats().Clients; n != 1 {
			t.Fatalf("clients = %d, want A still connected", n)
		}
		if err := a.Send(ka.Public(), []byte("self")); err != nil {
			t.Fatal(err)
		}
		if p := nextPacket(t, got); string(p.Data) != "self" {
			t.Fatalf("A got %q", p.Data)
		}
	})
}

// The coordinator embeds the relay on its own HTTPS listener, which also
// speaks HTTP/2 and asks for (optional) client certificates: the relay
// client must still get an upgradable HTTP/1.1 connection there.
func TestEmbeddedInHTTP2Server(t *testing.T) {
	cert, err := NewSelfSignedCert([]string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewServer(ServerOptions{PrivateKey: netmap.NewNodePrivate()})
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/derp", s)
	mux.HandleFunc("/api", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, r.Proto) })
	hs := httptest.NewUnstartedServer(mux)
	hs.EnableHTTP2 = true
	hs.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequestClientCert}
	hs.StartTLS()
	t.Cleanup(func() { s.Close(); hs.Close() })

	// The listener really negotiates HTTP/2 for other clients.
	resp, err := hs.Client().Get(hs.URL + "/api")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "HTTP/2.0" {
		t.Fatalf("other routes use %s, want HTTP/2.0", body)
	}
	ka, kb := netmap.NewNodePrivate(), netmap.NewNodePrivate()
	fp := tlspin.Fingerprint(cert.Leaf)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	a, err := Dial(ctx, hs.URL, ClientOptions{NodeKey: ka, CertFingerprint: fp})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := Dial(ctx, hs.URL, ClientOptions{NodeKey: kb, CertFingerprint: fp, IdleTimeout: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	a.Send(kb.Public(), []byte("embedded"))
	if got := recvPacket(t, b); string(got.Data) != "embedded" {
		t.Fatalf("got %q", got.Data)
	}
}

// TestDisconnectClient: a revoked client's connection closes, others stay,
// and the server lists who is connected.
func TestDisconnectClient(t *testing.T) {
	s := newTestServer(t, ServerOptions{})
	ka, kb := netmap.NewNodePrivate(), netmap.NewNodePrivate()
	a, b := dial(t, s.url, ka), dial(t, s.url, kb)
	waitFor(t, "both clients registered", func() bool { return s.Stats().Clients == 2 })
	keys := s.ClientKeys()
	if len(keys) != 2 || !(keys[0] == ka.Public() && keys[1] == kb.Public() || keys[0] == kb.Public() && keys[1] == ka.Public()) {
		t.Fatalf("ClientKeys %v, want a and b", keys)
	}
	if s.DisconnectClient(netmap.NewNodePrivate().Public()) {
		t.Fatal("DisconnectClient reported a key that is not connected")
	}
	if !s.DisconnectClient(ka.Public()) {
		t.Fatal("DisconnectClient did not find a")
	}
	a.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		_, err := a.Recv()
		if err == nil {
			continue
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("a still connected 5s after DisconnectClient")
		}
		break
	}
	waitFor(t, "a unregistered", func() bool { return s.Stats().Clients == 1 })
	if keys := s.ClientKeys(); len(keys) != 1 || keys[0] != kb.Public() {
		t.Fatalf("ClientKeys after the disconnect %v, want b", keys)
	}
	if err := b.Ping(NewPingData()); err != nil {
		t.Fatal(err)
	}
	if _, ok := recvMsg(t, b).(Pong); !ok {
		t.Fatal("b lost its connection")
	}
	if got := s.Stats().Revoked; got != 1 {
		t.Fatalf("Stats.Revoked %d, want 1", got)
	}
}

// TestRevocationDuringHandshake: a key revoked after Verify accepted it but
// before the client was registered is caught by the re-check, so it
// cannot slip past DisconnectClient.
func TestRevocationDuringHandshake(t *testing.T) {
	k := netmap.NewNodePrivate()
	var revoked atomic.Bool
	var srv atomic.Pointer[Server]
	calls := atomic.Int32{}
	s := newTestServer(t, ServerOptions{Verify: func(_ context.Context, key netmap.NodePublic) error {
		calls.Add(1)
		if revoked.Load() {
			return errors.New("node key revoked")
		}
		// The revocation lands now, while the client is not registered.
		revoked.Store(true)
		if srv.Load().DisconnectClient(key) {
			return errors.New("test: client was registered before Verify returned")
		}
		return nil
	}})
	srv.Store(s.Server)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, s.url, ClientOptions{NodeKey: k, IdleTimeout: -1})
	if err == nil {
		c.Close()
		t.Fatal("client revoked during its handshake was accepted")
	}
	if !strings.Contains(err.Error(), "node key revoked") {
		t.Fatalf("refused with %v, want the re-check's reason", err)
	}
	if calls.Load() != 2 {
		t.Fatalf("Verify called %d times, want 2 (handshake, re-check)", calls.Load())
	}
	waitFor(t, "no clients", func() bool { return s.Stats().Clients == 0 })
}

// A relay that stops reading must not hold senders for TCP's minutes:
// blocked sends fail after exactly the write timeout, and TrySend never
// waits. Both are exact in virtual time (synctest).
func TestClientStalledRelay(t *testing.T) {
	dst := netmap.NewNodePrivate().Public()
	pkt := make([]byte, 32<<10)
	// stalled connects a client with the default write timeout (a send
	// that waits wrongly returns after it instead of hanging the test) and
	// makes the relay stop reading from it.
	stalled := func(t *testing.T) *Client {
		srv := newBubbleRelay(t, ServerOptions{})
		stall := make(chan struct{})
		c := srv.dialWrapped(t, ClientOptions{IdleTimeout: -1}, func(conn net.Conn) net.Conn {
			return &stallConn{Conn: conn, stalled: stall, done: make(chan struct{})}
		})
		drain(c) // the relay answers the unknown destination with PeerGone
		close(stall)
		return c
	}

	t.Run("TrySend drops instead of waiting", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			c := stalled(t)
			start := time.Now()
			const tries = 64 // 2 MiB: many times the send queue
			full := false
			for i := 0; i < tries && !full; i++ {
				switch err := c.TrySend(dst, pkt); {
				case errors.Is(err, ErrQueueFull):
					full = true
				case err != nil:
					t.Fatalf("TrySend: %v", err)
				}
			}
			if !full {
				t.Fatalf("queued %d x %d bytes to a relay that reads nothing without ErrQueueFull", tries, len(pkt))
			}
			if d := time.Since(start); d != 0 {
				t.Fatalf("TrySend waited %v", d)
			}
		})
	})

	t.Run("write timeout releases blocked senders", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			c := stalled(t)
			start := time.Now()
			done := make(chan error, 1)
			go func() {
				for {
					if err := c.Send(dst, pkt); err != nil {
						done <- err
						return
					}
				}
			}()
			select {
			case err := <-done:
				if !errors.Is(err, os.ErrDeadlineExceeded) {
					t.Errorf("blocked Send failed with %v, want the write deadline", err)
				}
				if d := time.Since(start); d != DefaultClientWriteTimeout {
					t.Errorf("blocked Send released after %v, want the write timeout %v", d, DefaultClientWriteTimeout)
				}
			case <-time.After(time.Hour):
				t.Fatalf("Send still blocked an hour after the relay stopped reading, with a %v write timeout", DefaultClientWriteTimeout)
			}
		})
	})
}
