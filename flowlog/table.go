// Package flowlog aggregates the packets the data path sees into flows and
// writes one JSON line per flow per interval (a minute by default): the
// flow's addresses, the nodes behind them, bytes and packets each way, and
// whether the packet filter accepted or dropped it and why.
//
// The data path only adds to a Table: a fixed-size, sharded hash table
// allocated up front, so recording a packet allocates nothing and costs
// one short critical section per run of packets of one flow (a Batch
// merges consecutive packets of a flow, which is what GRO batches are). A
// Logger drains the table in the background and hands the records to a
// writer goroutine through a bounded queue: a slow or stuck sink fills the
// queue and the records that do not fit are counted and dropped, never
// waited for. A full table counts the packets it could not place.
package flowlog

import (
	"crypto/rand"
	"encoding/binary"
	"math/bits"
	"sync"
	"sync/atomic"
	"time"

	"meshd.dev/meshd/filter"
	"meshd.dev/meshd/packet"
)

// DefaultMaxFlows is the flow table's default capacity.
const DefaultMaxFlows = 16384

// keyWords is a flow key packed into words: local address, remote
// address, then ports, protocol and verdict. A flow whose packets were
// accepted and dropped within one interval is two entries, one per
// verdict, so each record carries one verdict.
type keyWords [5]uint64

func packKey(local, remote packet.Addr, lport, rport uint16, proto uint8, v filter.Verdict) keyWords {
	return keyWords{local.Hi, local.Lo, remote.Hi, remote.Lo,
		uint64(lport) | uint64(rport)<<16 | uint64(proto)<<32 | uint64(v)<<40}
}

// equal compares word by word: == on the array calls memequal, a
// measurable share of counting a packet.
func (k *keyWords) equal(o *keyWords) bool {
	return k[4] == o[4] && k[3] == o[3] && k[1] == o[1] && k[2] == o[2] && k[0] == o[0]
}

func (k *keyWords) local() packet.Addr      { return packet.Addr{Hi: k[0], Lo: k[1]} }
func (k *keyWords) remote() packet.Addr     { return packet.Addr{Hi: k[2], Lo: k[3]} }
func (k *keyWords) lport() uint16           { return uint16(k[4]) }
func (k *keyWords) rport() uint16           { return uint16(k[4] >> 16) }
func (k *keyWords) proto() uint8            { return uint8(k[4] >> 32) }
func (k *keyWords) verdict() filter.Verdict { return filter.Verdict(k[4] >> 40) }

// counts are one direction's packets and bytes.
type counts struct{ packets, bytes uint64 }

// entry is one flow in a shard. Entries outlive an interval while the
// flow is active, so who opened it and when it started carry over; one
// idle for a whole interval is removed at the next drain.
type entry struct {
	kw    keyWords
	hash  uint64
	out   counts // local -> remote, since the last drain
	in    counts // remote -> local
	first int64  // unix nanoseconds of the first packet since the last drain
	last  int64
	// remoteOpened: the peer opened the flow (its bare SYN, or for other
	// protocols its packet came first).
	remoteOpened bool
}

// shard is a fixed-size open-addressing table guarded by one mutex. The
// data path holds the lock for one lookup and a few additions; the drain
// holds it to copy the shard out.
type shard struct {
	mu      sync.Mutex
	entries []entry // len: entries in use; cap: the shard's capacity
	index   []int32 // 0 empty, else entry slot + 1; a power of two >= 2*cap
	_       [64]byte
}

// Table aggregates packets into flows. Its methods are safe for
// concurrent use; nothing is allocated after NewTable.
type Table struct {
	seed     [4]uint64
	shards   []shard
	shift    uint
	overflow atomic.Uint64 // packets that found the table full
}

// NewTable returns a table of about maxFlows flows (DefaultMaxFlows if
// maxFlows <= 0), split over 16 shards.
func NewTable(maxFlows int) *Table {
	if maxFlows <= 0 {
		maxFlows = DefaultMaxFlows
	}
	const nshards = 16
	per := max((maxFlows+nshards-1)/nshards, 4)
	t := &Table{shards: make([]shard, nshards), shift: 64 - 4}
	var seed [32]byte
	_, _ = rand.Read(seed[:]) // crypto/rand.Read never fails (Go 1.24+)
	for i := range t.seed {
		t.seed[i] = binary.LittleEndian.Uint64(seed[i*8:])
	}
	slots := 1 << bits.Len(uint(2*per-1))
	for i := range t.shards {
		t.shards[i].entries = make([]entry, 0, per)
		t.shards[i].index = make([]int32, slots)
	}
	return t
}

func mum(a, b uint64) uint64 {
	hi, lo := bits.Mul64(a, b)
	return hi ^ lo
}

// hash is keyed so that peers cannot aim flows at one shard or probe run.
func (t *Table) hash(k *keyWords) uint64 {
	a := mum(k[0]^t.seed[0], k[1]^t.seed[1])
	b := mum(k[2]^t.seed[2], k[3]^t.seed[3])
	return mum(a^k[4]^0x9e3779b97f4a7c15, b^0xa0761d6478bd642f)
}

// Overflow returns how many packets were not counted because the table
// was full.
func (t *Table) Overflow() uint64 { return t.overflow.Load() }

