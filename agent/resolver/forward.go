package resolver

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/miekg/dns"

	"meshd.dev/meshd/netmap"
)

// maxUpstreams bounds how many resolvers one forward tries, so that a
// long list cannot hold a forward slot for long.
const maxUpstreams = 4

// upstreams returns the resolvers to forward to, without this resolver's
// own addresses.
func (r *Resolver) upstreams() []netip.AddrPort {
	var ups []netip.AddrPort
	if r.opts.Upstreams != nil {
		ups = r.opts.Upstreams()
	} else {
		b, err := os.ReadFile(r.opts.ResolvConf)
		if err != nil {
			r.log.Debug("MagicDNS: no upstream resolvers", "err", err)
			return nil
		}
		ups = ParseResolvConf(b)
	}
	return slices.DeleteFunc(slices.Clone(ups), r.isSelf)
}

// isSelf reports whether forwarding to ap would reach this resolver.
func (r *Resolver) isSelf(ap netip.AddrPort) bool {
	a := ap.Addr().Unmap()
	return !a.IsValid() || a.IsUnspecified() || a == netmap.ResolverIPv4 || a == netmap.ResolverIPv6 || slices.Contains(r.opts.Self, a)
}

// ParseResolvConf returns the nameservers of a resolv.conf file, port 53,
// in order. Lines it does not understand are skipped, as the C library
// does; an IPv6 zone ("fe80::1%eth0") is kept.
func ParseResolvConf(b []byte) []netip.AddrPort {
	var out []netip.AddrPort
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 0, 512), 64<<10)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 || f[0] != "nameserver" {
			continue
		}
		a, err := netip.ParseAddr(f[1])
		if err != nil {
			continue
		}
		out = append(out, netip.AddrPortFrom(a.Unmap(), 53))
	}
	return out
}

// forward sends q (req on the wire) to servers in turn and relays the first
// answer. The query goes out under a fresh random ID, so an off-path
// attacker cannot guess it from the client's, and only an answer with that
// ID and q's question is taken.
func (r *Resolver) forward(ctx context.Context, req []byte, q *dns.Msg, servers []netip.AddrPort, tcp bool) []byte {
	if len(servers) == 0 {
		return r.pack(new(dns.Msg).SetRcode(q, dns.RcodeServerFailure), q, tcp)
	}
	select {
	case r.fwd <- struct{}{}:
		defer func() { <-r.fwd }()
	default:
		// Every slot is busy: answer at once rather than queue, so a
		// flood costs neither sockets nor waiting goroutines.
		r.refusedFull.Add(1)
		return r.pack(new(dns.Msg).SetRcode(q, dns.RcodeServerFailure), q, tcp)
	}
	ctx, cancel := context.WithTimeout(ctx, r.opts.Timeout)
	defer cancel()
	out := slices.Clone(req)
	var id [2]byte
	rand.Read(id[:])
	copy(out, id[:])
	var errs []error
	servers = servers[:min(len(servers), maxUpstreams)]
	for i, s := range servers {
		// Each server gets an equal share of what is left, so a dead
		// first one does not eat the whole budget.
		left := len(servers) - i
		actx, acancel := ctx, context.CancelFunc(func() {})
		if dl, ok := ctx.Deadline(); ok {
			actx, acancel = context.WithTimeout(ctx, time.Until(dl)/time.Duration(left))
		}
		resp, err := r.exchange(actx, s, out, q, tcp)
		acancel()
		if err == nil {
			return r.relay(resp, q, tcp)
		}
		errs = append(errs, fmt.Errorf("%v: %w", s, err))
		if ctx.Err() != nil {
			break
		}
	}
	r.log.Debug("MagicDNS: forward failed", "name", q.Question[0].Name, "err", errors.Join(errs...))
	return r.pack(new(dns.Msg).SetRcode(q, dns.RcodeServerFailure), q, tcp)
}

