// Package resolver is MagicDNS: the DNS server a node runs at
// 100.100.100.100 and fd5e:5a1e:d::53. It answers A, AAAA and PTR for the
// tailnet's names from the node's network map, sends names under split DNS
// routes to the route's resolvers, and forwards everything else to the
// host's upstream resolvers. Wire format is github.com/miekg/dns.
//
// The names served are exactly those of the nodes in the map, and the
// coordinator puts in a node's map only the peers its policy lets it see,
// so a hidden node's name does not resolve. A name two nodes claim is
// answered for neither.
package resolver

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"

	"meshd.dev/meshd/netmap"
)

// TTL is the time to live of every answer from the map, in seconds. Short,
// because a policy change or a node leaving must reach clients' caches
// soon; the answers cost nothing to repeat.
const TTL = 30

// Defaults of the Options limits.
const (
	DefaultMaxForwards = 64
	DefaultMaxInflight = 256
	DefaultMaxTCPConns = 32
	DefaultTimeout     = 5 * time.Second
	DefaultResolvConf  = "/etc/resolv.conf"
)

// udpSize is the EDNS(0) payload size this server advertises and the most
// it sends over UDP: the DNS flag day 2020 value, which fits an IPv6
// minimum MTU without fragments.
const udpSize = 1232

// Options configure a Resolver. The zero value works: forwarding to the
// nameservers of /etc/resolv.conf over the host's network.
type Options struct {
	// Upstreams returns the resolvers to forward non-tailnet names to,
	// asked at every forward. nil reads the nameservers of ResolvConf.
	Upstreams func() []netip.AddrPort
	// ResolvConf is the file Upstreams defaults to reading; defaults to
	// /etc/resolv.conf.
	ResolvConf string
	// Self are the addresses this resolver answers on. Upstreams on them
	// (or on netmap.ResolverIPv4/IPv6, always excluded) are skipped, so
	// the resolver never forwards to itself, e.g. once the host's
	// resolv.conf points at it.
	Self []netip.Addr
	// Dial opens the connection of one forwarded query ("udp" or "tcp").
	// Defaults to a net.Dialer; the agent routes tailnet addresses
	// through its netstack in userspace mode.
	Dial func(ctx context.Context, network string, addr netip.AddrPort) (net.Conn, error)
	// Timeout bounds one forwarded query over all upstreams tried.
	Timeout time.Duration
	// MaxForwards bounds the forwarded queries in flight (each holds a
	// socket); a query beyond it gets SERVFAIL at once.
	MaxForwards int
	// MaxInflight bounds the UDP queries being answered at once (each
	// holds a goroutine); packets beyond it are dropped and the client
	// retries.
	MaxInflight int
	// MaxTCPConns bounds concurrent TCP clients; more are closed at once.
	MaxTCPConns int
	Logger      *slog.Logger
}

// Resolver answers DNS queries from the current network map. Its methods
// are safe for concurrent use.
type Resolver struct {
	opts Options
	log  *slog.Logger
	tab  atomic.Pointer[table]
	// fwd holds a token per forward in flight.
	fwd chan struct{}

	refusedFull atomic.Uint64 // forwards refused: MaxForwards reached
	dropped     atomic.Uint64 // UDP queries dropped: MaxInflight reached
}

// New returns a Resolver with no names until SetMap.
func New(opts Options) *Resolver {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.ResolvConf == "" {
		opts.ResolvConf = DefaultResolvConf
	}
	if opts.Timeout <= 0 {
		opts.Timeout = DefaultTimeout
	}
	if opts.MaxForwards <= 0 {
		opts.MaxForwards = DefaultMaxForwards
	}
	if opts.MaxInflight <= 0 {
		opts.MaxInflight = DefaultMaxInflight
	}
	if opts.MaxTCPConns <= 0 {
		opts.MaxTCPConns = DefaultMaxTCPConns
	}
	if opts.Dial == nil {
		opts.Dial = func(ctx context.Context, network string, addr netip.AddrPort) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, addr.String())
		}
	}
	r := &Resolver{opts: opts, log: opts.Logger, fwd: make(chan struct{}, opts.MaxForwards)}
	r.tab.Store(&table{names: map[string]*entry{}, ptr: map[netip.Addr]*entry{}})
	return r
}