// add counts pkts packets of n bytes in total for the flow kw.
func (t *Table) add(kw *keyWords, dir filter.Direction, pkts, n uint64, first, last int64, opener int8) {
	h := t.hash(kw)
	s := &t.shards[h>>t.shift]
	s.mu.Lock()
	mask := len(s.index) - 1
	i := int(h) & mask
	var en *entry
	for {
		e := s.index[i] - 1
		if e < 0 {
			if len(s.entries) == cap(s.entries) {
				s.mu.Unlock()
				t.overflow.Add(pkts)
				return
			}
			s.entries = s.entries[:len(s.entries)+1]
			en = &s.entries[len(s.entries)-1]
			*en = entry{kw: *kw, hash: h, remoteOpened: dir == filter.In}
			s.index[i] = int32(len(s.entries))
			break
		}
		if c := &s.entries[e]; c.hash == h && c.kw.equal(kw) {
			en = c
			break
		}
		i = (i + 1) & mask
	}
	if en.first == 0 {
		en.first = first
	}
	en.last = last
	if opener != 0 {
		en.remoteOpened = opener < 0
	}
	c := &en.out
	if dir == filter.In {
		c = &en.in
	}
	c.packets += pkts
	c.bytes += n
	s.mu.Unlock()
}

// Batch merges consecutive packets of one flow before they reach the
// table, so that a batch of one bulk flow takes the table's lock once. It
// belongs to one goroutine; End flushes it.
type Batch struct {
	t      *Table
	now    int64
	kw     keyWords
	dir    filter.Direction
	pkts   uint64
	bytes  uint64
	opener int8 // +1 a bare SYN from this node, -1 from the peer
}

// Begin starts a batch of packets seen at now. A nil Table gives a Batch
// whose methods do nothing.
func (t *Table) Begin(now time.Time) Batch {
	if t == nil {
		return Batch{}
	}
	return Batch{t: t, now: now.UnixNano()}
}

// Add counts the packet p of n bytes crossing in direction dir with the
// filter's verdict v. A packet the decoder could not read counts with the
// addresses it has (none, for a runt).
func (b *Batch) Add(p *packet.Parsed, n int, dir filter.Direction, v filter.Verdict) {
	if b.t == nil {
		return
	}
	local, remote := p.Src, p.Dst
	var lport, rport uint16
	if p.HasPorts {
		lport, rport = p.SrcPort, p.DstPort
	}
	if dir == filter.In {
		local, remote, lport, rport = remote, local, rport, lport
	}
	kw := packKey(local, remote, lport, rport, p.Proto, v)
	var opener int8
	if p.Proto == packet.ProtoTCP && p.HasPorts && p.TCPFlags&(packet.TCPSyn|packet.TCPAck) == packet.TCPSyn {
		opener = 1
		if dir == filter.In {
			opener = -1
		}
	}
	if b.pkts != 0 && (!kw.equal(&b.kw) || dir != b.dir || opener != 0) {
		b.flush()
	}
	if b.pkts == 0 {
		b.kw, b.dir = kw, dir
	}
	b.pkts++
	b.bytes += uint64(n)
	if opener != 0 {
		b.opener = opener
		b.flush()
	}
}

// End flushes what the batch holds into the table.
func (b *Batch) End() {
	if b.t != nil && b.pkts != 0 {
		b.flush()
	}
}

func (b *Batch) flush() {
	b.t.add(&b.kw, b.dir, b.pkts, b.bytes, b.now, b.now, b.opener)
	b.pkts, b.bytes, b.opener = 0, 0, 0
}

// Flow is one flow's counts over an interval, from this node's side.
type Flow struct {
	Local, Remote packet.Addr
	LPort, RPort  uint16
	Proto         uint8
	Verdict       filter.Verdict
	// RemoteOpened: the peer opened the flow.
	RemoteOpened bool
	// Out is what this node sent, In what it received.
	OutPackets, OutBytes, InPackets, InBytes uint64
	First, Last                              time.Time
}

// Drain appends to dst every flow with packets since the last drain and
// resets their counts; flows without any are removed from the table. It
// holds one shard's lock at a time, for a copy of that shard.
func (t *Table) Drain(dst []Flow) []Flow {
	for i := range t.shards {
		dst = t.shards[i].drain(dst)
	}
	return dst
}

func (s *shard) drain(dst []Flow) []Flow {
	s.mu.Lock()
	defer s.mu.Unlock()
	kept := 0
	for i := range s.entries {
		en := &s.entries[i]
		if en.first == 0 {
			continue // idle for a whole interval: removed
		}
		dst = append(dst, Flow{
			Local: en.kw.local(), Remote: en.kw.remote(), LPort: en.kw.lport(), RPort: en.kw.rport(),
			Proto: en.kw.proto(), Verdict: en.kw.verdict(), RemoteOpened: en.remoteOpened,
			OutPackets: en.out.packets, OutBytes: en.out.bytes, InPackets: en.in.packets, InBytes: en.in.bytes,
			First: time.Unix(0, en.first), Last: time.Unix(0, en.last),
		})
		s.entries[kept] = entry{kw: en.kw, hash: en.hash, remoteOpened: en.remoteOpened}
		kept++
	}
	if kept == len(s.entries) {
		return dst
	}
	// Rebuild the index over the kept entries: simpler than deleting from
	// open addressing one by one, and the drain runs once an interval.
	s.entries = s.entries[:kept]
	clear(s.index)
	mask := len(s.index) - 1
	for e := range s.entries {
		i := int(s.entries[e].hash) & mask
		for s.index[i] != 0 {
			i = (i + 1) & mask
		}
		s.index[i] = int32(e + 1)
	}
	return dst
}
