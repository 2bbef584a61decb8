package filter

import (
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"

	"meshd.dev/meshd/packet"
)

// checkShard verifies a shard's invariants: every slot is exactly one of
// live (in the LRU list and the index), free (in the free list) or never
// used; the index finds every live entry; peer counts match the entries.
func checkShard(t *testing.T, s *flowShard) {
	t.Helper()
	state := make([]byte, len(s.entries)) // 0 unseen, 1 live, 2 free
	live := 0
	prev := int32(-1)
	for e := s.head; e >= 0; e = s.entries[e].next {
		if state[e] != 0 || e >= s.used {
			t.Fatalf("slot %d in the LRU list twice or beyond the high-water mark %d", e, s.used)
		}
		if s.entries[e].prev != prev {
			t.Fatalf("slot %d: prev %d, want %d", e, s.entries[e].prev, prev)
		}
		state[e] = 1
		prev = e
		live++
	}
	if s.tail != prev || live != s.n {
		t.Fatalf("tail %d (want %d), n %d (list holds %d)", s.tail, prev, s.n, live)
	}
	for e := s.free; e >= 0; e = s.entries[e].next {
		if state[e] != 0 || e >= s.used {
			t.Fatalf("free slot %d also live, listed twice, or beyond the high-water mark", e)
		}
		state[e] = 2
	}
	for e := int32(0); e < s.used; e++ {
		if state[e] == 0 {
			t.Fatalf("slot %d below the high-water mark is neither live nor free (leaked)", e)
		}
	}
	indexed := 0
	for i := range s.index {
		if v := s.index[i].Load(); v > 0 {
			indexed++
			if state[v-1] != 1 {
				t.Fatalf("index points at slot %d, which is not live", v-1)
			}
		}
	}
	if indexed != live {
		t.Fatalf("index holds %d entries, %d are live", indexed, live)
	}
	counts := map[int32]int32{}
	for e := s.head; e >= 0; e = s.entries[e].next {
		en := &s.entries[e]
		kw := en.words()
		if _, got := s.find(&kw, en.hash.Load()); got != e {
			t.Fatalf("find(slot %d's key) = %d", e, got)
		}
		if exp, st, res := s.peek(&kw, en.hash.Load()); res != peekHit || exp != en.expires.Load() || uint32(st) != en.state.Load() {
			t.Fatalf("peek(slot %d's key) = %d, %d, %d; want a hit", e, exp, st, res)
		}
		counts[en.peer]++
	}
	for p, c := range counts {
		if s.peers[p].count != c {
			t.Fatalf("peer slot %d counts %d entries, holds %d", p, s.peers[p].count, c)
		}
		if _, got := s.peerFind(&s.peers[p].addr, s.peers[p].hash); got != p {
			t.Fatalf("peerFind(peer slot %d) = %d", p, got)
		}
	}
}

// TestFlowTableModel drives a small table through random inserts, lookups
// and expiries (so slots are evicted, freed and reused) and checks the
// invariants after every step.
func TestFlowTableModel(t *testing.T) {
	ttl := &timeouts{tcp: 100, tcpClosing: 10, udp: 50, icmp: 20, other: 20, frag: 5}
	for _, tc := range []struct {
		name                  string
		capacity, perPeer, sh int
	}{
		{"one shard", 16, 16, 1},
		{"per-peer quota", 32, 6, 2},
		{"many shards", 64, 64, 8},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ft := newFlowTable(tc.capacity, tc.perPeer, tc.sh)
			for i := range ft.shards {
				if ft.shards[i].used != 0 || ft.shards[i].head != -1 || ft.shards[i].free != -1 {
					t.Fatal("a new shard has used slots")
				}
			}
			rng := rand.New(rand.NewPCG(1, uint64(tc.capacity)))
			now := int64(1000)
			for step := range 20000 {
				k := flowKey{
					local:  packet.Addr{Lo: 1},
					remote: packet.Addr{Lo: uint64(rng.IntN(5))},
					lport:  uint16(rng.IntN(40)), rport: 443, proto: protoUDP,
				}
				switch r := rng.IntN(10); {
				case r < 5:
					ft.insert(&k, stLocal, now, 0, ttl)
					if _, ok := ft.lookup(&k, now, 0, ttl); !ok {
						t.Fatalf("step %d: flow missing right after insert", step)
					}
				case r < 9:
					ft.lookup(&k, now, 0, ttl)
				default:
					now += int64(rng.IntN(60)) // some entries expire
				}
				for i := range ft.shards {
					checkShard(t, &ft.shards[i])
				}
			}
		})
	}
}