// relay turns an upstream answer into the client's: the client's ID, and
// truncated to what the client takes.
func (r *Resolver) relay(resp []byte, q *dns.Msg, tcp bool) []byte {
	if len(resp) <= maxSize(q, tcp) {
		binary.BigEndian.PutUint16(resp, q.Id)
		return resp
	}
	m := new(dns.Msg)
	if err := m.Unpack(resp); err != nil {
		return r.pack(new(dns.Msg).SetRcode(q, dns.RcodeServerFailure), q, tcp)
	}
	m.Id = q.Id
	return r.pack(m, q, tcp)
}

// exchange sends query to server and returns its answer. Over UDP a
// truncated answer is asked again over TCP when the client came over TCP
// (a UDP client gets the TC answer and retries over TCP itself).
func (r *Resolver) exchange(ctx context.Context, server netip.AddrPort, query []byte, q *dns.Msg, tcp bool) ([]byte, error) {
	resp, err := r.exchangeOver(ctx, "udp", server, query, q)
	if err != nil || !tcp || resp[2]&0x02 == 0 { // TC
		return resp, err
	}
	return r.exchangeOver(ctx, "tcp", server, query, q)
}

// udpRetry is how long a forwarded UDP query waits before it is sent
// again (then twice as long each time, up to the timeout).
const udpRetry = time.Second

func (r *Resolver) exchangeOver(ctx context.Context, network string, server netip.AddrPort, query []byte, q *dns.Msg) ([]byte, error) {
	c, err := r.opts.Dial(ctx, network, server)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
	defer stop()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	if network == "tcp" {
		msg := make([]byte, 2+len(query))
		binary.BigEndian.PutUint16(msg, uint16(len(query)))
		copy(msg[2:], query)
		if _, err := c.Write(msg); err != nil {
			return nil, err
		}
		var l [2]byte
		if _, err := io.ReadFull(c, l[:]); err != nil {
			return nil, err
		}
		resp := make([]byte, binary.BigEndian.Uint16(l[:]))
		if _, err := io.ReadFull(c, resp); err != nil {
			return nil, err
		}
		if !answers(resp, query, q) {
			return nil, errors.New("answer does not match the query")
		}
		return resp, nil
	}
	if _, err := c.Write(query); err != nil {
		return nil, err
	}
	buf := make([]byte, dns.MaxMsgSize)
	// A datagram lost either way (a peer's tunnel still handshaking, a
	// full socket buffer) is asked again, as stub resolvers do, rather
	// than waited for until the timeout: after udpRetry, then twice as
	// long each time. The same query, so any answer counts.
	wait := udpRetry
	for {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		retry := time.Now().Add(wait)
		if dl, ok := ctx.Deadline(); ok && dl.Before(retry) {
			retry = dl
		}
		c.SetReadDeadline(retry)
		// A connected socket takes datagrams from server only; anything
		// that does not answer this query (a late answer to an earlier
		// one, a forgery) is skipped.
		n, err := c.Read(buf)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				if _, err := c.Write(query); err != nil {
					return nil, err
				}
				wait *= 2
				continue
			}
			return nil, err
		}
		if answers(buf[:n], query, q) {
			return slices.Clone(buf[:n]), nil
		}
	}
}

// answers reports whether resp is a response to query (same ID, QR set)
// for q's question.
func answers(resp, query []byte, q *dns.Msg) bool {
	if len(resp) < 12 || resp[0] != query[0] || resp[1] != query[1] || resp[2]&0x80 == 0 {
		return false
	}
	var m dns.Msg
	if err := m.Unpack(resp); err != nil {
		return false
	}
	if len(m.Question) != 1 {
		// Some servers send no question with errors such as FORMERR.
		return len(m.Question) == 0 && m.Rcode != dns.RcodeSuccess
	}
	a, b := m.Question[0], q.Question[0]
	return a.Qtype == b.Qtype && a.Qclass == b.Qclass && strings.EqualFold(a.Name, b.Name)
}