// SetMap makes nm's names the ones answered. The table is built aside and
// swapped in whole: a query sees one map from start to end.
func (r *Resolver) SetMap(nm *netmap.NetworkMap) {
	t, problems := newTable(nm)
	r.tab.Store(t)
	for _, p := range problems {
		r.log.Warn("MagicDNS: network map", "problem", p)
	}
}

// Respond answers one query in wire format, received over TCP or UDP.
// It returns nil when the query gets no answer at all: fewer bytes than a
// header, or a response (answering those could loop between two servers
// or reflect traffic at a spoofed source). A query that does not parse
// gets FORMERR. A forward waits for upstreams up to the Timeout or ctx.
func (r *Resolver) Respond(ctx context.Context, req []byte, tcp bool) []byte {
	if len(req) < 12 || req[2]&0x80 != 0 { // QR: a response
		return nil
	}
	q := new(dns.Msg)
	if err := q.Unpack(req); err != nil {
		return formErr(req)
	}
	if q.Opcode != dns.OpcodeQuery {
		return r.pack(new(dns.Msg).SetRcode(q, dns.RcodeNotImplemented), q, tcp)
	}
	if len(q.Question) != 1 {
		return r.pack(new(dns.Msg).SetRcode(q, dns.RcodeFormatError), q, tcp)
	}
	if opt := q.IsEdns0(); opt != nil && opt.Version() != 0 {
		m := new(dns.Msg).SetRcode(q, dns.RcodeBadVers)
		m.SetEdns0(udpSize, false)
		return r.pack(m, q, tcp)
	}
	t := r.tab.Load()
	var buf [256]byte
	name := lowerName(buf[:], q.Question[0].Name)
	if name == nil {
		return r.pack(new(dns.Msg).SetRcode(q, dns.RcodeFormatError), q, tcp)
	}
	if t.suffix != "" && under(string(name), t.suffix) {
		return r.pack(t.answer(q, string(name)), q, tcp)
	}
	if a, ok := parseReverse(string(name)); ok && t.inReverse(a) {
		return r.pack(t.answerPTR(q, a), q, tcp)
	}
	servers := t.route(string(name))
	if servers == nil {
		servers = r.upstreams()
	}
	return r.forward(ctx, req, q, servers, tcp)
}

// formErr answers a query that does not parse: its ID, FORMERR, nothing
// else (the question cannot be trusted).
func formErr(req []byte) []byte {
	return headerOnly(uint16(req[0])<<8|uint16(req[1]), int(req[2]>>3&0xf), dns.RcodeFormatError)
}

// headerOnly is a response of just a header: id, QR, opcode and rcode.
func headerOnly(id uint16, opcode, rcode int) []byte {
	return []byte{byte(id >> 8), byte(id), 0x80 | byte(opcode&0xf)<<3, byte(rcode & 0xf), 0, 0, 0, 0, 0, 0, 0, 0}
}

// maxSize is the largest response the client of q takes.
func maxSize(q *dns.Msg, tcp bool) int {
	if tcp {
		return dns.MaxMsgSize
	}
	size := dns.MinMsgSize
	if opt := q.IsEdns0(); opt != nil {
		size = max(size, min(int(opt.UDPSize()), udpSize))
	}
	return size
}

