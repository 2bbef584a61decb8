package magicbind

import (
	"math/rand/v2"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn"

	"meshd.dev/meshd/nat/endpoint"
	"meshd.dev/meshd/netmap"
)

// tableMap is a map of the peers named in eps, each listing the given
// endpoints; keys are derived from the names so maps built at different
// times agree.
func tableMap(eps map[string][]netip.AddrPort) *netmap.NetworkMap {
	nm := &netmap.NetworkMap{Peers: map[netmap.NodeID]*netmap.Node{}}
	for name, e := range eps {
		k := testKey(name)
		id := netmap.NodeID(k[0])<<8 | netmap.NodeID(k[1])
		nm.Peers[id] = &netmap.Node{ID: id, Hostname: name, NodeKey: k, DiscoKey: netmap.DiscoPublic(k), Endpoints: e}
	}
	return nm
}

func testKey(name string) netmap.NodePublic {
	var k netmap.NodePublic
	copy(k[:], name)
	k[31] = 1
	return k
}

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

// TestAddressTable: what a source address resolves to as maps come and
// go and disco proves addresses. Each step applies a map (if any) and
// learns addresses, then checks every address named in want.
func TestAddressTable(t *testing.T) {
	type learn struct {
		peer string
		addr netip.AddrPort
	}
	type step struct {
		eps   map[string][]netip.AddrPort // nil: no new map
		learn []learn
		want  map[netip.AddrPort]string // "": no peer
	}
	var (
		a1, a2 = ap("198.18.0.1:41641"), ap("198.18.0.1:41642")
		b1, b2 = ap("198.18.0.2:41641"), ap("198.18.0.2:41642")
		lan    = ap("192.168.1.10:41641") // two sites, one private address
		nat    = ap("198.18.9.9:50000")   // a NAT mapping no map lists
	)
	for _, tt := range []struct {
		name  string
		steps []step
	}{
		{"map endpoints resolve to their peer", []step{
			{eps: map[string][]netip.AddrPort{"a": {a1, a2}, "b": {b1}},
				want: map[netip.AddrPort]string{a1: "a", a2: "a", b1: "b", b2: "", nat: ""}},
			{eps: map[string][]netip.AddrPort{"a": {a2}, "b": {b1, b2}},
				want: map[netip.AddrPort]string{a1: "", a2: "a", b1: "b", b2: "b"}},
		}},
		{"peer removed from the map loses its learnt addresses", []step{
			{eps: map[string][]netip.AddrPort{"a": {a1}, "b": {b1}}, learn: []learn{{"a", nat}},
				want: map[netip.AddrPort]string{nat: "a", a1: "a"}},
			{eps: map[string][]netip.AddrPort{"b": {b1}},
				want: map[netip.AddrPort]string{nat: "", a1: "", b1: "b"}},
			// Back in a later map: what it proved before does not return.
			{eps: map[string][]netip.AddrPort{"a": {a1}, "b": {b1}},
				want: map[netip.AddrPort]string{nat: "", a1: "a"}},
		}},
		{"a map that keeps the peer keeps its learnt address", []step{
			{eps: map[string][]netip.AddrPort{"a": {a1}, "b": {b1}}, learn: []learn{{"a", nat}},
				want: map[netip.AddrPort]string{nat: "a"}},
			{eps: map[string][]netip.AddrPort{"a": {a2}}, // a's endpoints moved, b left
				want: map[netip.AddrPort]string{nat: "a", a1: "", a2: "a", b1: ""}},
			{eps: map[string][]netip.AddrPort{"a": {a2}},
				want: map[netip.AddrPort]string{nat: "a", a2: "a"}},
		}},
		{"an address learnt for a never resolves to b", []step{
			{eps: map[string][]netip.AddrPort{"a": {a1}, "b": {b1}}, learn: []learn{{"a", b1}},
				want: map[netip.AddrPort]string{b1: "a", a1: "a"}},
			// b's endpoints change and list the address again.
			{eps: map[string][]netip.AddrPort{"a": {a1}, "b": {b2, b1}},
				want: map[netip.AddrPort]string{b1: "a", b2: "b"}},
			// b proves other addresses; a proves b1 again.
			{learn: []learn{{"b", nat}, {"a", b1}},
				want: map[netip.AddrPort]string{b1: "a", nat: "b"}},
			// a leaves: b's listing is what is left.
			{eps: map[string][]netip.AddrPort{"b": {b2, b1}},
				want: map[netip.AddrPort]string{b1: "b", nat: "b", a1: ""}},
		}},
		{"the last peer to prove an address owns it", []step{
			{eps: map[string][]netip.AddrPort{"a": {a1}, "b": {b1}}, learn: []learn{{"a", nat}, {"b", nat}},
				want: map[netip.AddrPort]string{nat: "b"}},
			// b leaves: a no longer holds it either (b took it).
			{eps: map[string][]netip.AddrPort{"a": {a1}},
				want: map[netip.AddrPort]string{nat: ""}},
		}},
		{"two peers list one address; the other keeps it when one leaves", []step{
			{eps: map[string][]netip.AddrPort{"a": {lan}, "b": {lan}},
				want: map[netip.AddrPort]string{}},
			{eps: map[string][]netip.AddrPort{"b": {lan}},
				want: map[netip.AddrPort]string{lan: "b"}},
		}},
		{"learnt from a peer not in the map: ignored", []step{
			{eps: map[string][]netip.AddrPort{"a": {a1}}, learn: []learn{{"gone", nat}},
				want: map[netip.AddrPort]string{nat: "", a1: "a"}},
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			b := New(Options{NodeKey: netmap.NewNodePrivate(), DiscoKey: netmap.NewDiscoPrivate()})
			for i, st := range tt.steps {
				if st.eps != nil {
					b.SetNetworkMap(tableMap(st.eps))
				}
				for _, l := range st.learn {
					b.mu.Lock()
					p := b.peers[testKey(l.peer)]
					b.mu.Unlock()
					if p == nil {
						p = &peer{key: testKey(l.peer)} // removed meanwhile
					}
					b.learnAddr(l.addr, p)
				}
				for a, want := range st.want {
					got := ""
					if p := b.addrs.table.Load().lookup(a); p != nil {
						got = p.name
					}
					if got != want {
						t.Errorf("step %d: %v resolves to %q, want %q", i, a, got, want)
					}
				}
				checkIndex(t, b)
			}
		})
	}
}

