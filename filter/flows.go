package filter

import (
	"crypto/rand"
	"encoding/binary"
	"math/bits"
	"sync"
	"sync/atomic"
	"time"

	"meshd.dev/meshd/packet"
)

// flowKey identifies a flow from this node's point of view. For fragments
// (kind kindFrag) the ports hold the IP identification and local/remote are
// the fragment's destination/source.
type flowKey struct {
	local, remote packet.Addr
	lport, rport  uint16
	proto         uint8
	kind          uint8
}

const (
	kindFlow = iota
	kindFrag
)

// Flow state bits.
const (
	// stLocal marks a flow this node opened (or one picked up mid-flow
	// that no rule explains): packets from the remote end are accepted
	// because of it. A flow without stLocal answers a flow the remote
	// opened; it is tracked only so that a later outbound packet is not
	// mistaken for a new locally opened flow, and inbound packets of it
	// are judged by the rules in force (so a revoked rule cuts it).
	stLocal = 1 << iota
	// stClosing: a FIN or RST was seen; the entry expires soon.
	stClosing
)

// lruGranularity is how stale an entry's LRU position may get, in
// nanoseconds.
const lruGranularity = int64(time.Second)

// keyWords is a flowKey packed into the five words the table stores,
// compares and hashes.
type keyWords [5]uint64

func (k *flowKey) words() keyWords {
	return makeWords(k.local, k.remote, k.lport, k.rport, k.proto, k.kind)
}

// makeWords packs a key from its parts, for hot paths that would
// otherwise assemble a flowKey only to read it back (a store-forwarding
// stall: narrow stores, wide loads).
func makeWords(local, remote packet.Addr, lport, rport uint16, proto, kind uint8) keyWords {
	return keyWords{local.Hi, local.Lo, remote.Hi, remote.Lo,
		uint64(lport) | uint64(rport)<<16 | uint64(proto)<<32 | uint64(kind)<<40}
}

// flowEntry is one slot of a shard. Slots are linked into the shard's LRU
// list (most recent at head) or, when unused, the free list.
//
// A hit on a known flow, the most common stateful packet, reads the shard
// without its lock (see flowShard.peek), so everything peek reads is an
// atomic; it is written only under the shard lock.
type flowEntry struct {
	kw      [5]atomic.Uint64 // keyWords
	hash    atomic.Uint64
	expires atomic.Int64  // monotonic nanoseconds since the Filter's base
	state   atomic.Uint32 // st* bits

	// Under the shard lock only.
	touched int64 // when the entry last moved to the LRU head
	prev    int32
	next    int32
	peer    int32 // slot in the shard's peer table
}

func (en *flowEntry) matches(kw *keyWords, h uint64) bool {
	return en.hash.Load() == h && en.kw[0].Load() == kw[0] && en.kw[1].Load() == kw[1] &&
		en.kw[2].Load() == kw[2] && en.kw[3].Load() == kw[3] && en.kw[4].Load() == kw[4]
}

func (en *flowEntry) words() keyWords {
	var w keyWords
	for i := range w {
		w[i] = en.kw[i].Load()
	}
	return w
}

// peerEntry counts the entries a remote address holds in one shard.
type peerEntry struct {
	addr  packet.Addr
	hash  uint64
	count int32
	next  int32 // free list
}