// TestFlowTableLockFreeReads hammers a small table with inserts (so slots
// are evicted and reused and index runs shift) while other goroutines look
// keys up, mostly without the lock: a reader must never see a key that was
// never inserted, nor a state that was never stored for the key it asked
// for (run with -race).
func TestFlowTableLockFreeReads(t *testing.T) {
	ttl := &timeouts{tcp: 1e12, tcpClosing: 1e12, udp: 1e12, icmp: 1e12, other: 1e12, frag: 1e12}
	ft := newFlowTable(32, 32, 2)
	const now = 1000
	key := func(r, l int) flowKey {
		return flowKey{local: packet.Addr{Lo: 1}, remote: packet.Addr{Lo: uint64(r)}, lport: uint16(l), rport: 443, proto: protoUDP}
	}
	// A key's state is a function of the key, so a torn read shows.
	wantState := func(r, l int) uint8 {
		if (r+l)%2 == 0 {
			return stLocal
		}
		return 0
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			for range 20000 {
				r, l := rng.IntN(4), rng.IntN(64)
				k := key(r, l)
				ft.insert(&k, wantState(r, l), now, 0, ttl)
			}
		}()
	}
	errs := make(chan string, 2)
	var hits atomic.Int64
	for g := range 2 {
		go func() {
			rng := rand.New(rand.NewPCG(uint64(g), 2))
			// At least 20000 lookups each (the table keeps 32 flows after
			// the writers stop, so some hit), and on until the writers are
			// done.
			for i := 0; ; i++ {
				if i >= 20000 {
					select {
					case <-done:
						errs <- ""
						return
					default:
					}
				}
				r, l := rng.IntN(4), rng.IntN(64)
				k := key(r, l)
				if st, ok := ft.lookup(&k, now, 0, ttl); ok {
					hits.Add(1)
					if st != wantState(r, l) {
						errs <- fmt.Sprintf("key (%d, %d): state %d, stored %d", r, l, st, wantState(r, l))
						return
					}
				}
				k.proto = protoTCP // never inserted
				if _, ok := ft.lookup(&k, now, 0, ttl); ok {
					errs <- fmt.Sprintf("key (%d, %d, tcp) found, never inserted", r, l)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(done)
	for range 2 {
		if e := <-errs; e != "" {
			t.Fatal(e)
		}
	}
	if hits.Load() == 0 {
		t.Fatal("no lookup ever hit: the test exercised nothing")
	}
	for i := range ft.shards {
		checkShard(t, &ft.shards[i])
	}
}

// A hit rewrites a flow's expiry only when it has fallen behind by more
// than refreshSlack (min(1 s, timeout/64)); a FIN or RST always takes
// effect at once.
func TestFlowRefreshSlack(t *testing.T) {
	const sec = int64(1e9)
	ttl := &timeouts{tcp: 7200 * sec, tcpClosing: 30 * sec, udp: 180 * sec, icmp: 30 * sec, other: 180 * sec, frag: 64}
	expires := func(ft *flowTable, k *flowKey) int64 {
		kw := k.words()
		h := ft.hash(&kw)
		s := ft.shard(h)
		_, e := s.find(&kw, h)
		if e < 0 {
			t.Fatalf("flow %+v missing", k)
		}
		return s.entries[e].expires.Load()
	}
	ft := newFlowTable(16, 16, 1)
	udp := flowKey{local: packet.Addr{Lo: 1}, remote: packet.Addr{Lo: 2}, lport: 1, rport: 2, proto: protoUDP}
	const t0 = 1000 * sec
	ft.insert(&udp, stLocal, t0, 0, ttl)
	for _, s := range []struct {
		at, want int64
	}{
		{t0 + sec/2, t0 + 180*sec},           // within the slack: no write
		{t0 + sec, t0 + 180*sec},             // exactly the slack: no write
		{t0 + 3*sec/2, t0 + 181*sec + sec/2}, // beyond: refreshed
	} {
		if _, ok := ft.lookup(&udp, s.at, 0, ttl); !ok {
			t.Fatalf("lookup at %d: missing", s.at-t0)
		}
		if got := expires(ft, &udp); got != s.want {
			t.Errorf("after a hit at t0+%dms: expires t0+%dms, want t0+%dms", (s.at-t0)/1e6, (got-t0)/1e6, (s.want-t0)/1e6)
		}
	}
	// Idle since the last refresh: gone at the refreshed expiry (so at
	// most one slack before "last packet + timeout").
	if _, ok := ft.lookup(&udp, t0+181*sec+sec/2, 0, ttl); ok {
		t.Error("flow alive at its expiry")
	}

	// FIN inside the slack still closes the flow at once.
	tcp := flowKey{local: packet.Addr{Lo: 1}, remote: packet.Addr{Lo: 2}, lport: 3, rport: 4, proto: protoTCP}
	ft.insert(&tcp, stLocal, t0, tcpSYN, ttl)
	if st, ok := ft.lookup(&tcp, t0+1, tcpFIN|tcpACK, ttl); !ok || st&stClosing == 0 {
		t.Fatalf("FIN: state %d, ok %v; want closing", st, ok)
	}
	if got := expires(ft, &tcp); got != t0+1+30*sec {
		t.Errorf("after FIN: expires t0+%dns, want t0+30s+1ns", got-t0)
	}

	// A tiny timeout has a tiny slack (64 ns -> 1 ns): refreshed by the
	// next nanosecond but one.
	frag := flowKey{local: packet.Addr{Lo: 1}, remote: packet.Addr{Lo: 2}, proto: protoUDP, kind: kindFrag}
	ft.insert(&frag, 0, t0, 0, ttl)
	ft.lookup(&frag, t0+2, 0, ttl)
	if got := expires(ft, &frag); got != t0+2+64 {
		t.Errorf("tiny timeout: expires t0+%d, want t0+66", got-t0)
	}
}
