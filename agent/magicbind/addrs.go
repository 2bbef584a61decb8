package magicbind

import (
	"encoding/binary"
	"math/bits"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sync/atomic"
)

// The address index ties the source address of a received datagram to its
// peer. The receive path looks every WireGuard packet up in it, so reads
// take no lock and allocate nothing; and with 10,000 peers it must not be
// copied when one changes:
//
//   - A network map changes the addresses of a few peers at a time, and
//     a map that changes none changes nothing here.
//   - Authenticated disco pings and pongs tie addresses to peers at any
//     time (a hard NAT maps every flow to a new port, so an active peer
//     can bring a new one every few seconds).
//
// So the read side is a lock-free open-addressing hash table (addrTable):
// a power-of-two array of atomic pointers to immutable entries, probed
// linearly. A writer (holding Bind.mu) changes an address by storing a new
// entry into its slot, and removes one by storing a tombstone (an entry
// with no peer) that keeps the address, so no probe chain is ever cut and
// a reader always sees either the old or the new entry for an address.
// Slots only go from empty to used; when used slots (live entries and
// tombstones) would pass half the table, the live entries move to a fresh
// table, at least four times their number, published atomically: readers
// still holding the old table see a consistent, slightly older snapshot.
// Each change is O(1) amortized, a lookup is one hash and a probe or two.
//
// Alternatives rejected: one copy-on-write Go map (what the bind did)
// costs O(addresses) per change. A copy-on-write map of learnt addresses
// beside one of map addresses costs O(learnt) per learnt address, which a
// tailnet of hard NATs makes O(peers), and every packet then looks in both
// (learnt first, since it must win). sync.Map (a lock-free hash trie since
// Go 1.24) reads without a lock or an allocation too, but a lookup walks
// several trie levels and boxes key and value in interfaces: 1.5 to 2
// times the cost of a Go map lookup, where this table costs no more than
// the Go map did (BenchmarkAddrLookup, BenchmarkDemux10000;
// bench/magicbind.md).
//
// Addresses come from the map's endpoints and from disco proofs; the
// candidates a peer lists in a call-me-maybe are tied to it once a ping or
// pong from them proves them, like any other address.
//
// What an address resolves to is decided on the write side (addrOwners):
// the peer that last proved it with an authenticated disco ping or pong
// wins over peers whose map endpoints merely list it (two peers on two
// LANs may publish the same private address; a peer's NAT mapping may
// move to another peer while the map still lists it for the first), so a
// packet from an address that peer A proved is never handed to WireGuard
// as peer B's.

// addrEntry is one address in an addrTable. Entries are immutable once
// published.
type addrEntry struct {
	addr netip.AddrPort
	p    *peer // nil: a tombstone (the address was removed)
	// learnt: p proved the address with a disco ping or pong (rather than
	// only listing it in the map).
	learnt bool
}

// addrTable is the read side of the index. Its slots change only through
// addrIndex (under Bind.mu); any goroutine may call find.
type addrTable struct {
	slots []atomic.Pointer[addrEntry]
	mask  uint64
	// k are the hash's random keys, new for each table: the addresses of
	// received datagrams are anyone's to choose, so which of them share a
	// probe chain must not be predictable.
	k [3]uint64
}

func newAddrTable(size int) *addrTable {
	t := &addrTable{slots: make([]atomic.Pointer[addrEntry], size), mask: uint64(size - 1)}
	for i := range t.k {
		t.k[i] = rand.Uint64() | 1
	}
	return t
}

// hash mixes the address's 16 bytes and port with the table's keys by
// folded 64x64->128-bit multiplications (as wyhash does). The receive path
// hashes every packet's source: hashed generically (maphash.Comparable),
// the one-peer demux took 32.5 ns of CPU per packet against the Go map's
// 31.3 (a small Go map compares keys without hashing them); with this,
// 30.4 (bench/magicbind.md).
func (t *addrTable) hash(a netip.AddrPort) uint64 {
	ip := a.Addr().As16()
	hi, lo := binary.LittleEndian.Uint64(ip[:8]), binary.LittleEndian.Uint64(ip[8:])
	x, y := bits.Mul64(hi^t.k[0], lo^t.k[1])
	x, y = bits.Mul64(x^y, uint64(a.Port())^t.k[2])
	return x ^ y
}

// find returns the entry for a, or nil. The entry may be a tombstone.
func (t *addrTable) find(a netip.AddrPort) *addrEntry {
	for i := t.hash(a) & t.mask; ; i = (i + 1) & t.mask {
		e := t.slots[i].Load()
		if e == nil || e.addr == a {
			return e
		}
	}
}

// lookup returns the peer a belongs to, or nil.
func (t *addrTable) lookup(a netip.AddrPort) *peer {
	if e := t.find(a); e != nil {
		return e.p
	}
	return nil
}

// addrOwners is the write side's record of one address: who proved it and
// which peers' map endpoints list it.
type addrOwners struct {
	prover *peer
	claim  *peer   // the first peer whose map endpoints list it
	more   []*peer // the rest (rare: two LANs with the same private address)
}

// resolve is the peer the address belongs to: the one that proved it,
// else the first that lists it.
func (o *addrOwners) resolve() (p *peer, learnt bool) {
	if o.prover != nil {
		return o.prover, true
	}
	return o.claim, false
}