// flowShard is a fixed-size hash table with open addressing (linear
// probing, backward-shift deletion: no tombstones, so a long-running table
// never degrades) and an intrusive LRU list. Nothing is allocated after
// construction.
//
// Writers hold mu. Lookups of existing flows first try without it, as a
// seqlock reader: a writer that changes which key a slot or index position
// holds makes seq odd for the duration, and a reader that saw seq change
// (or odd) retries under the lock. Refreshing an entry's expiry or state
// changes no key, so it does not bump seq: those fields are single atomics
// and any value a reader sees was true at some instant.
type flowShard struct {
	mu  sync.Mutex
	seq atomic.Uint64
	// The tables are sized for the whole capacity up front but read as
	// zero = empty, and slots are handed out from a high-water mark before
	// the free lists: a fresh table touches no memory, so an idle node's
	// 64K-flow table costs address space, not resident memory.
	entries []flowEntry
	index   []atomic.Int32 // 0 empty, else entry slot + 1
	head    int32          // most recently used, -1 if empty
	tail    int32          // least recently used
	free    int32          // free entry list (via next), -1 if empty
	used    int32          // slots [used, len(entries)) were never used
	n       int

	peers     []peerEntry
	peerIndex []int32 // 0 empty, else peer slot + 1
	peerFree  int32
	peerUsed  int32

	_ [64]byte // keep neighbouring shards' locks off this cache line
}

// flowTable is a bounded, sharded flow table. Shards are chosen by a keyed
// hash of the whole flow key, so a peer cannot aim its flows at one shard.
// Fairness: a remote address may hold at most perPeer entries per shard
// (its flows spread evenly over the shards, so this is a global quota of
// roughly perPeer*len(shards)); a peer at its quota recycles its own least
// recently used entry, never another peer's. When a shard is full the
// least recently used entry of the shard is evicted.
type flowTable struct {
	seed    [4]uint64
	shards  []flowShard
	shift   uint // hash >> shift selects the shard
	perPeer int32
}

func newFlowTable(capacity, perPeer, nshards int) *flowTable {
	if nshards < 1 {
		nshards = 1
	}
	nshards = 1 << bits.Len(uint(nshards-1)) // round up to a power of two
	per := (capacity + nshards - 1) / nshards
	if per < 4 {
		per = 4
	}
	// A peer's flows spread over the shards binomially, not exactly
	// evenly: 25% slack keeps the effective quota close to perPeer.
	pp := (perPeer*5/4 + nshards - 1) / nshards
	if pp < 1 {
		pp = 1
	}
	t := &flowTable{
		shards:  make([]flowShard, nshards),
		shift:   uint(64 - bits.Len(uint(nshards-1))),
		perPeer: int32(pp),
	}
	if nshards == 1 {
		t.shift = 64
	}
	var seed [32]byte
	_, _ = rand.Read(seed[:]) // crypto/rand.Read never fails (Go 1.24+)
	for i := range t.seed {
		t.seed[i] = binary.LittleEndian.Uint64(seed[i*8:])
	}
	slots := 1 << bits.Len(uint(2*per-1))
	for i := range t.shards {
		s := &t.shards[i]
		s.entries = make([]flowEntry, per)
		s.index = make([]atomic.Int32, slots)
		s.peers = make([]peerEntry, per)
		s.peerIndex = make([]int32, slots)
		s.head, s.tail, s.free, s.peerFree = -1, -1, -1, -1
	}
	return t
}

func mum(a, b uint64) uint64 {
	hi, lo := bits.Mul64(a, b)
	return hi ^ lo
}

// hash is a keyed wyhash-style mix: with a secret seed, remote peers cannot
// craft keys that collide into one probe chain.
// The two addresses are mixed independently, so the CPU runs both
// multiplies at once: two multiplies deep instead of three.
func (t *flowTable) hash(w *keyWords) uint64 {
	a := mum(w[0]^t.seed[0], w[1]^t.seed[1])
	b := mum(w[2]^t.seed[2], w[3]^t.seed[3])
	return mum(a^w[4]^0x9e3779b97f4a7c15, b^0xa0761d6478bd642f)
}

func (t *flowTable) peerHash(addr *packet.Addr) uint64 {
	return mum(addr.Hi^t.seed[2], addr.Lo^t.seed[3])
}

func (t *flowTable) shard(h uint64) *flowShard {
	if t.shift >= 64 {
		return &t.shards[0]
	}
	return &t.shards[h>>t.shift]
}

