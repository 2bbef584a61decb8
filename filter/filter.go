package filter

import (
	"context"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"

	"meshd.dev/meshd/packet"
)

// The protocol numbers and TCP flags the filter reads.
const (
	protoICMPv4 = packet.ProtoICMPv4
	protoTCP    = packet.ProtoTCP
	protoUDP    = packet.ProtoUDP
	protoICMPv6 = packet.ProtoICMPv6
	protoSCTP   = packet.ProtoSCTP

	tcpFIN = packet.TCPFin
	tcpSYN = packet.TCPSyn
	tcpRST = packet.TCPRst
	tcpACK = packet.TCPAck
)

// Verdict is the outcome of filtering one packet: Accept, or the reason it
// was dropped.
type Verdict uint8

const (
	// Accept lets the packet through.
	Accept Verdict = iota
	// DropNoRule: no rule allows the packet and it belongs to no flow this
	// node opened.
	DropNoRule
	// DropNotLocal: the destination is none of this node's addresses or
	// routes.
	DropNotLocal
	// DropMalformed: the packet is not a well-formed IPv4 or IPv6 packet
	// the filter can judge (short, bad header length, lying lengths, broken
	// options, truncated transport header).
	DropMalformed
	// DropFragment: a non-first fragment whose first fragment was not
	// accepted (or was never seen).
	DropFragment

	numVerdicts
)

var verdictNames = [numVerdicts]string{"accept", "no_rule", "not_local", "malformed", "fragment"}

func (v Verdict) String() string {
	if v < numVerdicts {
		return verdictNames[v]
	}
	return "unknown"
}

// Direction is which way a packet crosses the tunnel.
type Direction uint8

const (
	// In is from a peer (after decryption) to this node.
	In Direction = iota
	// Out is from this node to a peer (before encryption).
	Out
)

func (d Direction) String() string {
	if d == In {
		return "in"
	}
	return "out"
}

// Options configure a Filter. The zero value gives the defaults.
type Options struct {
	// MaxFlows bounds the flow table (default 65536: about 8.5 MiB of address
	// space, resident only as far as flows have used it).
	MaxFlows int
	// MaxFlowsPerPeer bounds the flows one remote address may hold
	// (default MaxFlows/4), so one peer cannot evict everyone else's.
	MaxFlowsPerPeer int
	// MaxFragments bounds the table of fragmented datagrams whose first
	// fragment was accepted (default 4096).
	MaxFragments int
	// Idle timeouts. Defaults: TCP 120h (as Linux conntrack: long-lived
	// training jobs keep idle connections for days), TCP after FIN/RST
	// 30s, UDP 180s, ICMP echo 30s, other protocols 180s, fragments 30s.
	TCPTimeout, TCPClosingTimeout, UDPTimeout, ICMPTimeout time.Duration
	OtherTimeout, FragmentTimeout                          time.Duration
	// RecentDrops is how many dropped packets RecentDrops keeps (default 128).
	RecentDrops int
	// Logger receives a rate-limited log of dropped packets; nil: none.
	Logger *slog.Logger
	// DropLogEvery and DropLogBurst rate-limit the drop log (default one
	// line per second, bursts of 10).
	DropLogEvery time.Duration
	DropLogBurst int
	// Shards is the number of flow table shards (default 64).
	Shards int
}

// Filter enforces compiled Rules on packets in both directions and keeps
// the flow state that lets replies in. Rules are swapped atomically with
// SetRules; flow state lives here, not in Rules, so a swap keeps every
// flow. All methods are safe for concurrent use.
type Filter struct {
	rules atomic.Pointer[Rules]
	flows *flowTable
	frags *flowTable
	// replyPorts are the local TCP and UDP ports of flows this node has
	// opened: inbound packets to them ask the flow table before the rules.
	// Only an ordering hint (the verdict is the same either way), so it
	// is never pruned.
	replyPorts portSet
	ttl        timeouts
	base       time.Time

	// The drop path takes recentMu anyway for the ring, so the counters
	// live under it too: one lock, no extra atomic per dropped packet.
	recentMu  sync.Mutex
	drops     [2][numVerdicts]uint64
	recent    []dropRecord
	recentN   uint64 // total records written
	recentPos int    // next slot of recent (recentN mod len, without a division)

	log     *slog.Logger
	limiter *rate.Limiter

	// accepts counts accepted packets per direction, for metrics. Batches
	// add their count once at the end (InBatch.Done, OutboundBatch), so a
	// batch costs one atomic add, not one per packet.
	accepts [2]atomic.Uint64
}

