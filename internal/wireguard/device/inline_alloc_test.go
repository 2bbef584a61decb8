//go:build !race

/* SPDX-License-Identifier: MIT
 *
 * Copyright (C) 2026 meshd authors: this file is meshd's, not upstream's.
 */

// The race detector allocates.

package device

import (
	"crypto/rand"
	"encoding/binary"
	"net/netip"
	"os"
	"runtime"
	"runtime/debug"
	"testing"
	"time"

	"golang.org/x/crypto/chacha20poly1305"
	"golang.zx2c4.com/wireguard/conn/bindtest"
)

// idleTUN is a TUN that has nothing to read until it is closed.
type idleTUN struct {
	fakeTUNDeviceSized
	closed chan struct{}
}

func newIdleTUN(batch int) *idleTUN {
	return &idleTUN{fakeTUNDeviceSized: fakeTUNDeviceSized{size: batch}, closed: make(chan struct{})}
}

func (t *idleTUN) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	<-t.closed
	return 0, os.ErrClosed
}

func (t *idleTUN) Close() error {
	close(t.closed)
	return nil
}

// TestRunToCompletionAllocs checks that a batch run to completion
// allocates nothing, sending (encrypt, send) and receiving (decrypt,
// check, write to the TUN).
func TestRunToCompletionAllocs(t *testing.T) {
	const batch = 64
	dev := NewDevice(newIdleTUN(batch), &fakeBindSized{size: batch}, NewLogger(LogLevelError, ""))
	t.Cleanup(dev.Close)
	dev.SetRunToCompletion(true)
	// A stopped clock: on a loaded machine a batch can take longer than
	// inlineSlowSend, and the next would take the pipeline.
	epoch := time.Now()
	dev.inline.now = func() time.Time { return epoch }
	var sk NoisePrivateKey
	if _, err := rand.Read(sk[:]); err != nil {
		t.Fatal(err)
	}
	if err := dev.SetPrivateKey(sk); err != nil {
		t.Fatal(err)
	}
	if err := dev.Up(); err != nil {
		t.Fatal(err)
	}
	var pk NoisePublicKey
	pk[0] = 1
	peer, err := dev.NewPeer(pk)
	if err != nil {
		t.Fatal(err)
	}
	src := netip.MustParseAddr("10.0.0.2")
	dst := netip.MustParseAddr("10.0.0.1")
	dev.allowedips.Insert(netip.PrefixFrom(src, 32), peer)
	peer.endpoint.val = bindtest.ChannelEndpoint(1)
	var key [chacha20poly1305.KeySize]byte
	if _, err := rand.Read(key[:]); err != nil {
		t.Fatal(err)
	}
	aead, err := chacha20poly1305.New(key[:])
	if err != nil {
		t.Fatal(err)
	}
	kp := &Keypair{send: aead, receive: aead, isInitiator: true, created: time.Now(), remoteIndex: 1}
	peer.keypairs.Lock()
	peer.keypairs.current = kp
	peer.keypairs.Unlock()
	peer.Start()

	plain := seqPacket(src, dst, 0, 1400)
	sealed := make([][]byte, batch)
	var counter uint64
	var nonce [chacha20poly1305.NonceSize]byte

	tests := []struct {
		name  string
		run   func()
		count func(InlineStats) uint64
	}{
		{"send", func() {
			c := dev.GetOutboundElementsContainer()
			for range batch {
				e := dev.NewOutboundElement()
				e.packet = e.buffer[MessageTransportHeaderSize : MessageTransportHeaderSize+copy(e.buffer[MessageTransportHeaderSize:], plain)]
				c.elems = append(c.elems, e)
			}
			peer.StagePackets(c)
			peer.SendStagedPackets()
		}, func(s InlineStats) uint64 { return s.OutInline }},
		{"receive", func() {
			c := dev.GetInboundElementsContainer()
			c.Lock()
			for i := range batch {
				buf := dev.GetMessageBuffer()
				// A fresh counter for each packet, as the replay filter wants.
				binary.LittleEndian.PutUint32(buf[0:], MessageTransportType)
				binary.LittleEndian.PutUint64(buf[MessageTransportOffsetCounter:], counter)
				binary.LittleEndian.PutUint64(nonce[4:], counter)
				counter++
				sealed[i] = aead.Seal(buf[:MessageTransportOffsetContent], nonce[:], plain, nil)
				e := dev.GetInboundElement()
				e.buffer, e.packet, e.keypair, e.endpoint = buf, sealed[i], kp, bindtest.ChannelEndpoint(1)
				c.elems = append(c.elems, e)
			}
			peer.dispatchInbound(c)
		}, func(s InlineStats) uint64 { return s.InInline }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := tt.count(dev.InlineStats())
			const runs = 50
			// A collection empties the sync.Pools under the WaitPools, and
			// a goroutine moving to another P makes a pool steal and grow
			// its queues: both are the pools' costs, not this path's. Hold
			// collections off and keep to one P while counting.
			defer debug.SetGCPercent(debug.SetGCPercent(-1))
			defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
			// Let the pools settle on the one P: AllocsPerRun warms up
			// with a single run.
			const warm = 20
			for range warm {
				tt.run()
			}
			// AllocsPerRun counts every goroutine's allocations, and
			// devices closed by earlier tests still have goroutines
			// winding down: an allocation of this path shows in every
			// attempt, theirs pass.
			const attempts = 3
			allocs := testing.AllocsPerRun(runs, tt.run)
			for range attempts - 1 {
				allocs = min(allocs, testing.AllocsPerRun(runs, tt.run))
			}
			if allocs != 0 {
				t.Errorf("%v allocations per batch of %d, want 0", allocs, batch)
			}
			if want := uint64(warm + attempts*(runs+1)); tt.count(dev.InlineStats())-before != want {
				t.Errorf("%d batches ran inline, want %d (the runs and the warm-ups)", tt.count(dev.InlineStats())-before, want)
			}
		})
	}
}
