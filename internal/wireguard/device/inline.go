/* SPDX-License-Identifier: MIT
 *
 * Copyright (C) 2017-2025 WireGuard LLC. All Rights Reserved.
 * Copyright (C) 2026 meshd authors: this file is meshd's, not upstream's.
 */

package device

import (
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/chacha20poly1305"
	"golang.zx2c4.com/wireguard/conn"
)

/* Run to completion
 *
 * Upstream hands every batch through three goroutines per direction:
 * TUN reader -> encryption worker -> per-peer sequential sender, and UDP
 * receiver -> decryption worker -> per-peer sequential receiver. Each
 * hand-off wakes a goroutine, often on another thread, and hands the
 * batch's data to another core's cache. With few cores there is no idle
 * core for the parallel crypto to use, and the hand-offs are pure cost.
 *
 * Here the goroutine that holds a batch for a peer encrypts and sends it
 * (or decrypts it and writes it to the TUN) itself, when that peer has no
 * batch in the pipeline. A peer with a backlog keeps the pipeline, so its
 * batches stay in order behind the ones already queued, and cores beyond
 * the first can still share the crypto.
 *
 * Ordering. Per peer and direction, a mutex (peerInline.out, .in) is held
 * from the choice to the end of an inline batch, and over the push of a
 * pipeline batch, and pending counts pipeline batches not yet finished
 * by the sequential routine. A batch goes inline only with pending == 0:
 * everything before it has then been sent (written), and nothing after it
 * can be chosen until it is. Outbound, the mutex is taken around the whole
 * of SendStagedPackets, so nonces are assigned in the order batches leave.
 *
 * A send that blocks (a relay's queue full, a socket buffer full) would
 * hold up the TUN reader, and with it every other peer, where upstream
 * lets the peer's queue absorb it: after an inline send (the bind's Send,
 * not the encryption) that took longer than inlineSlowSend the peer's next
 * batch takes the pipeline, and so do
 * the batches behind it while the sequential sender is the one waiting.
 * The peer runs inline again once its pipeline has drained. A send that
 * only looked slow (the goroutine was preempted) costs one batch through
 * the pipeline. Sends to an endpoint that says it waits only on the
 * socket all peers share (SendStallReporter) are not timed: the
 * pipeline's sender would wait for that socket just the same.
 *
 * Lock order: nothing holding out takes in. The UDP receive goroutine,
 * running a batch inline, takes neither out nor device.net: see sendAside.
 *
 * What waits for what. Running a batch inline adds waits to two
 * goroutines that upstream keeps free of them, and a cycle through them
 * is a deadlock of the whole device:
 *
 *   - The TUN reader, sending inline, waits for the bind's Send, for
 *     device.net's read lock (SendBuffers) and for out, held only by
 *     goroutines that are themselves sending. Upstream's reader waits the
 *     same way for a handshake initiation; only more often here.
 *   - A UDP receive goroutine, receiving inline, waits for in (held only
 *     by another goroutine's inline batch or by Start's flush, which wait
 *     for nothing below) and for the TUN's Write. It never sends
 *     (sendAside).
 *
 * Waiting for a receive goroutine: BindUpdate, BindClose and Close, which
 * hold device.net's write lock until every receive goroutine has returned
 * (closeBindLocked), and so, behind that lock, every sender. A receive
 * goroutine must therefore never wait for a sender, and the one way it
 * could is the TUN's Write waiting for the TUN reader. A kernel TUN never
 * does: the kernel queues its answer for the reader or drops it. gVisor's
 * netstack does: it answers some packets (an ICMP echo, a RST, a port
 * unreachable) on the writer's goroutine and hands every packet it emits
 * to the reader over an unbuffered channel (tun/netstack's WriteNotify).
 * The cycle is then: receive goroutine in Write -> TUN reader in
 * SendBuffers -> BindUpdate holding device.net -> receive goroutine
 * (TestRunToCompletionTUNWriteWaitsForRead builds it). A device whose TUN
 * is of that kind is told so (SetTUNWriteWaitsForRead) and never writes to
 * the TUN from a receive goroutine: inbound batches take upstream's
 * pipeline, whose sequential receiver nothing under device.net waits for,
 * while outbound batches may still run inline on the reader. With that,
 * every wait chain ends: receive goroutine -> in -> (nothing); TUN reader
 * -> out, Send, device.net -> receive goroutine -> (never the reader).
 * One chain is upstream's own and stays: a receive goroutine blocked
 * pushing to a peer's full inbound queue (QueueInboundSize batches) whose
 * sequential receiver waits for such a TUN's reader. The reader sending
 * inline takes device.net's read lock per batch where upstream's takes it
 * per handshake, so that chain closes under a BindUpdate more easily here;
 * it needs a thousand batches stuck behind one peer's TUN write.
 */