// New returns a Filter that denies every inbound packet that is not a reply
// to a flow this node opens, until SetRules installs rules.
func New(opts Options) *Filter {
	def := func(v, d int) int {
		if v <= 0 {
			return d
		}
		return v
	}
	dur := func(v, d time.Duration) int64 {
		if v <= 0 {
			return int64(d)
		}
		return int64(v)
	}
	maxFlows := def(opts.MaxFlows, 65536)
	shards := def(opts.Shards, 64)
	f := &Filter{
		flows: newFlowTable(maxFlows, def(opts.MaxFlowsPerPeer, maxFlows/4), shards),
		frags: newFlowTable(def(opts.MaxFragments, 4096), def(opts.MaxFragments, 4096)/8, 16),
		ttl: timeouts{
			tcp:        dur(opts.TCPTimeout, 120*time.Hour),
			tcpClosing: dur(opts.TCPClosingTimeout, 30*time.Second),
			udp:        dur(opts.UDPTimeout, 180*time.Second),
			icmp:       dur(opts.ICMPTimeout, 30*time.Second),
			other:      dur(opts.OtherTimeout, 180*time.Second),
			frag:       dur(opts.FragmentTimeout, 30*time.Second),
		},
		base:   time.Now(),
		recent: make([]dropRecord, def(opts.RecentDrops, 128)),
		log:    opts.Logger,
	}
	every := opts.DropLogEvery
	if every <= 0 {
		every = time.Second
	}
	f.limiter = rate.NewLimiter(rate.Every(every), def(opts.DropLogBurst, 10))
	empty, _ := Compile(nil, nil)
	f.rules.Store(empty)
	return f
}

// SetRules installs r for every packet filtered after it returns. Packets
// being filtered concurrently finish with the rules they started with; a
// batch is judged entirely by one Rules.
func (f *Filter) SetRules(r *Rules) {
	if r == nil {
		r, _ = Compile(nil, nil)
	}
	f.rules.Store(r)
}

// Rules returns the rules in force.
func (f *Filter) Rules() *Rules { return f.rules.Load() }

// clock is the state of one Inbound/Outbound call or one batch. It turns
// the caller's time into the flow table's monotonic nanoseconds on first
// use only (most packets are judged by rules alone), and remembers the last
// flow whose reply it let in.
type clock struct {
	now  time.Time
	base *time.Time
	t    int64
	set  bool
}

// flowMemo is the key of the last reply a batch accepted by its flow.
// With GRO a batch is mostly consecutive packets of one flow, and all
// share one time: the first packet's lookup already did everything the
// next ones' would (expiry and LRU refreshed to this time), unless a FIN
// or RST changes the flow's state. So a batch sees a flow as it was at its
// first packet, as it sees one Rules throughout.
type flowMemo struct {
	kw keyWords
	ok bool
}

// hit reports whether p, an inbound packet with ports, is a reply on the
// flow m remembers that changes nothing in it: no FIN or RST, and not a
// bare SYN, which answers nothing (see reply). Checked before reply, it
// spares the batch's next packets of one flow a call each.
func (m *flowMemo) hit(p *packet.Parsed) bool {
	// Ports and protocol first: packets of other flows mostly differ
	// there, and then cost one compare.
	return m.ok && uint64(p.DstPort)|uint64(p.SrcPort)<<16|uint64(p.Proto)<<32 == m.kw[4] &&
		p.Src.Lo == m.kw[3] && p.Dst.Lo == m.kw[1] && p.Src.Hi == m.kw[2] && p.Dst.Hi == m.kw[0] &&
		p.TCPFlags&(tcpFIN|tcpRST) == 0 && p.TCPFlags&(tcpSYN|tcpACK) != tcpSYN
}