// checkIndex checks the address index's bookkeeping: the counts match the
// table, no address is in it twice, and each peer's learnt addresses are
// the ones the owners record.
func checkIndex(t *testing.T, b *Bind) {
	t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	x := &b.addrs
	tb := x.table.Load()
	used, live := 0, 0
	seen := map[netip.AddrPort]bool{}
	for i := range tb.slots {
		e := tb.slots[i].Load()
		if e == nil {
			continue
		}
		used++
		if seen[e.addr] {
			t.Errorf("%v is in the table twice", e.addr)
		}
		seen[e.addr] = true
		if e.p == nil {
			if x.owners[e.addr] != nil {
				t.Errorf("%v removed from the table but still owned", e.addr)
			}
			continue
		}
		live++
		o := x.owners[e.addr]
		if o == nil {
			t.Errorf("%v in the table without owners", e.addr)
			continue
		}
		if p, learnt := o.resolve(); p != e.p || learnt != e.learnt {
			t.Errorf("%v: table says %p (learnt %v), owners %p (%v)", e.addr, e.p, e.learnt, p, learnt)
		}
	}
	if used != x.used || live != x.live {
		t.Errorf("counts used=%d live=%d, table has %d and %d", x.used, x.live, used, live)
	}
	if 2*used > len(tb.slots) {
		t.Errorf("table over half full: %d of %d", used, len(tb.slots))
	}
	for a, o := range x.owners {
		if !seen[a] {
			t.Errorf("%v owned but not in the table", a)
		}
		if o.prover != nil && !containsAddr(o.prover.learnt, a) {
			t.Errorf("%v proved by %s, which does not list it", a, o.prover.name)
		}
	}
	for _, p := range b.peers {
		for _, a := range p.learnt {
			if o := x.owners[a]; o == nil || o.prover != p {
				t.Errorf("%s lists %v as learnt, but does not own it", p.name, a)
			}
		}
	}
}