// pack encodes m, the answer to q, truncated (TC) to what the client takes.
func (r *Resolver) pack(m *dns.Msg, q *dns.Msg, tcp bool) []byte {
	if q.IsEdns0() != nil && m.IsEdns0() == nil {
		m.SetEdns0(udpSize, false)
	}
	m.Truncate(maxSize(q, tcp))
	b, err := m.Pack()
	if err != nil {
		// Only a bug of ours gets here (we built m from a parsed query).
		r.log.Error("MagicDNS: pack answer", "err", err)
		return headerOnly(q.Id, q.Opcode, dns.RcodeServerFailure)
	}
	return b
}

// answer is the reply to q for a name under the suffix.
func (t *table) answer(q *dns.Msg, name string) *dns.Msg {
	m := new(dns.Msg).SetReply(q)
	m.Authoritative = true
	m.RecursionAvailable = true
	qq := q.Question[0]
	if qq.Qclass != dns.ClassINET && qq.Qclass != dns.ClassANY {
		m.Rcode = dns.RcodeRefused
		m.Authoritative = false
		return m
	}
	if name == t.suffix {
		if qq.Qtype == dns.TypeSOA || qq.Qtype == dns.TypeANY {
			m.Answer = append(m.Answer, t.soa())
		} else {
			m.Ns = append(m.Ns, t.soa())
		}
		return m
	}
	e := t.lookup(name)
	switch {
	case e == nil:
		m.Rcode = dns.RcodeNameError
		m.Ns = append(m.Ns, t.soa())
		return m
	case e.holders > 1:
		// Refused rather than answered for one of them: see entry.holders.
		m.Rcode = dns.RcodeServerFailure
		m.Authoritative = false
		return m
	}
	hdr := func(rrtype uint16) dns.RR_Header {
		return dns.RR_Header{Name: qq.Name, Rrtype: rrtype, Class: dns.ClassINET, Ttl: TTL}
	}
	if qq.Qtype == dns.TypeA || qq.Qtype == dns.TypeANY {
		for _, a := range e.v4 {
			m.Answer = append(m.Answer, &dns.A{Hdr: hdr(dns.TypeA), A: a.AsSlice()})
		}
	}
	if qq.Qtype == dns.TypeAAAA || qq.Qtype == dns.TypeANY {
		for _, a := range e.v6 {
			m.Answer = append(m.Answer, &dns.AAAA{Hdr: hdr(dns.TypeAAAA), AAAA: a.AsSlice()})
		}
	}
	if len(m.Answer) == 0 {
		// The name exists without data of this type: NOERROR, no
		// answer, the SOA for negative caching (RFC 2308).
		m.Ns = append(m.Ns, t.soa())
	}
	return m
}

// answerPTR is the reply to q, a reverse name of tailnet address a.
func (t *table) answerPTR(q *dns.Msg, a netip.Addr) *dns.Msg {
	m := new(dns.Msg).SetReply(q)
	m.Authoritative = true
	m.RecursionAvailable = true
	qq := q.Question[0]
	e := t.ptr[a]
	switch {
	case e == nil || e.name == "":
		m.Rcode = dns.RcodeNameError
	case e.holders > 1:
		m.Rcode = dns.RcodeServerFailure
		m.Authoritative = false
	case qq.Qtype == dns.TypePTR || qq.Qtype == dns.TypeANY:
		m.Answer = append(m.Answer, &dns.PTR{
			Hdr: dns.RR_Header{Name: qq.Name, Rrtype: dns.TypePTR, Class: dns.ClassINET, Ttl: TTL},
			Ptr: e.name,
		})
	}
	return m
}

// soa is the suffix's SOA record, sent with negative answers so that
// resolvers cache them for TTL seconds only.
func (t *table) soa() dns.RR {
	return &dns.SOA{
		Hdr:     dns.RR_Header{Name: t.suffix, Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: TTL},
		Ns:      "ns." + t.suffix,
		Mbox:    "hostmaster." + t.suffix,
		Serial:  1,
		Refresh: 3600, Retry: 600, Expire: 86400,
		Minttl: TTL,
	}
}