func (c *clock) mono() int64 {
	if !c.set {
		c.t, c.set = int64(c.now.Sub(*c.base)), true
	}
	return c.t
}

// Inbound judges a packet arriving from a peer (after WireGuard decryption
// and cryptokey routing). Drops are counted, recorded and logged. It
// decodes the packet itself; the TUN wrapper, which decodes every packet
// once for the whole data path, uses an InBatch.
func (f *Filter) Inbound(pkt []byte, now time.Time) Verdict {
	var p packet.Parsed
	p.Decode(pkt)
	in := f.BeginIn(now)
	v := in.Judge(&p, pkt)
	if v == Accept {
		in.Done(1)
	}
	return v
}

// Outbound judges a packet this node sends to a peer (before encryption)
// and learns flows from it, so that the peer's replies are let in. Like
// Inbound it decodes the packet itself.
func (f *Filter) Outbound(pkt []byte, now time.Time) Verdict {
	var p packet.Parsed
	p.Decode(pkt)
	c := clock{now: now, base: &f.base}
	v := f.out(f.rules.Load(), &p, len(pkt), &c)
	if v == Accept {
		f.accepts[Out].Add(1)
	}
	return v
}

// InboundBatch filters packets about to be written to the TUN device, as
// wireguard-go's Device.Write hands them over: packet i is bufs[i][offset:]
// and pp[i] is what packet.Parsed.Decode made of it (len(pp) >= len(bufs)).
// It compacts bufs and pp in place, keeping accepted packets in order, and
// returns the accepted prefix of bufs; pp[:len(result)] are theirs. A
// wrapper that decodes as it goes uses BeginIn instead.
func (f *Filter) InboundBatch(bufs [][]byte, pp []packet.Parsed, offset int, now time.Time) [][]byte {
	in := f.BeginIn(now)
	k := 0
	for i, b := range bufs {
		if offset > len(b) {
			b = nil
		} else {
			b = b[offset:]
		}
		if in.Judge(&pp[i], b) != Accept {
			continue
		}
		if k != i {
			bufs[k] = bufs[i]
			pp[k] = pp[i]
		}
		k++
	}
	in.Done(k)
	return bufs[:k]
}

// InBatch judges the packets of one inbound batch: all by the Rules in
// force when it began, at one time, and with a memo of the last flow it
// let a reply in by (flowMemo). It belongs to one goroutine and lives
// for one batch.
type InBatch struct {
	f    *Filter
	r    *Rules
	c    clock
	memo flowMemo
}

// BeginIn starts judging an inbound batch that arrived at now.
func (f *Filter) BeginIn(now time.Time) InBatch {
	return InBatch{f: f, r: f.rules.Load(), c: clock{now: now, base: &f.base}}
}

// Judge judges a packet arriving from a peer (after WireGuard decryption
// and cryptokey routing): p is what packet.Parsed.Decode made of pkt. It
// is Inbound for a packet decoded once for the whole data path, so that a
// wrapper can decode and judge each packet in one pass over the batch.
// Drops are counted, recorded and logged.
func (b *InBatch) Judge(p *packet.Parsed, pkt []byte) Verdict {
	return b.f.in(b.r, p, pkt, &b.c, &b.memo)
}

// Done adds the batch's accepted packets, which the caller counted as
// Judge returned Accept, to the filter's count (Accepted): one atomic add
// per batch rather than one per packet. Judge does not count them itself
// so that it stays small enough to inline into the caller's loop (counting
// there cost 39 instructions a packet, bench/README.md).
func (b *InBatch) Done(accepted int) {
	if accepted > 0 {
		b.f.accepts[In].Add(uint64(accepted))
	}
}