func containsAddr(s []netip.AddrPort, a netip.AddrPort) bool {
	for _, b := range s {
		if b == a {
			return true
		}
	}
	return false
}

// TestAddressIndexModel drives the index with random claims, learns and
// removals (enough to rehash many times and leave tombstones) and compares
// every address with a plain model after each step.
func TestAddressIndexModel(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	var x addrIndex
	x.init()
	peers := make([]*peer, 8)
	for i := range peers {
		peers[i] = &peer{name: string(rune('a' + i))}
	}
	addrs := make([]netip.AddrPort, 300)
	for i := range addrs {
		addrs[i] = netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)}), 41641)
	}
	// The model: per address, the claimants in order and the prover.
	claims := map[netip.AddrPort][]*peer{}
	prover := map[netip.AddrPort]*peer{}
	learnt := map[*peer][]netip.AddrPort{}
	unlearn := func(a netip.AddrPort, p *peer) {
		if prover[a] == p {
			delete(prover, a)
		}
		l := learnt[p][:0]
		for _, b := range learnt[p] {
			if b != a {
				l = append(l, b)
			}
		}
		learnt[p] = l
	}
	for step := range 20000 {
		a, p := addrs[rng.IntN(len(addrs))], peers[rng.IntN(len(peers))]
		switch rng.IntN(4) {
		case 0:
			x.claim(a, p)
			if !containsPeer(claims[a], p) {
				claims[a] = append(claims[a], p)
			}
		case 1:
			x.unclaim(a, p)
			c := claims[a][:0]
			for _, q := range claims[a] {
				if q != p {
					c = append(c, q)
				}
			}
			claims[a] = c
		case 2:
			x.learn(a, p)
			if q := prover[a]; q != p {
				if q != nil {
					unlearn(a, q)
				}
				prover[a] = p
				learnt[p] = append(learnt[p], a)
				if len(learnt[p]) > maxLearntAddrs {
					unlearn(learnt[p][0], p)
				}
			}
		case 3:
			if rng.IntN(20) == 0 { // a peer leaves
				var cands []netip.AddrPort
				for _, b := range addrs {
					if containsPeer(claims[b], p) {
						cands = append(cands, b)
					}
				}
				x.forget(p, cands)
				for _, b := range cands {
					c := claims[b][:0]
					for _, q := range claims[b] {
						if q != p {
							c = append(c, q)
						}
					}
					claims[b] = c
				}
				for len(learnt[p]) > 0 {
					unlearn(learnt[p][0], p)
				}
			}
		}
		tb := x.table.Load()
		for _, b := range addrs {
			want := prover[b]
			if want == nil && len(claims[b]) > 0 {
				want = claims[b][0]
			}
			if got := tb.lookup(b); got != want {
				t.Fatalf("step %d: %v resolves to %v, want %v", step, b, got, want)
			}
		}
	}
}

func containsPeer(s []*peer, p *peer) bool {
	for _, q := range s {
		if q == p {
			return true
		}
	}
	return false
}

// TestLearntAddressesBounded: a peer proving address after address keeps
// only the newest maxLearntAddrs.
func TestLearntAddressesBounded(t *testing.T) {
	b := New(Options{NodeKey: netmap.NewNodePrivate(), DiscoKey: netmap.NewDiscoPrivate()})
	b.SetNetworkMap(tableMap(map[string][]netip.AddrPort{"a": nil}))
	p := b.peers[testKey("a")]
	const n = maxLearntAddrs + 10
	for i := range n {
		b.learnAddr(learntEndpoint(i), p)
	}
	tb := b.addrs.table.Load()
	for i := range n {
		if got, want := tb.lookup(learntEndpoint(i)) == p, i >= n-maxLearntAddrs; got != want {
			t.Errorf("learnt address %d resolves: %v, want %v", i, got, want)
		}
	}
	checkIndex(t, b)
}