// Results of peek.
const (
	peekRetry = iota // a writer got in the way: ask again under the lock
	peekMiss
	peekHit
)

// peek looks kw up without the shard lock (a seqlock read). On peekHit it
// returns the entry's expiry and state as they were at one instant at
// which the key was in the table; peekMiss means it was not.
func (s *flowShard) peek(kw *keyWords, h uint64) (expires int64, state uint8, res int) {
	seq := s.seq.Load()
	if seq&1 != 0 {
		return 0, 0, peekRetry
	}
	mask := len(s.index) - 1
	i := int(h) & mask
	// A writer can move index entries under a reader; the bound keeps a
	// reader that keeps losing that race from probing forever (the seq
	// check below sends it to the lock anyway).
	for range len(s.index) {
		e := s.index[i].Load() - 1
		if e < 0 {
			res = peekMiss
			break
		}
		// matches, by hand: too big for the inliner, and this is the
		// hottest loop of the flow path.
		if en := &s.entries[e]; en.hash.Load() == h && en.kw[0].Load() == kw[0] && en.kw[1].Load() == kw[1] &&
			en.kw[2].Load() == kw[2] && en.kw[3].Load() == kw[3] && en.kw[4].Load() == kw[4] {
			expires, state, res = en.expires.Load(), uint8(en.state.Load()), peekHit
			break
		}
		i = (i + 1) & mask
	}
	if res == peekRetry || s.seq.Load() != seq {
		return 0, 0, peekRetry
	}
	return expires, state, res
}

// find returns the index position and entry slot of kw, or slot -1. The
// caller holds the lock.
func (s *flowShard) find(kw *keyWords, h uint64) (pos int, slot int32) {
	mask := len(s.index) - 1
	for i := int(h) & mask; ; i = (i + 1) & mask {
		e := s.index[i].Load() - 1
		if e < 0 {
			return i, -1
		}
		if s.entries[e].matches(kw, h) {
			return i, e
		}
	}
}

// unlinkFlow removes index position pos, shifting back later members of
// its probe run so that lookups never need tombstones. The caller holds
// the lock and has made seq odd.
func (s *flowShard) unlinkFlow(pos int) {
	mask := len(s.index) - 1
	i := pos
	for j := (i + 1) & mask; s.index[j].Load() > 0; j = (j + 1) & mask {
		v := s.index[j].Load()
		k := int(s.entries[v-1].hash.Load()) & mask
		// Move index[j] into the hole at i if its home is not in (i, j].
		if (j > i && (k <= i || k > j)) || (j < i && k <= i && k > j) {
			s.index[i].Store(v)
			i = j
		}
	}
	s.index[i].Store(0)
}

// unlinkIndex is unlinkFlow for the peer index.
func unlinkIndex(index []int32, pos int, home func(int32) int) {
	mask := len(index) - 1
	i := pos
	for j := (i + 1) & mask; index[j] > 0; j = (j + 1) & mask {
		k := home(index[j] - 1)
		if (j > i && (k <= i || k > j)) || (j < i && k <= i && k > j) {
			index[i] = index[j]
			i = j
		}
	}
	index[i] = 0
}

func (s *flowShard) lruRemove(e int32) {
	en := &s.entries[e]
	if en.prev >= 0 {
		s.entries[en.prev].next = en.next
	} else {
		s.head = en.next
	}
	if en.next >= 0 {
		s.entries[en.next].prev = en.prev
	} else {
		s.tail = en.prev
	}
}

func (s *flowShard) lruPushFront(e int32) {
	en := &s.entries[e]
	en.prev = -1
	en.next = s.head
	if s.head >= 0 {
		s.entries[s.head].prev = e
	}
	s.head = e
	if s.tail < 0 {
		s.tail = e
	}
}

func (s *flowShard) touch(e int32) {
	if s.head == e {
		return
	}
	s.lruRemove(e)
	s.lruPushFront(e)
}

