/* SPDX-License-Identifier: MIT
 *
 * Copyright (C) 2026 meshd authors: this file is meshd's, not upstream's.
 */

package device

import (
	"encoding/hex"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// churnSeq marks the packets sent while a peer churns: they may be lost,
// and the checks after the churn skip them.
const churnSeq = 1 << 30

// churnEnd follows the last packet sent during the churn.
const churnEnd = churnSeq - 1

// TestRunToCompletionPeerChurn changes a peer's life under traffic in
// both directions, as a node's restart, a rekey or a map change does, and
// then checks that the run-to-completion state came back clean: no batch
// counted as pending that will never be counted down (which would keep
// the peer off the inline path for good), no direction's mutex left held
// (which would stall the TUN reader or a receive goroutine for good), and
// traffic both ways arriving, in order, inline. Run it with -race too.
func TestRunToCompletionPeerChurn(t *testing.T) {
	for _, tc := range []struct {
		name string
		// churn changes a's peer b; peerCfg re-adds it.
		churn func(t *testing.T, a *testPeer, peerCfg string)
	}{
		{"peer removed and added again", func(t *testing.T, a *testPeer, peerCfg string) {
			pk := onlyPeer(t, a.dev).handshake.remoteStatic
			if err := a.dev.IpcSet(uapiCfg("public_key", hex.EncodeToString(pk[:]), "remove", "true")); err != nil {
				t.Fatal(err)
			}
			if err := a.dev.IpcSet(peerCfg); err != nil {
				t.Fatal(err)
			}
		}},
		{"device down and up", func(t *testing.T, a *testPeer, _ string) {
			if err := a.dev.Down(); err != nil {
				t.Fatal(err)
			}
			if err := a.dev.Up(); err != nil {
				t.Fatal(err)
			}
		}},
		{"keypairs expired", func(t *testing.T, a *testPeer, _ string) {
			onlyPeer(t, a.dev).ExpireCurrentKeypairs()
		}},
		{"bind updated", func(t *testing.T, a *testPeer, _ string) {
			if err := a.dev.BindUpdate(); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pair, gate := genGatedPair(t)
			pair.Send(t, Ping, nil)
			pair.Send(t, Pong, nil)
			a, b := &pair[0], &pair[1]
			bk := b.dev.staticIdentity.publicKey
			peerCfg := uapiCfg("public_key", hex.EncodeToString(bk[:]), "protocol_version", "1",
				"allowed_ip", b.ip.String()+"/32", "endpoint", fmt.Sprintf("127.0.0.1:%d", b.dev.net.port))

			// Traffic both ways until stop, counted and dropped on
			// arrival until stopRead; ended[i] closes when churnEnd
			// first arrives that way.
			stop, stopRead := make(chan struct{}), make(chan struct{})
			var senders, readers sync.WaitGroup
			var arrived [2]atomic.Uint64 // at b, at a
			ended := [2]chan struct{}{make(chan struct{}), make(chan struct{})}
			for i, dir := range [][2]*testPeer{{a, b}, {b, a}} {
				from, to := dir[0], dir[1]
				senders.Add(1)
				readers.Add(1)
				go func() {
					defer senders.Done()
					for seq := uint32(churnSeq); ; seq++ {
						select {
						case from.tun.Outbound <- seqPacket(from.ip, to.ip, seq, 200):
						case <-stop:
							return
						}
					}
				}()
				go func() {
					defer readers.Done()
					seen := false
					for {
						select {
						case p := <-to.tun.Inbound:
							if packetSeq(p) == churnEnd {
								if !seen {
									close(ended[i])
								}
								seen = true
								continue
							}
							arrived[i].Add(1)
						case <-stopRead:
							return
						}
					}
				}()
			}
			// Each round churns with a different mix of paths, so that
			// some rounds stop the peer with batches in its pipeline
			// (and a's sends looking slow send its next batch there),
			// and waits for traffic to flow both ways again.
			for round := range 6 {
				a.dev.SetRunToCompletion(round%2 == 0)
				b.dev.SetRunToCompletion(round%3 != 0)
				gate.slow.Store(round%2 == 1)
				tc.churn(t, a, peerCfg)
				for i := range arrived {
					waitStat(t, arrived[i].Load, arrived[i].Load()+20)
				}
			}
			gate.slow.Store(false)
			a.dev.SetRunToCompletion(true)
			b.dev.SetRunToCompletion(true)
			close(stop)
			senders.Wait()
			// Each way, churnEnd follows the churn's packets. It is
			// sent again every second until it arrives: one packet may
			// be lost for good across a rekey (after expired keypairs
			// the peer's packets under the old keypair are dropped until
			// a handshake completes), which is WireGuard's behaviour,
			// not a stuck path; the checks below catch one of those.
			// Up to 30 s, as waitStat allows: a handshake and its
			// retries (5 s each) on a loaded machine.
			give := time.After(30 * time.Second)
			resend := time.NewTicker(time.Second)
			for i, dir := range [][2]*testPeer{{a, b}, {b, a}} {
				from, to := dir[0], dir[1]
				for done := false; !done; {
					from.tun.Outbound <- seqPacket(from.ip, to.ip, churnEnd, 200)
					select {
					case <-ended[i]:
						done = true
					case <-resend.C:
					case <-give:
						t.Fatalf("%v -> %v: the end of the churn did not arrive in 30 s, sent every second", from.ip, to.ip)
					}
				}
			}
			resend.Stop()

			// The pipelines drained and left nothing counted (the
			// readers still take anything in flight); no mutex is left
			// held.
			for _, p := range []*testPeer{a, b} {
				peer := onlyPeer(t, p.dev)
				waitZero(t, fmt.Sprintf("%v outbound", p.ip), &peer.inline.out.pending)
				waitZero(t, fmt.Sprintf("%v inbound", p.ip), &peer.inline.in.pending)
				// A keepalive or a handshake's flush may hold one for
				// a moment; held for good, it never comes free.
				for _, m := range []*sync.Mutex{&peer.inline.out.Mutex, &peer.inline.in.Mutex} {
					deadline := time.Now().Add(10 * time.Second)
					for !m.TryLock() {
						if time.Now().After(deadline) {
							t.Fatalf("%v: a run-to-completion mutex is still held 10 s after the churn", p.ip)
						}
						runtime.Gosched()
					}
					m.Unlock()
				}
			}
			close(stopRead)
			readers.Wait()
			// Ordered traffic each way, every batch inline. A resent
			// end marker still in flight may come first.
			const n = 50
			for _, dir := range [][2]*testPeer{{a, b}, {b, a}} {
				from, to := dir[0], dir[1]
				before, beforeTo := from.dev.InlineStats(), to.dev.InlineStats()
				go func() {
					for seq := range uint32(n) {
						from.tun.Outbound <- seqPacket(from.ip, to.ip, seq, 300)
					}
				}()
				deadline := time.NewTimer(10 * time.Second)
				for want := uint32(0); want < n; {
					select {
					case p := <-to.tun.Inbound:
						s := packetSeq(p)
						if s == churnEnd {
							continue
						}
						if s >= churnSeq {
							t.Fatalf("%v -> %v: sequence %d of the churn after its end", from.ip, to.ip, s)
						}
						if s != want {
							t.Fatalf("%v -> %v: sequence %d, want %d (reordered or lost)", from.ip, to.ip, s, want)
						}
						want++
					case <-deadline.C:
						t.Fatalf("%v -> %v: sequence %d did not arrive after the churn", from.ip, to.ip, want)
					}
				}
				deadline.Stop()
				st, stTo := from.dev.InlineStats(), to.dev.InlineStats()
				if st.OutPipeline != before.OutPipeline && from == a {
					t.Errorf("%v: %d batches took the pipeline after the churn", from.ip, st.OutPipeline-before.OutPipeline)
				}
				if st.OutInline == before.OutInline {
					t.Errorf("%v: nothing sent inline after the churn (stats %+v)", from.ip, st)
				}
				if in := stTo.InInline - beforeTo.InInline; in < n || stTo.InPipeline != beforeTo.InPipeline {
					t.Errorf("%v: %d of %d batches received inline after the churn (stats %+v, before %+v)", to.ip, in, n, stTo, beforeTo)
				}
			}
		})
	}
}