// TestSameMapCostsNothing: a map with the same peers and addresses (in
// fresh values, as the agent builds every map) publishes no new table and
// allocates nothing.
func TestSameMapCostsNothing(t *testing.T) {
	b := New(Options{NodeKey: netmap.NewNodePrivate(), DiscoKey: netmap.NewDiscoPrivate()})
	b.SetNetworkMap(bigMap(100))
	keys, addrs := b.byKey.Load(), b.addrs.table.Load()
	entries := make([]*addrEntry, len(addrs.slots))
	for i := range addrs.slots {
		entries[i] = addrs.slots[i].Load()
	}
	nm := bigMap(100)
	if a := testing.AllocsPerRun(10, func() { b.SetNetworkMap(nm) }); a != 0 {
		t.Errorf("an unchanged map allocates %v times", a)
	}
	if b.byKey.Load() != keys || b.addrs.table.Load() != addrs {
		t.Fatal("an unchanged map published new tables")
	}
	for i := range addrs.slots {
		if addrs.slots[i].Load() != entries[i] {
			t.Fatalf("an unchanged map rewrote address slot %d", i)
		}
	}
	// One peer's endpoints move: only its addresses change.
	b.SetNetworkMap(churned(nm))
	if b.byKey.Load() != keys {
		t.Error("a map with the same peers published a new key table")
	}
	changed := 0
	for i := range addrs.slots {
		if addrs.slots[i].Load() != entries[i] {
			changed++
		}
	}
	if changed != 2 { // the old endpoint's tombstone and the new one
		t.Errorf("one moved endpoint changed %d address slots, want 2", changed)
	}
	checkIndex(t, b)
}

// TestAddressTableConcurrent: receive-path lookups run while maps churn
// and disco proves addresses. Every lookup gives the peer the address
// belongs to or none (never another peer), and an address no change
// touches always resolves. Run under -race.
func TestAddressTableConcurrent(t *testing.T) {
	const peers = 200
	b := New(Options{NodeKey: netmap.NewNodePrivate(), DiscoKey: netmap.NewDiscoPrivate()})
	nm := bigMap(peers)
	b.SetNetworkMap(nm)
	keyOf := map[netip.AddrPort]netmap.NodePublic{}
	var stable []netip.AddrPort // endpoint 1 of every peer: never changes
	for i := range peers {
		k := nm.Peers[netmap.NodeID(i+1)].NodeKey
		keyOf[peerEndpoint(i, 0)], keyOf[peerEndpoint(i, 1)] = k, k
		keyOf[netip.AddrPortFrom(peerEndpoint(i, 0).Addr(), 41642)] = k
		stable = append(stable, peerEndpoint(i, 1))
	}
	for i := range 4 * peers { // learnt i belongs to peer i%peers
		keyOf[learntEndpoint(i)] = nm.Peers[netmap.NodeID(i%peers+1)].NodeKey
	}
	addrs := make([]netip.AddrPort, 0, len(keyOf))
	for a := range keyOf {
		addrs = append(addrs, a)
	}

	var stop atomic.Bool
	var wg sync.WaitGroup
	errs := make(chan string, 4)
	fail := func(s string) {
		select {
		case errs <- s:
		default:
		}
		stop.Store(true)
	}
	for r := range 2 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(r), 0))
			for !stop.Load() {
				tb := b.addrs.table.Load()
				a := addrs[rng.IntN(len(addrs))]
				if p := tb.lookup(a); p != nil && p.key != keyOf[a] {
					fail("address " + a.String() + " resolved to another peer")
				}
				s := stable[rng.IntN(len(stable))]
				if p := tb.lookup(s); p == nil || p.key != keyOf[s] {
					fail("unchanged address " + s.String() + " did not resolve to its peer")
				}
			}
		})
	}
	var writers sync.WaitGroup
	writers.Go(func() { // maps: one peer's NAT rebinds, and back
		for i := range 300 {
			nm2 := nm.Clone()
			nd := *nm2.Peers[netmap.NodeID(i%peers+1)]
			nd.Endpoints = []netip.AddrPort{netip.AddrPortFrom(nd.Endpoints[0].Addr(), 41642), nd.Endpoints[1]}
			nm2.Peers[nd.ID] = &nd
			b.SetNetworkMap(nm2)
			b.SetNetworkMap(nm)
		}
	})
	writers.Go(func() { // disco
		for i := range 3000 {
			a := learntEndpoint(i % (4 * peers))
			b.mu.Lock()
			p := b.peers[keyOf[a]]
			b.mu.Unlock()
			b.learnAddr(a, p)
		}
	})
	writers.Wait()
	stop.Store(true)
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	checkIndex(t, b)
}