// OutboundBatch filters packets read from the TUN device, as
// wireguard-go's Device.Read returns them: packet i is
// bufs[i][offset:offset+sizes[i]] and pp[i] what packet.Parsed.Decode made
// of it (len(pp) >= len(bufs)). A dropped packet gets sizes[i] = 0, which
// wireguard-go's send loop skips. It returns how many were dropped.
func (f *Filter) OutboundBatch(bufs [][]byte, pp []packet.Parsed, offset int, sizes []int, now time.Time) int {
	r := f.rules.Load()
	c := clock{now: now, base: &f.base}
	dropped := 0
	var accepted uint64
	for i := range min(len(bufs), len(sizes)) {
		if sizes[i] <= 0 {
			continue
		}
		if f.out(r, &pp[i], sizes[i], &c) != Accept {
			sizes[i] = 0
			dropped++
			continue
		}
		accepted++
	}
	if accepted > 0 {
		f.accepts[Out].Add(accepted)
	}
	return dropped
}

// in judges an inbound packet decoded into p from b.
func (f *Filter) in(r *Rules, p *packet.Parsed, b []byte, c *clock, memo *flowMemo) Verdict {
	if !p.HasPorts {
		return f.inOther(r, p, b, c)
	}
	// Most packets: a whole TCP or UDP packet (or first fragment). A
	// packet to a local port this node has opened flows from is most
	// likely a reply, so it asks the flow table first; the verdict is the
	// same in either order. The rest of the inbound judgement is in
	// functions of their own, so that this one, run for every packet,
	// keeps a small frame.
	replyFirst := f.replyPorts.has(p.Proto, p.DstPort)
	if replyFirst && (memo.hit(p) || f.reply(p, c, memo)) || r.allows(p) || !replyFirst && (memo.hit(p) || f.reply(p, c, memo)) {
		if p.Frag == packet.FragFirst {
			f.acceptFirstFragment(p, c)
		}
		return Accept
	}
	return f.inDrop(r, p, DropNoRule, c)
}

// inOther judges an inbound packet without ports: malformed, a later
// fragment, ICMP, or a protocol tracked by addresses.
func (f *Filter) inOther(r *Rules, p *packet.Parsed, b []byte, c *clock) Verdict {
	var v Verdict
	switch {
	case !p.Valid():
		f.dropped(In, DropMalformed, nil, len(b), c.now)
		return DropMalformed
	case p.Frag == packet.FragLater:
		// Only fragments of accepted first fragments are in the table, so
		// a hit needs no further checks.
		k := fragKey(p)
		if _, ok := f.frags.lookup(&k, c.mono(), 0, &f.ttl); ok {
			return Accept
		}
		v = DropFragment
	default:
		if v = f.inPortless(r, p, b, c); v == Accept {
			if p.Frag == packet.FragFirst {
				f.acceptFirstFragment(p, c)
			}
			return Accept
		}
	}
	return f.inDrop(r, p, v, c)
}

// inDrop records the drop of an inbound packet the rules and the flow
// table refused with v, which becomes DropNotLocal for a destination that
// is none of this node's.
func (f *Filter) inDrop(r *Rules, p *packet.Parsed, v Verdict, c *clock) Verdict {
	if !r.isLocal(p.Dst) {
		v = DropNotLocal
	}
	f.dropped(In, v, p, p.Len(), c.now)
	return v
}

// acceptFirstFragment lets the later fragments of p's datagram in.
func (f *Filter) acceptFirstFragment(p *packet.Parsed, c *clock) {
	k := fragKey(p)
	f.frags.insert(&k, 0, c.mono(), 0, &f.ttl)
}

