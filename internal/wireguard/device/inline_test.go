/* SPDX-License-Identifier: MIT
 *
 * Copyright (C) 2026 meshd authors: this file is meshd's, not upstream's.
 */

package device

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/conn/bindtest"
	"golang.zx2c4.com/wireguard/tun/tuntest"
)

// seqPacket is an IPv4/UDP packet from src to dst whose payload carries
// seq, which the receiving test reads back to check the order.
func seqPacket(src, dst netip.Addr, seq uint32, size int) []byte {
	p := make([]byte, size)
	p[0] = 0x45
	binary.BigEndian.PutUint16(p[2:], uint16(size))
	p[8] = 64
	p[9] = 17
	s, d := src.As4(), dst.As4()
	copy(p[12:16], s[:])
	copy(p[16:20], d[:])
	binary.BigEndian.PutUint32(p[28:], seq)
	return p
}

func packetSeq(p []byte) uint32 { return binary.BigEndian.Uint32(p[28:]) }

// gatedBind holds every Send while the gate is closed, so that a test can
// keep a batch in the sequential sender and make a backlog behind it.
type gatedBind struct {
	conn.Bind
	mu      sync.Mutex
	gate    chan struct{} // nil: open
	blocked chan struct{} // receives once per Send that waits at the gate

	// While slow, each Send moves clock (the sending device's, in
	// nanoseconds) on by slowSend, as a send that blocks would.
	slow  atomic.Bool
	clock atomic.Int64

	// shared makes every endpoint say its sends wait only on a socket
	// all peers share (SendStallReporter), as a direct path's do.
	shared atomic.Bool
}

// reportingEndpoint is a channel bind endpoint that reports whether
// sends to it may stall on their own, as its bind says.
type reportingEndpoint struct {
	conn.Endpoint
	b *gatedBind
}

func (e reportingEndpoint) SendMayStall() bool { return !e.b.shared.Load() }

func (b *gatedBind) ParseEndpoint(s string) (conn.Endpoint, error) {
	ep, err := b.Bind.ParseEndpoint(s)
	if err != nil {
		return nil, err
	}
	return reportingEndpoint{ep, b}, nil
}