// remove deletes entry slot e (at index position pos, or -1 to look it
// up). The caller holds the lock and has made seq odd.
func (s *flowShard) remove(e int32, pos int) {
	en := &s.entries[e]
	if pos < 0 {
		mask := len(s.index) - 1
		pos = int(en.hash.Load()) & mask
		for s.index[pos].Load() != e+1 {
			pos = (pos + 1) & mask
		}
	}
	s.unlinkFlow(pos)
	s.lruRemove(e)
	s.peerRelease(en.peer)
	en.next = s.free
	s.free = e
	s.n--
}

func (s *flowShard) peerFind(addr *packet.Addr, h uint64) (pos int, slot int32) {
	mask := len(s.peerIndex) - 1
	for i := int(h) & mask; ; i = (i + 1) & mask {
		p := s.peerIndex[i] - 1
		if p < 0 {
			return i, -1
		}
		if s.peers[p].hash == h && s.peers[p].addr == *addr {
			return i, p
		}
	}
}

func (s *flowShard) peerRelease(p int32) {
	pe := &s.peers[p]
	pe.count--
	if pe.count > 0 {
		return
	}
	pos, _ := s.peerFind(&pe.addr, pe.hash)
	mask := len(s.peerIndex) - 1
	unlinkIndex(s.peerIndex, pos, func(x int32) int { return int(s.peers[x].hash) & mask })
	pe.next = s.peerFree
	s.peerFree = p
}

// refreshSlack is how far an entry's expiry may lag behind "now + idle
// timeout" before a hit rewrites it: up to a second (1/64 of short
// timeouts), so a flow's idle timeout is honoured to within that. It lets
// nearly every hit on a busy flow be a pure read, which needs no lock and
// dirties no cache line shared with another core.
func refreshSlack(ttl int64) int64 { return min(ttl>>6, lruGranularity) }

// lookup finds k; an expired entry is removed and reported missing. A hit
// refreshes the entry's expiry (ttl picks it from the state) and LRU
// position and folds TCP FIN/RST into the state. It returns the state.
func (t *flowTable) lookup(k *flowKey, now int64, tcpFlags uint8, ttl *timeouts) (state uint8, ok bool) {
	kw := k.words()
	return t.lookupWords(&kw, t.hash(&kw), now, tcpFlags, ttl)
}

// lookupWords is lookup for a packed key and its hash, so that a caller
// that may insert next hashes once.
func (t *flowTable) lookupWords(kw *keyWords, h uint64, now int64, tcpFlags uint8, ttl *timeouts) (state uint8, ok bool) {
	s := t.shard(h)
	exp, st, res := s.peek(kw, h)
	switch res {
	case peekMiss:
		return 0, false
	case peekHit:
		// Nothing to write (no FIN/RST to record, expiry fresh enough, and
		// so the LRU position too): done without the lock.
		if exp > now && tcpFlags&(tcpFIN|tcpRST) == 0 {
			if d := ttl.of(kw, st); now+d-exp <= refreshSlack(d) {
				return st, true
			}
		}
	}
	s.mu.Lock()
	pos, e := s.find(kw, h)
	if e < 0 {
		s.mu.Unlock()
		return 0, false
	}
	en := &s.entries[e]
	if en.expires.Load() <= now {
		s.seq.Add(1)
		s.remove(e, pos)
		s.seq.Add(1)
		s.mu.Unlock()
		return 0, false
	}
	state = uint8(en.state.Load())
	if tcpFlags&(tcpFIN|tcpRST) != 0 {
		state |= stClosing
		en.state.Store(uint32(state))
	}
	en.expires.Store(now + ttl.of(kw, state))
	if now-en.touched > lruGranularity {
		// Relinking on every packet costs more than it is worth: LRU order
		// to the second is plenty for choosing what to evict.
		en.touched = now
		s.touch(e)
	}
	s.mu.Unlock()
	return state, true
}