// reply reports whether p, an inbound packet with ports, answers a flow
// this node opened, looking it up, and remembers the flow in m if so.
func (f *Filter) reply(p *packet.Parsed, c *clock, m *flowMemo) bool {
	if p.Proto == protoTCP && p.TCPFlags&(tcpSYN|tcpACK) == tcpSYN {
		// A bare SYN opens a connection; it never answers one this node
		// opened (simultaneous open aside), so only rules count.
		return false
	}
	// The packed key (flowKey.words) from this node's side: local is the
	// destination, remote the source. Element by element: a composite
	// literal is built aside and copied in 16-byte loads of 8-byte stores,
	// a store-forwarding stall (measured: ~8 ns of this path).
	var kw keyWords
	kw[0], kw[1], kw[2], kw[3] = p.Dst.Hi, p.Dst.Lo, p.Src.Hi, p.Src.Lo
	kw[4] = uint64(p.DstPort) | uint64(p.SrcPort)<<16 | uint64(p.Proto)<<32
	st, ok := f.flows.lookupWords(&kw, f.flows.hash(&kw), c.mono(), p.TCPFlags, &f.ttl)
	if !ok || st&stLocal == 0 {
		return false
	}
	m.kw, m.ok = kw, true
	return true
}

// inPortless judges an inbound packet without ports that is not a later
// fragment: ICMP, and protocols (GRE, ESP, ...) tracked by addresses.
func (f *Filter) inPortless(r *Rules, p *packet.Parsed, b []byte, c *clock) Verdict {
	if r.allowed(p.Proto, p.Src, p.Dst, 0) && (r.dstsLocal || r.isLocal(p.Dst)) {
		return Accept
	}
	if !p.IsICMP() {
		k := flowKey{local: p.Dst, remote: p.Src, proto: p.Proto}
		if st, ok := f.flows.lookup(&k, c.mono(), 0, &f.ttl); ok && st&stLocal != 0 {
			return Accept
		}
		return DropNoRule
	}
	switch icmpKind(p) {
	case icmpEchoReply:
		k := flowKey{local: p.Dst, remote: p.Src, lport: p.ICMPID, proto: p.Proto}
		if st, ok := f.flows.lookup(&k, c.mono(), 0, &f.ttl); ok && st&stLocal != 0 {
			return Accept
		}
	case icmpError:
		// An error about a packet this node sent: the quote's source is
		// this node. Any tracked flow qualifies (a "packet too big" for a
		// reply this node sends as a server matters as much as one for a
		// flow it opened).
		var q packet.Parsed
		if !p.DecodeQuote(b, &q) || !r.isLocal(q.Src) {
			return DropNoRule
		}
		k := flowKey{local: q.Src, remote: q.Dst, proto: q.Proto}
		switch {
		case q.HasPorts:
			k.lport, k.rport = q.SrcPort, q.DstPort
		case q.Proto == protoICMPv4 || q.Proto == protoICMPv6:
			k.lport = q.ICMPID
		default:
			// Tracked by addresses, as out records it.
		}
		if _, ok := f.flows.lookup(&k, c.mono(), 0, &f.ttl); ok {
			return Accept
		}
	}
	return DropNoRule
}

// icmpKind classifies an ICMP message for state matching.
const (
	icmpOther = iota
	icmpEchoRequest
	icmpEchoReply
	icmpError
)

func icmpKind(p *packet.Parsed) int {
	if p.Version == 4 {
		switch p.ICMPType {
		case 8:
			return icmpEchoRequest
		case 0:
			return icmpEchoReply
		case 3, 11, 12: // unreachable, time exceeded, parameter problem
			return icmpError
		}
		return icmpOther
	}
	switch p.ICMPType {
	case 128:
		return icmpEchoRequest
	case 129:
		return icmpEchoReply
	case 1, 2, 3, 4: // unreachable, packet too big, time exceeded, parameter problem
		return icmpError
	}
	return icmpOther
}