// Open wraps received packets' endpoints too: WireGuard takes a peer's
// endpoint from the packets it receives.
func (b *gatedBind) Open(port uint16) ([]conn.ReceiveFunc, uint16, error) {
	fns, actual, err := b.Bind.Open(port)
	for i, fn := range fns {
		fns[i] = func(bufs [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
			n, err := fn(bufs, sizes, eps)
			for j := range n {
				eps[j] = reportingEndpoint{eps[j], b}
			}
			return n, err
		}
	}
	return fns, actual, err
}

const slowSend = 2 * inlineSlowSend

func (b *gatedBind) close() {
	b.mu.Lock()
	b.gate = make(chan struct{})
	b.mu.Unlock()
}

func (b *gatedBind) open() {
	b.mu.Lock()
	close(b.gate)
	b.gate = nil
	b.mu.Unlock()
}

// release opens the gate if it is closed.
func (b *gatedBind) release() {
	b.mu.Lock()
	if b.gate != nil {
		close(b.gate)
		b.gate = nil
	}
	b.mu.Unlock()
}

func (b *gatedBind) Send(bufs [][]byte, ep conn.Endpoint) error {
	if b.slow.Load() {
		b.clock.Add(int64(slowSend))
	}
	b.mu.Lock()
	gate := b.gate
	b.mu.Unlock()
	if gate != nil {
		select {
		case b.blocked <- struct{}{}:
		default:
		}
		<-gate
	}
	if re, ok := ep.(reportingEndpoint); ok {
		ep = re.Endpoint
	}
	return b.Bind.Send(bufs, ep)
}

// genGatedPair is genTestPair(tb, false) with device 0's sends behind a
// gate.
func genGatedPair(tb testing.TB) (pair testPair, gate *gatedBind) {
	cfg, endpointCfg := genConfigs(tb)
	binds := bindtest.NewChannelBinds()
	gate = &gatedBind{Bind: binds[0], blocked: make(chan struct{}, 1)}
	binds[0] = gate
	for i := range pair {
		p := &pair[i]
		p.tun = tuntest.NewChannelTUN()
		p.ip = netip.AddrFrom4([4]byte{1, 0, 0, byte(i + 1)})
		p.dev = NewDevice(p.tun.TUN(), binds[i], NewLogger(LogLevelError, fmt.Sprintf("dev%d: ", i)))
		if i == 0 {
			epoch := time.Now()
			p.dev.inline.now = func() time.Time { return epoch.Add(time.Duration(gate.clock.Load())) }
		}
		if err := p.dev.IpcSet(cfg[i]); err != nil {
			tb.Fatalf("configure device %d: %v", i, err)
		}
		if err := p.dev.Up(); err != nil {
			tb.Fatalf("bring up device %d: %v", i, err)
		}
		endpointCfg[i^1] = fmt.Sprintf(endpointCfg[i^1], p.dev.net.port)
	}
	for i := range pair {
		if err := pair[i].dev.IpcSet(endpointCfg[i]); err != nil {
			tb.Fatalf("configure device %d endpoint: %v", i, err)
		}
		tb.Cleanup(pair[i].dev.Close)
	}
	// Cleanups run last first: a test that failed with the gate closed
	// must not leave Close waiting behind it.
	tb.Cleanup(gate.release)
	return pair, gate
}

// onlyPeer returns d's one peer.
func onlyPeer(tb testing.TB, d *Device) *Peer {
	d.peers.RLock()
	defer d.peers.RUnlock()
	for _, p := range d.peers.keyMap {
		return p
	}
	tb.Fatal("device has no peer")
	return nil
}

// waitZero waits until the pipeline count v has drained: the sequential
// routine counts a batch down just after it has sent (written) it.
func waitZero(tb testing.TB, what string, v interface{ Load() int64 }) {
	tb.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for v.Load() != 0 {
		if time.Now().After(deadline) {
			tb.Fatalf("%s: %d batches still in the pipeline", what, v.Load())
		}
		runtime.Gosched()
	}
}

// expectSeqs reads n packets from tun's inbound side and checks that they
// carry the sequence numbers from, from+1, ... in that order.
func expectSeqs(tb testing.TB, p *testPeer, from uint32, n int) {
	tb.Helper()
	timer := time.NewTimer(10 * time.Second)
	defer timer.Stop()
	for i := range n {
		want := from + uint32(i)
		select {
		case got := <-p.tun.Inbound:
			if s := packetSeq(got); s != want {
				tb.Fatalf("packet %d: sequence %d, want %d (reordered or lost)", i, s, want)
			}
		case <-timer.C:
			tb.Fatalf("packet %d (sequence %d) did not arrive", i, want)
		}
	}
}

// TestRunToCompletionOutboundBacklog holds a batch in the sequential
// sender, sends more behind it (they must take the pipeline, as the peer
// has a backlog), releases it, and checks that everything arrives in order
// and that the sender goes back inline once the pipeline has drained.
func TestRunToCompletionOutboundBacklog(t *testing.T) {
	pair, gate := genGatedPair(t)
	pair.Send(t, Ping, nil) // handshake
	pair.Send(t, Pong, nil)
	a, b := &pair[0], &pair[1]
	peer := onlyPeer(t, a.dev)
	waitZero(t, "after the handshake", &peer.inline.out.pending)

	const backlog = 40
	gate.close()
	a.dev.SetRunToCompletion(false)
	a.tun.Outbound <- seqPacket(a.ip, b.ip, 0, 200)
	<-gate.blocked // the sequential sender holds batch 0
	a.dev.SetRunToCompletion(true)
	before := a.dev.InlineStats()
	for seq := uint32(1); seq <= backlog; seq++ {
		a.tun.Outbound <- seqPacket(a.ip, b.ip, seq, 200+int(seq))
	}
	// The TUN reader takes one packet per Read: when the last send above
	// returned, every packet before it had been dispatched.
	mid := a.dev.InlineStats()
	if got := mid.OutInline - before.OutInline; got != 0 {
		t.Errorf("%d batches went inline past a backlog", got)
	}
	if got := mid.OutPipeline - before.OutPipeline; got < backlog-1 {
		t.Errorf("%d batches took the pipeline behind the backlog, want at least %d", got, backlog-1)
	}
	gate.open()
	expectSeqs(t, b, 0, backlog+1)

	waitZero(t, "after the backlog", &peer.inline.out.pending)
	before = a.dev.InlineStats()
	const after = 20
	for seq := uint32(backlog + 1); seq <= backlog+after; seq++ {
		a.tun.Outbound <- seqPacket(a.ip, b.ip, seq, 300)
	}
	expectSeqs(t, b, backlog+1, after)
	if got := a.dev.InlineStats().OutInline - before.OutInline; got < after {
		t.Errorf("%d batches inline once the pipeline drained, want %d", got, after)
	}
}

// TestRunToCompletionInboundBacklog is the receive side: a batch held in
// the sequential receiver's TUN write keeps the next batches in the
// pipeline, all arrive in order, and then batches run inline again.
func TestRunToCompletionInboundBacklog(t *testing.T) {
	pair, _ := genGatedPair(t)
	pair.Send(t, Ping, nil)
	pair.Send(t, Pong, nil)
	a, b := &pair[0], &pair[1]
	peer := onlyPeer(t, b.dev)
	waitZero(t, "after the handshake", &peer.inline.in.pending)

	const backlog = 40
	b.dev.SetRunToCompletion(false)
	before := b.dev.InlineStats()
	// Nobody reads b's TUN: its sequential receiver blocks writing batch 0.
	a.tun.Outbound <- seqPacket(a.ip, b.ip, 0, 200)
	waitStat(t, func() uint64 { return b.dev.InlineStats().InPipeline - before.InPipeline }, 1)
	b.dev.SetRunToCompletion(true)
	for seq := uint32(1); seq <= backlog; seq++ {
		a.tun.Outbound <- seqPacket(a.ip, b.ip, seq, 200+int(seq))
	}
	waitStat(t, func() uint64 { return b.dev.InlineStats().InPipeline - before.InPipeline }, backlog+1)
	if got := b.dev.InlineStats().InInline - before.InInline; got != 0 {
		t.Errorf("%d batches went inline past a backlog", got)
	}
	expectSeqs(t, b, 0, backlog+1)

	waitZero(t, "after the backlog", &peer.inline.in.pending)
	before = b.dev.InlineStats()
	const after = 20
	for seq := uint32(backlog + 1); seq <= backlog+after; seq++ {
		a.tun.Outbound <- seqPacket(a.ip, b.ip, seq, 300)
	}
	expectSeqs(t, b, backlog+1, after)
	if got := b.dev.InlineStats().InInline - before.InInline; got < after {
		t.Errorf("%d batches inline once the pipeline drained, want %d", got, after)
	}
}

// waitStat waits until get returns at least want.
func waitStat(tb testing.TB, get func() uint64, want uint64) {
	tb.Helper()
	// Long enough for WireGuard to retry a lost handshake (REKEY_TIMEOUT,
	// 5 s, plus jitter) twice on a loaded machine under -race: a CI run
	// after expired keypairs needed more than 10 s.
	deadline := time.Now().Add(30 * time.Second)
	for get() < want {
		if time.Now().After(deadline) {
			tb.Fatalf("count %d, want %d", get(), want)
		}
		runtime.Gosched()
	}
}

// TestRunToCompletionConcurrentOrder sends a stream of numbered packets
// while other goroutines keep calling SendKeepalive (the timers' and the
// handshake's way in) and both ends switch between running to completion
// and the pipeline; the packets must arrive complete and in order. Run it
// with -race.
func TestRunToCompletionConcurrentOrder(t *testing.T) {
	pair, _ := genGatedPair(t)
	pair.Send(t, Ping, nil)
	pair.Send(t, Pong, nil)
	a, b := &pair[0], &pair[1]
	peer := onlyPeer(t, a.dev)

	// At most n/2 keepalives each: with the data, fewer than bindtest's
	// 8192 queued datagrams, whose Send blocks for good once the
	// receiving device has closed.
	const n, stretch = 3000, 100
	done := make(chan struct{})
	var wg sync.WaitGroup
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range n / 2 {
				select {
				case <-done:
					return
				default:
					peer.SendKeepalive()
					runtime.Gosched()
				}
			}
		}()
	}
	before := a.dev.InlineStats()
	wg.Add(1)
	go func() {
		defer wg.Done()
		for seq := range uint32(n) {
			if seq%stretch == 0 {
				a.dev.SetRunToCompletion(seq/stretch%2 == 0)
				b.dev.SetRunToCompletion(seq/stretch%3 != 0)
			}
			select {
			case a.tun.Outbound <- seqPacket(a.ip, b.ip, seq, 100+int(seq%1000)):
			case <-done:
				return
			}
		}
	}()
	expectSeqs(t, b, 0, n)
	close(done)
	wg.Wait()
	st := a.dev.InlineStats()
	if st.OutInline == before.OutInline || st.OutPipeline == before.OutPipeline {
		t.Errorf("sender stats %+v, before %+v: want both paths used", st, before)
	}
}