// TestDataPathAllocs: the bind adds no allocation per packet, on receive
// (demux and peer lookup, with a learnt address too) or on a direct send.
func TestDataPathAllocs(t *testing.T) {
	peerKey := netmap.NewNodePrivate().Public()
	pub, learnt := ap("127.0.0.1:41641"), ap("127.0.0.2:41641")
	fake := &countingBind{}
	mb := New(Options{NodeKey: netmap.NewNodePrivate(), DiscoKey: netmap.NewDiscoPrivate(),
		Paths: endpoint.Config{TrustDuration: time.Hour, HeartbeatInterval: time.Hour}})
	mb.std = fake
	mb.SetNetworkMap(&netmap.NetworkMap{Peers: map[netmap.NodeID]*netmap.Node{1: {
		ID: 1, NodeKey: peerKey, Endpoints: []netip.AddrPort{pub},
	}}})
	ep, _ := mb.ParseEndpoint(EndpointFor(peerKey))
	p := ep.(*Endpoint).p
	mb.learnAddr(learnt, p)

	const batch = 16
	packets, sizes, eps := make([][]byte, batch), make([]int, batch), make([]conn.Endpoint, batch)
	srcs := []conn.Endpoint{&conn.StdNetEndpoint{AddrPort: pub}, &conn.StdNetEndpoint{AddrPort: learnt}}
	for i := range packets {
		packets[i] = make([]byte, 1500)
	}
	recv := mb.wrapReceive(func(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		for i := range packets {
			packets[i][0] = 4 // WireGuard transport data
			sizes[i] = 1420
			eps[i] = srcs[i%2]
		}
		return len(packets), nil
	})
	if a := testing.AllocsPerRun(100, func() {
		if n, _ := recv(packets, sizes, eps); n != batch {
			t.Fatal("short batch")
		}
	}); a != 0 {
		t.Errorf("receive: %v allocations per batch", a)
	}
	for i := range batch {
		if sizes[i] == 0 || eps[i] != ep {
			t.Fatalf("packet %d not handed to WireGuard as the peer's", i)
		}
	}

	now := time.Now()
	p.mu.Lock()
	p.sel.NoteActivity(now)
	for _, pr := range p.sel.Poll(now).Pings {
		p.sel.HandlePong(now, pr.TxID, pr.To)
	}
	p.mu.Unlock()
	bufs := packets[:batch]
	if a := testing.AllocsPerRun(100, func() {
		if err := mb.Send(bufs, ep); err != nil {
			t.Fatal(err)
		}
	}); a != 0 {
		t.Errorf("direct send: %v allocations per batch", a)
	}
	if fake.to.Load() == nil || fake.to.Load().AddrPort != pub {
		t.Errorf("sent to %v, want the direct path %v", fake.to.Load(), pub)
	}
}

// countingBind is a UDP socket that records where it was asked to send.
type countingBind struct {
	conn.Bind
	to atomic.Pointer[conn.StdNetEndpoint]
}

func (c *countingBind) Send(bufs [][]byte, ep conn.Endpoint) error {
	c.to.Store(ep.(*conn.StdNetEndpoint))
	return nil
}