// out judges an outbound packet decoded into p from n bytes and learns
// its flow.
func (f *Filter) out(r *Rules, p *packet.Parsed, n int, c *clock) Verdict {
	switch {
	case p.HasPorts:
		// reply's key with local and remote swapped, built as it is.
		var kw keyWords
		kw[0], kw[1], kw[2], kw[3] = p.Src.Hi, p.Src.Lo, p.Dst.Hi, p.Dst.Lo
		kw[4] = uint64(p.SrcPort) | uint64(p.DstPort)<<16 | uint64(p.Proto)<<32
		h := f.flows.hash(&kw)
		if p.Proto == protoTCP && p.TCPFlags&tcpRST != 0 {
			// A reset creates nothing; it only closes what exists.
			f.flows.lookupWords(&kw, h, c.mono(), p.TCPFlags, &f.ttl)
			return Accept
		}
		if _, ok := f.flows.lookupWords(&kw, h, c.mono(), p.TCPFlags, &f.ttl); ok && p.TCPFlags&tcpSYN == 0 {
			return Accept
		}
		st := f.origin(r, p)
		if st&stLocal != 0 {
			f.replyPorts.add(p.Proto, p.SrcPort)
		}
		f.flows.insertWords(&kw, h, st, c.mono(), p.TCPFlags, &f.ttl)
	case !p.Valid():
		f.dropped(Out, DropMalformed, nil, n, c.now)
		return DropMalformed
	case p.Frag == packet.FragLater:
	case p.IsICMP():
		if icmpKind(p) == icmpEchoRequest {
			k := flowKey{local: p.Src, remote: p.Dst, lport: p.ICMPID, proto: p.Proto}
			f.flows.insert(&k, stLocal, c.mono(), 0, &f.ttl)
		}
	default:
		kw := makeWords(p.Src, p.Dst, 0, 0, p.Proto, kindFlow)
		h := f.flows.hash(&kw)
		if _, ok := f.flows.lookupWords(&kw, h, c.mono(), 0, &f.ttl); !ok {
			f.flows.insertWords(&kw, h, f.origin(r, p), c.mono(), 0, &f.ttl)
		}
	}
	// This node's rules describe only what it accepts; what the peer
	// accepts is the peer's to enforce, so nothing well-formed is dropped
	// on the way out.
	return Accept
}

// origin decides who opened a flow first seen in an outbound packet. A SYN
// is this node opening; a SYN-ACK answers the peer. Mid-flow (a flow that
// predates a restart, or a UDP flow) the flow is the peer's if the rules let
// the peer open it, so that revoking that rule still cuts it; otherwise
// this node opened it (conntrack's loose pick-up).
func (f *Filter) origin(r *Rules, p *packet.Parsed) uint8 {
	if p.Proto == protoTCP && p.TCPFlags&tcpSYN != 0 {
		if p.TCPFlags&tcpACK != 0 {
			return 0
		}
		return stLocal
	}
	if r.allowed(p.Proto, p.Dst, p.Src, p.SrcPort) {
		return 0
	}
	return stLocal
}

func fragKey(p *packet.Parsed) flowKey {
	return flowKey{
		local:  p.Dst,
		remote: p.Src,
		lport:  uint16(p.FragID >> 16),
		rport:  uint16(p.FragID),
		proto:  p.Proto,
		kind:   kindFrag,
	}
}

// DropRecord describes one dropped packet.
type DropRecord struct {
	Time      time.Time  `json:"time"`
	Direction Direction  `json:"-"`
	Dir       string     `json:"dir"`
	Reason    string     `json:"reason"`
	Proto     uint8      `json:"proto"`
	Src       netip.Addr `json:"src,omitzero"`
	Dst       netip.Addr `json:"dst,omitzero"`
	SrcPort   uint16     `json:"src_port,omitempty"`
	DstPort   uint16     `json:"dst_port,omitempty"`
	Len       int        `json:"len"`
}

// dropRecord is what the drop path stores: raw fields, converted to a
// DropRecord only when someone asks.
type dropRecord struct {
	// Unix nanoseconds: a time.Time holds a pointer, and storing one into
	// the heap-allocated ring costs write-barrier work on every drop.
	unixNano         int64
	src, dst         packet.Addr
	n                int
	srcPort, dstPort uint16
	dir              Direction
	v                Verdict
	proto            uint8
	parsed           bool
}

func (d *dropRecord) export() DropRecord {
	r := DropRecord{Time: time.Unix(0, d.unixNano), Direction: d.dir, Dir: d.dir.String(), Reason: d.v.String(), Len: d.n}
	if d.parsed {
		r.Proto, r.Src, r.Dst, r.SrcPort, r.DstPort = d.proto, d.src.Netip(), d.dst.Netip(), d.srcPort, d.dstPort
	}
	return r
}