// maxLearntAddrs bounds the addresses one peer can tie to itself; the
// oldest goes first. A peer roaming through NAT mappings proves new ones
// every few seconds, and only the last few are still in use. The endpoint
// selector keeps as many learnt candidates.
const maxLearntAddrs = 32

// addrIndex is the address index: the published table and, under Bind.mu,
// what it is built from.
type addrIndex struct {
	table  atomic.Pointer[addrTable]
	owners map[netip.AddrPort]*addrOwners
	// used counts the current table's non-empty slots (entries and
	// tombstones), live its entries with a peer.
	used, live int
}

// minAddrTable is the smallest table: a bind with a handful of peers.
const minAddrTable = 16

func (x *addrIndex) init() {
	x.table.Store(newAddrTable(minAddrTable))
	x.owners = map[netip.AddrPort]*addrOwners{}
}

// claim records that p's map endpoints list a.
func (x *addrIndex) claim(a netip.AddrPort, p *peer) {
	o := x.owners[a]
	if o == nil {
		o = &addrOwners{claim: p}
		x.owners[a] = o
	} else if o.claim == nil {
		o.claim = p
	} else if o.claim != p && !slices.Contains(o.more, p) {
		o.more = append(o.more, p)
	}
	x.publish(a, o)
}

// unclaim records that p's map endpoints no longer list a.
func (x *addrIndex) unclaim(a netip.AddrPort, p *peer) {
	o := x.owners[a]
	if o == nil {
		return
	}
	if o.claim == p {
		o.claim = nil
		if len(o.more) > 0 {
			o.claim = o.more[0]
			o.more = slices.Delete(o.more, 0, 1)
		}
	} else if i := slices.Index(o.more, p); i >= 0 {
		o.more = slices.Delete(o.more, i, i+1)
	} else {
		return
	}
	x.publish(a, o)
}

// learn records that p proved a (an authenticated disco ping or pong came
// from it). It takes a away from any peer that proved it before.
func (x *addrIndex) learn(a netip.AddrPort, p *peer) {
	o := x.owners[a]
	if o == nil {
		o = &addrOwners{}
		x.owners[a] = o
	}
	if o.prover == p {
		return
	}
	if q := o.prover; q != nil {
		q.learnt = slices.DeleteFunc(q.learnt, func(b netip.AddrPort) bool { return b == a })
	}
	o.prover = p
	p.learnt = append(p.learnt, a)
	x.publish(a, o)
	if len(p.learnt) > maxLearntAddrs {
		x.unlearn(p.learnt[0], p)
	}
}

// unlearn drops a from the addresses p proved.
func (x *addrIndex) unlearn(a netip.AddrPort, p *peer) {
	p.learnt = slices.DeleteFunc(p.learnt, func(b netip.AddrPort) bool { return b == a })
	if o := x.owners[a]; o != nil && o.prover == p {
		o.prover = nil
		x.publish(a, o)
	}
}

// forget drops everything p claimed or proved: p left the map.
func (x *addrIndex) forget(p *peer, cands []netip.AddrPort) {
	for _, a := range cands {
		x.unclaim(a, p)
	}
	for len(p.learnt) > 0 {
		x.unlearn(p.learnt[len(p.learnt)-1], p)
	}
}

// publish brings a's table entry in line with o, and drops o once nobody
// claims or proved a.
func (x *addrIndex) publish(a netip.AddrPort, o *addrOwners) {
	p, learnt := o.resolve()
	if p == nil {
		delete(x.owners, a)
	}
	t := x.table.Load()
	i := t.hash(a) & t.mask
	for ; ; i = (i + 1) & t.mask {
		e := t.slots[i].Load()
		if e == nil {
			break
		}
		if e.addr != a {
			continue
		}
		if e.p == p && e.learnt == learnt {
			return
		}
		if e.p == nil {
			x.live++
		}
		if p == nil {
			x.live--
			t.slots[i].Store(&addrEntry{addr: a})
			return
		}
		t.slots[i].Store(&addrEntry{addr: a, p: p, learnt: learnt})
		return
	}
	if p == nil {
		return // not in the table: nothing to remove
	}
	if 2*(x.used+1) > len(t.slots) {
		t = x.rehash(x.live + 1)
		i = t.hash(a) & t.mask
		for t.slots[i].Load() != nil {
			i = (i + 1) & t.mask
		}
	}
	t.slots[i].Store(&addrEntry{addr: a, p: p, learnt: learnt})
	x.used++
	x.live++
}

// rehash moves the live entries to a new table with room for at least
// 4*n entries (n is how many it must hold, so a table is at most a
// quarter full after a rehash and doubling amortizes it), leaving the
// tombstones behind, and publishes it.
func (x *addrIndex) rehash(n int) *addrTable {
	size := minAddrTable
	for size < 4*n {
		size *= 2
	}
	old := x.table.Load()
	t := newAddrTable(size)
	x.used = 0
	for i := range old.slots {
		e := old.slots[i].Load()
		if e == nil || e.p == nil {
			continue
		}
		j := t.hash(e.addr) & t.mask
		for t.slots[j].Load() != nil {
			j = (j + 1) & t.mask
		}
		t.slots[j].Store(e)
		x.used++
	}
	x.table.Store(t)
	return t
}
