/* SPDX-License-Identifier: MIT
 *
 * Copyright (C) 2026 meshd authors: this file is meshd's, not upstream's.
 */

package device

import (
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn/bindtest"
	"golang.zx2c4.com/wireguard/tun"
	"golang.zx2c4.com/wireguard/tun/tuntest"
)

// answeringTUN is a TUN shaped like gVisor's netstack (tun/netstack): it
// answers every packet written to it on the writer's goroutine (as gVisor
// answers an ICMP echo), and the writer waits until the TUN reader has
// read the answer (as netstack's WriteNotify hands it over an unbuffered
// channel). Packets leave in the order they were queued.
type answeringTUN struct {
	mu      sync.Mutex
	cond    sync.Cond
	queue   [][]byte // waiting for the reader, oldest first
	read    uint64   // packets taken from queue so far
	queued  uint64   // packets put in queue so far
	closed  bool
	events  chan tun.Event
	writing chan []byte // each packet written, once its writer waits
}

func newAnsweringTUN() *answeringTUN {
	t := &answeringTUN{events: make(chan tun.Event, 1), writing: make(chan []byte, 16)}
	t.cond.L = &t.mu
	t.events <- tun.EventUp
	return t
}

// inject queues p for the reader without waiting, as an application
// sending through the stack does.
func (t *answeringTUN) inject(p []byte) {
	t.mu.Lock()
	t.queue = append(t.queue, p)
	t.queued++
	t.mu.Unlock()
	t.cond.Broadcast()
}

// take removes the oldest queued packet as the reader would, for a test
// that has to free a writer the reader cannot reach.
func (t *answeringTUN) take() []byte {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.queue) == 0 {
		return nil
	}
	p := t.queue[0]
	t.queue = t.queue[1:]
	t.read++
	t.cond.Broadcast()
	return p
}

func (t *answeringTUN) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for len(t.queue) == 0 && !t.closed {
		t.cond.Wait()
	}
	if t.closed {
		return 0, os.ErrClosed
	}
	p := t.queue[0]
	t.queue = t.queue[1:]
	t.read++
	t.cond.Broadcast()
	sizes[0] = copy(bufs[0][offset:], p)
	return 1, nil
}

func (t *answeringTUN) Write(bufs [][]byte, offset int) (int, error) {
	for _, b := range bufs {
		p := b[offset:]
		answer := make([]byte, len(p))
		copy(answer, p)
		copy(answer[12:16], p[16:20]) // back to the sender
		copy(answer[16:20], p[12:16])
		t.mu.Lock()
		t.queue = append(t.queue, answer)
		t.queued++
		mine := t.queued
		t.cond.Broadcast()
		select {
		case t.writing <- answer:
		default:
		}
		for t.read < mine && !t.closed {
			t.cond.Wait()
		}
		closed := t.closed
		t.mu.Unlock()
		if closed {
			return 0, os.ErrClosed
		}
	}
	return len(bufs), nil
}

func (t *answeringTUN) File() *os.File           { return nil }
func (t *answeringTUN) MTU() (int, error)        { return DefaultMTU, nil }
func (t *answeringTUN) Name() (string, error)    { return "answering", nil }
func (t *answeringTUN) Events() <-chan tun.Event { return t.events }
func (t *answeringTUN) BatchSize() int           { return 1 }

func (t *answeringTUN) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.closed {
		t.closed = true
		close(t.events)
		t.cond.Broadcast()
	}
	return nil
}