func (f *Filter) dropped(dir Direction, v Verdict, p *packet.Parsed, n int, now time.Time) {
	f.recentMu.Lock()
	f.drops[dir][v]++
	rec := &f.recent[f.recentPos]
	*rec = dropRecord{unixNano: now.UnixNano(), dir: dir, v: v, n: n}
	if p != nil {
		rec.parsed, rec.proto, rec.src, rec.dst = true, p.Proto, p.Src, p.Dst
		if p.HasPorts {
			rec.srcPort, rec.dstPort = p.SrcPort, p.DstPort
		}
	}
	if f.recentPos++; f.recentPos == len(f.recent) {
		f.recentPos = 0
	}
	f.recentN++
	var e DropRecord
	logIt := f.log != nil && f.limiter.AllowN(now, 1)
	if logIt {
		e = rec.export()
	}
	f.recentMu.Unlock()
	if logIt {
		f.log.LogAttrs(context.Background(), slog.LevelInfo, "packet dropped",
			slog.String("dir", e.Dir), slog.String("reason", e.Reason),
			slog.Int("proto", int(e.Proto)),
			slog.String("src", netip.AddrPortFrom(e.Src, e.SrcPort).String()),
			slog.String("dst", netip.AddrPortFrom(e.Dst, e.DstPort).String()),
			slog.Int("len", n))
	}
}

// RecentDrops returns the last dropped packets, oldest first.
func (f *Filter) RecentDrops() []DropRecord {
	f.recentMu.Lock()
	defer f.recentMu.Unlock()
	n := min(f.recentN, uint64(len(f.recent)))
	out := make([]DropRecord, 0, n)
	for i := f.recentN - n; i < f.recentN; i++ {
		out = append(out, f.recent[i%uint64(len(f.recent))].export())
	}
	return out
}

// Stats is a snapshot of the filter's counters, shaped for
// `meshd status --json`.
type Stats struct {
	Rules     int               `json:"rules"`
	Flows     int               `json:"flows"`
	Fragments int               `json:"fragments"`
	DropsIn   map[string]uint64 `json:"drops_in"`
	DropsOut  map[string]uint64 `json:"drops_out"`
}

// Stats returns the current counters. Every drop reason is present, zero
// or not, so scripts can rely on the keys.
func (f *Filter) Stats() Stats {
	s := Stats{
		Rules:     f.rules.Load().Len(),
		Flows:     f.flows.len(),
		Fragments: f.frags.len(),
		DropsIn:   make(map[string]uint64, numVerdicts-1),
		DropsOut:  make(map[string]uint64, numVerdicts-1),
	}
	f.recentMu.Lock()
	for v := Verdict(1); v < numVerdicts; v++ {
		s.DropsIn[v.String()] = f.drops[In][v]
		s.DropsOut[v.String()] = f.drops[Out][v]
	}
	f.recentMu.Unlock()
	return s
}

// Accepted returns how many packets the filter let through in direction
// dir. Batches are counted when they end, so a batch being judged is not
// in it yet.
func (f *Filter) Accepted(dir Direction) uint64 {
	if dir > Out {
		return 0
	}
	return f.accepts[dir].Load()
}

// Verdicts lists every drop reason (each Verdict but Accept), for callers
// that report Dropped for all of them.
func Verdicts() []Verdict {
	vs := make([]Verdict, 0, numVerdicts-1)
	for v := Verdict(1); v < numVerdicts; v++ {
		vs = append(vs, v)
	}
	return vs
}

// Dropped returns how many packets were dropped in direction dir for
// reason v.
func (f *Filter) Dropped(dir Direction, v Verdict) uint64 {
	if v >= numVerdicts || dir > Out {
		return 0
	}
	f.recentMu.Lock()
	defer f.recentMu.Unlock()
	return f.drops[dir][v]
}