// inlineMaxProcs is the most Ps at which a device runs batches to
// completion by default. On two to four cores one flow's wake-ups are the
// cost to cut; with more, the pipeline's parallel crypto can be worth its
// wake-ups for many peers at once (see the package README).
const inlineMaxProcs = 4

// inlineSlowSend is the inline send after which the peer's next batch
// takes the pipeline. The kernel takes a batch of 64 KB in well under a
// millisecond; a relay's full queue makes the sender wait for as long as
// the relay takes to forward the batch (5 ms is 64 KB at 100 Mbit/s). Set
// lower, a loaded machine's preemptions pass for slow sends (measured:
// bench/throughput.md, "Run-to-completion lever").
const inlineSlowSend = 5 * time.Millisecond

func inlineByDefault() bool {
	return runtime.GOMAXPROCS(0) <= inlineMaxProcs
}

// deviceInline is the device's run-to-completion switch and its counters
// of batches per path, which tests and benchmarks read.
type deviceInline struct {
	enabled     atomic.Bool
	tunWaits    atomic.Bool // the TUN's Write may wait for its reader: no inline receive
	outInline   atomic.Uint64
	outPipeline atomic.Uint64
	inInline    atomic.Uint64
	inPipeline  atomic.Uint64
	slowSends   atomic.Uint64

	now func() time.Time // time.Now, but for tests
}

// peerInline is one peer's run-to-completion state, per direction. The
// scratch space (bufs, nonce) belongs to whoever holds the mutex.
type peerInline struct {
	out struct {
		sync.Mutex
		pending  atomic.Int64 // batches pushed to the pipeline and not yet sent
		bufs     [][]byte
		nonce    [chacha20poly1305.NonceSize]byte
		lastSlow bool // the last inline send took longer than inlineSlowSend
	}
	in struct {
		sync.Mutex
		pending atomic.Int64 // batches pushed to the pipeline and not yet written
		bufs    [][]byte
		nonce   [chacha20poly1305.NonceSize]byte
	}
}

// SetRunToCompletion turns running batches to completion on or off; off,
// the device is upstream's pipeline. The default is on with at most
// inlineMaxProcs Ps. It may be called at any time: a batch already in the
// pipeline keeps the next ones there until it has left.
func (device *Device) SetRunToCompletion(on bool) {
	device.inline.enabled.Store(on)
}

// SetTUNWriteWaitsForRead tells the device whether a Write to its TUN may
// wait until the device's own TUN reader has read something, as with
// gVisor's netstack, which answers some packets on the writer's goroutine
// and hands the answer to the reader over an unbuffered channel. Such a
// TUN is never written to from a UDP receive goroutine, whatever
// SetRunToCompletion says: inbound batches take upstream's pipeline (the
// comment at the top of inline.go has the deadlock this avoids). The
// default is false, right for a kernel TUN. Call it before traffic flows;
// a change applies from the next batch received.
func (device *Device) SetTUNWriteWaitsForRead(waits bool) {
	device.inline.tunWaits.Store(waits)
}

// InlineStats are the counts of batches that ran to completion and of
// batches that went through the pipeline, per direction.
type InlineStats struct {
	OutInline, OutPipeline uint64
	InInline, InPipeline   uint64
	// SlowSends counts inline sends that took longer than inlineSlowSend
	// and sent their peer's next batch to the pipeline.
	SlowSends uint64
}

// InlineStats returns the device's batch counts since it was created.
func (device *Device) InlineStats() InlineStats {
	return InlineStats{
		OutInline:   device.inline.outInline.Load(),
		OutPipeline: device.inline.outPipeline.Load(),
		InInline:    device.inline.inInline.Load(),
		InPipeline:  device.inline.inPipeline.Load(),
		SlowSends:   device.inline.slowSends.Load(),
	}
}

