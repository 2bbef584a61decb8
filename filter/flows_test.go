package filter

import (
	"math/rand/v2"
	"testing"
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
	for _, v := range s.index {
		if v > 0 {
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
		if _, got := s.find(&en.key, en.hash); got != e {
			t.Fatalf("find(slot %d's key) = %d", e, got)
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
					local:  ipAddr{lo: 1},
					remote: ipAddr{lo: uint64(rng.IntN(5))},
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