// insert adds k with state, or refreshes it if it exists (a new SYN on a
// closing flow reopens it). It evicts to make room: the peer's own least
// recently used entry when the peer is at its quota, else the shard's.
func (t *flowTable) insert(k *flowKey, state uint8, now int64, tcpFlags uint8, ttl *timeouts) {
	kw := k.words()
	t.insertWords(&kw, t.hash(&kw), state, now, tcpFlags, ttl)
}

// insertWords is insert for a packed key and its hash.
func (t *flowTable) insertWords(kw *keyWords, h uint64, state uint8, now int64, tcpFlags uint8, ttl *timeouts) {
	s := t.shard(h)
	s.mu.Lock()
	defer s.mu.Unlock()
	pos, e := s.find(kw, h)
	if e >= 0 && s.entries[e].expires.Load() > now {
		en := &s.entries[e]
		st := uint8(en.state.Load())
		switch {
		case tcpFlags&(tcpFIN|tcpRST) != 0:
			st |= stClosing
		case tcpFlags&tcpSYN != 0:
			st = state
		}
		en.state.Store(uint32(st))
		en.expires.Store(now + ttl.of(kw, st))
		en.touched = now
		s.touch(e)
		return
	}
	s.seq.Add(1)
	defer s.seq.Add(1)
	if e >= 0 { // expired: replace
		s.remove(e, pos)
	}

	remote := packet.Addr{Hi: kw[2], Lo: kw[3]}
	ph := t.peerHash(&remote)
	_, p := s.peerFind(&remote, ph)
	if p >= 0 && s.peers[p].count >= t.perPeer {
		// The peer is at its quota: recycle its own least recently used
		// entry rather than anybody else's.
		for v := s.tail; v >= 0; v = s.entries[v].prev {
			if s.entries[v].peer == p {
				s.remove(v, -1)
				break
			}
		}
	}
	if s.free < 0 && int(s.used) == len(s.entries) {
		s.remove(s.tail, -1)
	}
	// Removals may have released the peer's slot or moved index entries.
	ppos, p := s.peerFind(&remote, ph)
	if p < 0 {
		// There are as many peer slots as entries and every live peer
		// holds an entry, so one is free.
		if s.peerFree >= 0 {
			p = s.peerFree
			s.peerFree = s.peers[p].next
		} else {
			p = s.peerUsed
			s.peerUsed++
		}
		s.peers[p] = peerEntry{addr: remote, hash: ph}
		s.peerIndex[ppos] = p + 1
	}
	s.peers[p].count++

	if tcpFlags&(tcpFIN|tcpRST) != 0 {
		state |= stClosing // first seen while closing: keep it briefly
	}
	if s.free >= 0 {
		e = s.free
		s.free = s.entries[e].next
	} else {
		e = s.used
		s.used++
	}
	pos, _ = s.find(kw, h)
	en := &s.entries[e]
	for i, w := range kw {
		en.kw[i].Store(w)
	}
	en.hash.Store(h)
	en.state.Store(uint32(state))
	en.expires.Store(now + ttl.of(kw, state))
	en.touched, en.peer = now, p
	s.index[pos].Store(e + 1)
	s.lruPushFront(e)
	s.n++
}

// len counts live and not yet collected entries.
func (t *flowTable) len() int {
	n := 0
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.Lock()
		n += s.n
		s.mu.Unlock()
	}
	return n
}

// timeouts are the idle timeouts by flow kind, in nanoseconds.
type timeouts struct {
	tcp, tcpClosing, udp, icmp, other, frag int64
}

func (t *timeouts) of(kw *keyWords, state uint8) int64 {
	if uint8(kw[4]>>40) == kindFrag {
		return t.frag
	}
	switch uint8(kw[4] >> 32) {
	case protoTCP:
		if state&stClosing != 0 {
			return t.tcpClosing
		}
		return t.tcp
	case protoUDP:
		return t.udp
	case protoICMPv4, protoICMPv6:
		return t.icmp
	}
	return t.other
}