// slowSendPair is a gated pair after its handshake, device 0 running to
// completion with nothing pending; shared is what its endpoints say of
// their sends (gatedBind.shared).
func slowSendPair(t *testing.T, shared bool) (a, b *testPeer, peer *Peer, gate *gatedBind) {
	t.Helper()
	var pair testPair
	pair, gate = genGatedPair(t)
	gate.shared.Store(shared)
	pair.Send(t, Ping, nil)
	pair.Send(t, Pong, nil)
	a, b = &pair[0], &pair[1]
	peer = onlyPeer(t, a.dev)
	a.dev.SetRunToCompletion(true)
	waitZero(t, "after the handshake", &peer.inline.out.pending)
	return a, b, peer, gate
}

// TestRunToCompletionSlowSend: after an inline send that blocked, the
// peer's next batch takes the pipeline (the TUN reader must not wait on one
// peer's full relay queue while others have traffic), so do the batches
// behind it while the pipeline is busy, all in order, and the peer runs
// inline again once it has drained.
func TestRunToCompletionSlowSend(t *testing.T) {
	a, b, peer, gate := slowSendPair(t, false)

	before := a.dev.InlineStats()
	gate.slow.Store(true)
	a.tun.Outbound <- seqPacket(a.ip, b.ip, 0, 200)
	expectSeqs(t, b, 0, 1)
	// The peer has the packet before the slow send returns and is counted.
	deadline := time.Now().Add(10 * time.Second)
	for st := a.dev.InlineStats(); st.SlowSends == before.SlowSends || st.OutInline == before.OutInline; st = a.dev.InlineStats() {
		if time.Now().After(deadline) {
			t.Fatalf("stats %+v, before %+v: want a slow inline send", st, before)
		}
		runtime.Gosched()
	}
	gate.slow.Store(false)

	// The next batch takes the pipeline, where the sender now blocks, and
	// the ones behind it follow.
	const held = 10
	gate.close()
	before = a.dev.InlineStats()
	for seq := uint32(1); seq <= held+1; seq++ {
		a.tun.Outbound <- seqPacket(a.ip, b.ip, seq, 200)
	}
	// As in TestRunToCompletionOutboundBacklog, packets 1..held have been
	// dispatched once the last send returned.
	mid := a.dev.InlineStats()
	if got := mid.OutInline - before.OutInline; got != 0 {
		t.Errorf("%d batches inline right after a slow send", got)
	}
	if got := mid.OutPipeline - before.OutPipeline; got < held {
		t.Errorf("%d batches took the pipeline after a slow send, want at least %d", got, held)
	}
	gate.open()
	expectSeqs(t, b, 1, held+1)

	waitZero(t, "after the slow send", &peer.inline.out.pending)
	before = a.dev.InlineStats()
	const after = 10
	for seq := uint32(held + 2); seq < held+2+after; seq++ {
		a.tun.Outbound <- seqPacket(a.ip, b.ip, seq, 200)
	}
	expectSeqs(t, b, held+2, after)
	if got := a.dev.InlineStats().OutInline - before.OutInline; got < after {
		t.Errorf("%d batches inline once the pipeline drained, want %d", got, after)
	}
}

// TestRunToCompletionSlowSendOnSharedSocket: a send whose endpoint says it
// waits only on the socket all peers share (a direct path's) is not timed:
// however slow, the batches behind it stay inline, since the pipeline's
// sender would wait for the same socket.
func TestRunToCompletionSlowSendOnSharedSocket(t *testing.T) {
	a, b, _, gate := slowSendPair(t, true)

	before := a.dev.InlineStats()
	gate.slow.Store(true)
	const n = 10
	for seq := uint32(0); seq < n; seq++ {
		a.tun.Outbound <- seqPacket(a.ip, b.ip, seq, 200)
		expectSeqs(t, b, seq, 1)
	}
	gate.slow.Store(false)
	st := a.dev.InlineStats()
	if st.SlowSends != before.SlowSends {
		t.Errorf("%d slow sends counted on a shared socket, want none", st.SlowSends-before.SlowSends)
	}
	if got := st.OutInline - before.OutInline; got < n {
		t.Errorf("%d batches inline, want %d", got, n)
	}
	if got := st.OutPipeline - before.OutPipeline; got != 0 {
		t.Errorf("%d batches took the pipeline behind slow sends on a shared socket", got)
	}
}