// dispatchOutbound encrypts and sends elemsContainer, whose nonces are
// assigned, or queues it to the pipeline when the peer has a backlog
// there. The caller (SendStagedPackets) holds peer.inline.out.
func (peer *Peer) dispatchOutbound(elemsContainer *QueueOutboundElementsContainer) {
	device := peer.device
	out := &peer.inline.out
	if device.inline.enabled.Load() && out.pending.Load() == 0 && !out.lastSlow {
		device.inline.outInline.Add(1)
		for _, elem := range elemsContainer.elems {
			device.sealElem(elem, &out.nonce)
		}
		// The container stays locked, as the sequential sender leaves
		// it: GetOutboundElementsContainer resets the mutex.
		if !peer.sendMayStall() {
			out.bufs = peer.sendContainer(elemsContainer, out.bufs)
			return
		}
		start := device.inline.clock()
		out.bufs = peer.sendContainer(elemsContainer, out.bufs)
		if device.inline.clock().Sub(start) > inlineSlowSend {
			out.lastSlow = true
			device.inline.slowSends.Add(1)
		}
		return
	}
	out.lastSlow = false
	out.pending.Add(1)
	device.inline.outPipeline.Add(1)
	peer.queue.outbound.c <- elemsContainer
	device.queue.encryption.c <- elemsContainer
}

// SendStallReporter is implemented by a conn.Endpoint that knows whether
// a send to it can wait on something of its peer's alone, such as a
// relay's queue for that peer, rather than only on the UDP socket every
// peer shares. Only such a wait is worth the slow-send fallback (a batch
// through the pipeline so the TUN reader goes on for other peers): when
// the shared socket's buffer is full, every peer's sends wait for it
// whichever goroutine makes them, and timing them only moved batches to
// the pipeline for nothing (up to 8% CPU per GB in bench/throughput.md).
// An endpoint that does not implement it may stall.
type SendStallReporter interface {
	conn.Endpoint
	// SendMayStall reports whether the next send may wait on the peer's
	// own path. It is called once per inline batch and must be cheap.
	SendMayStall() bool
}

// sendMayStall asks the peer's endpoint whether a send to it may stall
// on its own (SendStallReporter).
func (peer *Peer) sendMayStall() bool {
	peer.endpoint.Lock()
	ep := peer.endpoint.val
	peer.endpoint.Unlock()
	if r, ok := ep.(SendStallReporter); ok {
		return r.SendMayStall()
	}
	return true
}

func (d *deviceInline) clock() time.Time {
	if d.now != nil {
		return d.now()
	}
	return time.Now()
}

// dispatchInbound decrypts elemsContainer and writes it to the TUN, or
// queues it to the pipeline when the peer has a backlog there or the TUN's
// Write may wait for the TUN reader (SetTUNWriteWaitsForRead).
func (peer *Peer) dispatchInbound(elemsContainer *QueueInboundElementsContainer) {
	device := peer.device
	in := &peer.inline.in
	in.Lock()
	defer in.Unlock()
	if device.inline.enabled.Load() && !device.inline.tunWaits.Load() && in.pending.Load() == 0 {
		device.inline.inInline.Add(1)
		for _, elem := range elemsContainer.elems {
			openElem(elem, &in.nonce)
		}
		in.bufs = peer.receiveContainer(elemsContainer, in.bufs, true)
		return
	}
	in.pending.Add(1)
	device.inline.inPipeline.Add(1)
	peer.queue.inbound.c <- elemsContainer
	device.queue.decryption.c <- elemsContainer
}

// flushQueuesAndResetInline empties the peer's pipeline queues, as
// upstream's Start does, and zeroes the pending counts: the batches
// flushed (and those the stopped sequential routines dropped) will never
// be counted down. Each flush holds its direction's mutex, so that no
// batch is pushed between the flush and the reset; the two are taken one
// after the other, never nested, to keep the lock order.
func (peer *Peer) flushQueuesAndResetInline() {
	device := peer.device
	peer.inline.in.Lock()
	device.flushInboundQueue(peer.queue.inbound)
	peer.inline.in.pending.Store(0)
	peer.inline.in.Unlock()

	peer.inline.out.Lock()
	device.flushOutboundQueue(peer.queue.outbound)
	peer.inline.out.pending.Store(0)
	peer.inline.out.Unlock()
}

// sendAside runs send, which may send a packet, on a goroutine of its own
// when inline says the caller is the UDP receive goroutine: sending takes
// device.net's read lock (SendBuffers) and maybe peer.inline.out, while
// BindUpdate and BindClose hold device.net's write lock until every
// receive goroutine has returned (closeBindLocked). Upstream's sequential
// receiver, which made these calls, is not among the goroutines waited
// for. Only a new session's first packet (to flush the staged packets) and
// the last-minute rekey come here, not every batch.
func sendAside(inline bool, send func()) {
	if inline {
		go send()
		return
	}
	send()
}