// TestRunToCompletionTUNWriteWaitsForRead builds the deadlock a TUN like
// gVisor's netstack makes with inline receive (inline.go, "What waits for
// what") and checks that a device told so (SetTUNWriteWaitsForRead) does
// not enter it:
//
//  1. The TUN reader of device a sends packet x1 inline; the bind holds
//     the send, so the reader holds device.net's read lock.
//  2. Packet x2 waits in a's TUN for the reader.
//  3. Device b sends a packet to a; a's TUN answers it on the writer's
//     goroutine, which waits until the reader has read the answer (queued
//     behind x2).
//  4. BindUpdate (a listen port change, a route change) waits for
//     device.net's write lock.
//  5. The bind lets x1 go. BindUpdate takes the lock, closes the bind and
//     waits for the receive goroutines; the reader reads x2 and waits
//     for the read lock to send it.
//
// If the writer in 3 is a receive goroutine (inline receive), BindUpdate
// waits for it, it waits for the reader, the reader waits for BindUpdate:
// BindUpdate never returns. If it is the sequential receiver, the receive
// goroutines return, BindUpdate completes, and the reader sends x2 and
// then reads the answer. The first case is run too, to show the deadlock
// is real; the test then frees the writer by reading the answer itself.
func TestRunToCompletionTUNWriteWaitsForRead(t *testing.T) {
	for _, tc := range []struct {
		name        string
		declared    bool // SetTUNWriteWaitsForRead(true)
		wantInline  bool // the answered packet was received inline
		wantUpdated bool // BindUpdate returns while the writer waits
	}{
		{name: "declared", declared: true, wantInline: false, wantUpdated: true},
		{name: "undeclared", declared: false, wantInline: true, wantUpdated: false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, endpointCfg := genConfigs(t)
			binds := bindtest.NewChannelBinds()
			gate := &gatedBind{Bind: binds[0], blocked: make(chan struct{}, 1)}
			binds[0] = gate
			atun := newAnsweringTUN()
			btun := tuntest.NewChannelTUN()
			aip, bip := netip.AddrFrom4([4]byte{1, 0, 0, 1}), netip.AddrFrom4([4]byte{1, 0, 0, 2})
			a := NewDevice(atun, binds[0], NewLogger(LogLevelError, "dev0: "))
			b := NewDevice(btun.TUN(), binds[1], NewLogger(LogLevelError, "dev1: "))
			a.SetRunToCompletion(true)
			b.SetRunToCompletion(true)
			a.SetTUNWriteWaitsForRead(tc.declared)
			for i, d := range []*Device{a, b} {
				if err := d.IpcSet(cfg[i]); err != nil {
					t.Fatalf("configure device %d: %v", i, err)
				}
				if err := d.Up(); err != nil {
					t.Fatalf("bring up device %d: %v", i, err)
				}
			}
			for i, d := range []*Device{a, b} {
				other := []*Device{b, a}[i]
				if err := d.IpcSet(fmt.Sprintf(endpointCfg[i], other.net.port)); err != nil {
					t.Fatalf("configure device %d endpoint: %v", i, err)
				}
			}
			// Cleanups run last first: the gate opens before the devices close.
			t.Cleanup(b.Close)
			t.Cleanup(a.Close)
			t.Cleanup(gate.release)

			recv := func(what string) []byte {
				t.Helper()
				select {
				case p := <-btun.Inbound:
					return p
				case <-time.After(10 * time.Second):
					t.Fatalf("%s did not reach b", what)
					return nil
				}
			}
			// The handshake, and a's TUN answering a packet from b.
			atun.inject(seqPacket(aip, bip, 0, 100))
			if s := packetSeq(recv("a's first packet")); s != 0 {
				t.Fatalf("b got sequence %d, want 0", s)
			}
			btun.Outbound <- seqPacket(bip, aip, 1, 100)
			if s := packetSeq(recv("the answer to b's first packet")); s != 1 {
				t.Fatalf("b got sequence %d, want 1", s)
			}
			<-atun.writing
			peer := onlyPeer(t, a)
			waitZero(t, "after the first exchange", &peer.inline.in.pending)

			// 1 and 2.
			gate.close()
			atun.inject(seqPacket(aip, bip, 2, 100)) // x1
			<-gate.blocked
			atun.inject(seqPacket(aip, bip, 3, 100)) // x2
			// 3.
			before := a.InlineStats()
			btun.Outbound <- seqPacket(bip, aip, 4, 100)
			select {
			case <-atun.writing:
			case <-time.After(10 * time.Second):
				t.Fatal("b's packet was not written to a's TUN")
			}
			st := a.InlineStats()
			if gotInline := st.InInline > before.InInline; gotInline != tc.wantInline {
				t.Fatalf("received inline: %v, want %v (stats %+v, before %+v)", gotInline, tc.wantInline, st, before)
			}
			// 4: wait until BindUpdate is queued for the write lock,
			// which makes a new reader fail TryRLock.
			updated := make(chan error, 1)
			go func() { updated <- a.BindUpdate() }()
			deadline := time.Now().Add(10 * time.Second)
			for a.net.TryRLock() {
				a.net.RUnlock()
				if time.Now().After(deadline) {
					t.Fatal("BindUpdate did not wait for device.net")
				}
				runtime.Gosched()
			}
			// 5.
			gate.open()
			select {
			case err := <-updated:
				if !tc.wantUpdated {
					t.Fatalf("BindUpdate returned (%v) with the receive goroutine waiting for the TUN reader", err)
				}
				if err != nil {
					t.Fatalf("BindUpdate: %v", err)
				}
			case <-time.After(5 * time.Second):
				if tc.wantUpdated {
					t.Fatal("BindUpdate deadlocked: a receive goroutine waits in the TUN's Write for the TUN reader, which waits for device.net")
				}
				// The deadlock is real: free the writer as the
				// reader would, and everything unwinds.
				if p := atun.take(); p == nil || packetSeq(p) != 4 {
					t.Fatalf("a's TUN held %v, want the answer to sequence 4", p)
				}
				if err := <-updated; err != nil {
					t.Fatalf("BindUpdate: %v", err)
				}
			}
			// x1, x2 and, unless the test took it, the answer reach b in
			// order: the reader is free again.
			want := []uint32{2, 3, 4}
			if !tc.wantUpdated {
				want = want[:2]
			}
			for _, w := range want {
				if s := packetSeq(recv(fmt.Sprintf("sequence %d", w))); s != w {
					t.Fatalf("b got sequence %d, want %d", s, w)
				}
			}
		})
	}
}
