package resolver

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// upstream is a real miekg/dns server on loopback, UDP and TCP on one port.
type upstream struct {
	addr netip.AddrPort
	mu   sync.Mutex
	ids  []uint16 // IDs of the queries it received
	nets []string // "udp" or "tcp" of each
}

// startUpstream serves answer(q) for every query: A records for names in
// a, and for "big." 60 TXT records (4 KB); over UDP the answer is
// truncated to what the query allows, as real servers do.
func startUpstream(t *testing.T, a map[string]string) *upstream {
	t.Helper()
	pc, ln, port := udpAndTCP(t)
	u := &upstream{addr: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(port))}
	h := dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		u.mu.Lock()
		u.ids = append(u.ids, q.Id)
		u.nets = append(u.nets, w.LocalAddr().Network())
		u.mu.Unlock()
		m := new(dns.Msg).SetReply(q)
		m.RecursionAvailable = true
		qq := q.Question[0]
		switch {
		case qq.Name == "big." && qq.Qtype == dns.TypeTXT:
			for i := range 60 {
				m.Answer = append(m.Answer, &dns.TXT{Hdr: dns.RR_Header{Name: qq.Name, Rrtype: dns.TypeTXT, Class: dns.ClassINET, Ttl: 60},
					Txt: []string{fmt.Sprintf("record %02d %060d", i, 0)}})
			}
		case a[strings.ToLower(qq.Name)] != "" && qq.Qtype == dns.TypeA:
			m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: qq.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60},
				A: net.ParseIP(a[strings.ToLower(qq.Name)])})
		default:
			m.Rcode = dns.RcodeNameError
		}
		if w.LocalAddr().Network() == "udp" {
			size := dns.MinMsgSize
			if o := q.IsEdns0(); o != nil {
				size = int(o.UDPSize())
			}
			m.Truncate(size)
		}
		w.WriteMsg(m)
	})
	us := &dns.Server{PacketConn: pc, Handler: h}
	ts := &dns.Server{Listener: ln, Handler: h}
	go us.ActivateAndServe()
	go ts.ActivateAndServe()
	t.Cleanup(func() { us.Shutdown(); ts.Shutdown() })
	return u
}

func (u *upstream) seen() ([]uint16, []string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	return slices.Clone(u.ids), slices.Clone(u.nets)
}

// silent is a UDP socket that reads queries and never answers.
// udpAndTCP listens on one loopback port number for UDP and for TCP, as a
// DNS server does. The kernel picks the UDP port; that number may be in
// use for TCP already (an ephemeral port of some connection, which a busy
// CI machine has many of: one run failed so), so a taken one is tried
// again with another.
func udpAndTCP(t *testing.T) (net.PacketConn, net.Listener, int) {
	t.Helper()
	var last error
	for range 50 {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := pc.LocalAddr().(*net.UDPAddr).Port
		ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err == nil {
			return pc, ln, port
		}
		pc.Close()
		last = err
	}
	t.Fatalf("no loopback port free for both UDP and TCP: %v", last)
	return nil, nil, 0
}

func silent(t *testing.T) netip.AddrPort {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 2048)
		for {
			if _, _, err := pc.ReadFrom(buf); err != nil {
				return
			}
		}
	}()
	return pc.LocalAddr().(*net.UDPAddr).AddrPort()
}

func fixed(ups ...netip.AddrPort) func() []netip.AddrPort {
	return func() []netip.AddrPort { return ups }
}

// TestForwardAndSplitDNS: names outside the tailnet go to the upstream,
// names under a route to the route's server, tailnet names to neither.
// The client gets its own ID back though the upstream saw another.
func TestForwardAndSplitDNS(t *testing.T) {
	up := startUpstream(t, map[string]string{"www.example.com.": "198.18.0.80", "www.corp.example.": "198.18.0.99"})
	corp := startUpstream(t, map[string]string{"www.corp.example.": "198.18.0.81"})
	nm := testMap()
	nm.DNS.Routes = map[string][]netip.AddrPort{"corp.example": {corp.addr}}
	r := New(Options{Upstreams: fixed(up.addr)})
	r.SetMap(nm)
	for _, tc := range []struct {
		qname  string
		rcode  int
		answer []string
		via    *upstream
	}{
		{"www.example.com.", dns.RcodeSuccess, []string{"198.18.0.80"}, up},
		{"nothere.example.com.", dns.RcodeNameError, nil, up},
		{"www.corp.example.", dns.RcodeSuccess, []string{"198.18.0.81"}, corp},
		{"WWW.Corp.Example.", dns.RcodeSuccess, []string{"198.18.0.81"}, corp},
		{"b.meshd.internal.", dns.RcodeSuccess, []string{"100.64.0.2"}, nil},
	} {
		upBefore, _ := up.seen()
		corpBefore, _ := corp.seen()
		q := query(t, tc.qname, dns.TypeA, 0)
		m := unpack(t, r.Respond(context.Background(), q, false))
		if m.Id != binaryID(q) || m.Rcode != tc.rcode || !slices.Equal(answerText(m), tc.answer) {
			t.Fatalf("%s: id %d rcode %s answer %v; want id %d %s %v", tc.qname, m.Id, dns.RcodeToString[m.Rcode], answerText(m),
				binaryID(q), dns.RcodeToString[tc.rcode], tc.answer)
		}
		upAfter, _ := up.seen()
		corpAfter, _ := corp.seen()
		var gotVia *upstream
		switch {
		case len(upAfter) > len(upBefore) && len(corpAfter) == len(corpBefore):
			gotVia = up
			if upAfter[len(upAfter)-1] == binaryID(q) {
				t.Logf("%s: upstream saw the client's ID (1 in 65536 chance)", tc.qname)
			}
		case len(corpAfter) > len(corpBefore) && len(upAfter) == len(upBefore):
			gotVia = corp
		case len(corpAfter) == len(corpBefore) && len(upAfter) == len(upBefore):
		default:
			t.Fatalf("%s: both servers asked", tc.qname)
		}
		if gotVia != tc.via {
			t.Fatalf("%s: answered via the wrong server", tc.qname)
		}
	}
}

// TestForwardTruncation: a UDP client gets the upstream's answer cut to
// its size with TC; a TCP client gets it whole, the resolver asking the
// upstream again over TCP.
func TestForwardTruncation(t *testing.T) {
	up := startUpstream(t, nil)
	r := New(Options{Upstreams: fixed(up.addr)})
	r.SetMap(testMap())
	for _, tc := range []struct {
		name  string
		edns  uint16
		tcp   bool
		limit int
		tc    bool
	}{
		{"UDP", 0, false, 512, true},
		{"UDP EDNS 1232", 1232, false, 1232, true},
		{"TCP", 0, true, 65535, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := r.Respond(context.Background(), query(t, "big.", dns.TypeTXT, tc.edns), tc.tcp)
			m := unpack(t, b)
			if len(b) > tc.limit || m.Truncated != tc.tc || m.Rcode != dns.RcodeSuccess {
				t.Fatalf("%d bytes TC=%v rcode %s; want at most %d TC=%v", len(b), m.Truncated, dns.RcodeToString[m.Rcode], tc.limit, tc.tc)
			}
			if tc.tcp {
				if len(m.Answer) != 60 {
					t.Fatalf("%d records over TCP, want 60", len(m.Answer))
				}
				if _, nets := up.seen(); nets[len(nets)-1] != "tcp" {
					t.Fatalf("upstream asked over %v", nets)
				}
			}
		})
	}
}

// TestForwardDeadUpstream: a silent first upstream costs its share of the
// timeout, then the next answers; with only silent ones the client gets
// SERVFAIL when the timeout ends.
func TestForwardDeadUpstream(t *testing.T) {
	up := startUpstream(t, map[string]string{"www.example.com.": "198.18.0.80"})
	dead := silent(t)
	r := New(Options{Upstreams: fixed(dead, up.addr), Timeout: 2 * time.Second})
	m := unpack(t, r.Respond(context.Background(), query(t, "www.example.com.", dns.TypeA, 0), false))
	if m.Rcode != dns.RcodeSuccess || !slices.Equal(answerText(m), []string{"198.18.0.80"}) {
		t.Fatalf("dead then live upstream: %s %v", dns.RcodeToString[m.Rcode], answerText(m))
	}
	r = New(Options{Upstreams: fixed(dead), Timeout: 300 * time.Millisecond})
	start := time.Now()
	m = unpack(t, r.Respond(context.Background(), query(t, "www.example.com.", dns.TypeA, 0), false))
	if m.Rcode != dns.RcodeServerFailure {
		t.Fatalf("only a dead upstream: %s", dns.RcodeToString[m.Rcode])
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("gave up after %v, timeout 300ms", d)
	}
}

// TestForwardIgnoresMismatchedAnswers: a datagram with another ID or
// another question (a late answer, a forgery from the upstream's address)
// is skipped; the matching one is relayed with the client's ID.
func TestForwardIgnoresMismatchedAnswers(t *testing.T) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	go func() {
		buf := make([]byte, 2048)
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return
		}
		q := new(dns.Msg)
		if q.Unpack(buf[:n]) != nil {
			return
		}
		send := func(id uint16, name, ip string) {
			m := new(dns.Msg).SetReply(q)
			m.Id = id
			m.Question[0].Name = name
			m.Answer = []dns.RR{&dns.A{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.ParseIP(ip)}}
			b, _ := m.Pack()
			pc.WriteTo(b, from)
		}
		send(q.Id+1, q.Question[0].Name, "198.18.6.6") // wrong ID
		send(q.Id, "evil.example.com.", "198.18.6.7")  // wrong question
		send(q.Id, q.Question[0].Name, "198.18.0.80")  // the answer
	}()
	r := New(Options{Upstreams: fixed(pc.LocalAddr().(*net.UDPAddr).AddrPort())})
	q := query(t, "www.example.com.", dns.TypeA, 0)
	m := unpack(t, r.Respond(context.Background(), q, false))
	if m.Id != binaryID(q) || !slices.Equal(answerText(m), []string{"198.18.0.80"}) {
		t.Fatalf("id %d answer %v; want id %d and the matching answer", m.Id, answerText(m), binaryID(q))
	}
}

// TestForwardsBounded: with every forward slot held by a query to a
// silent upstream, the next forward gets SERVFAIL at once (no socket, no
// waiting), while tailnet names are still answered.
func TestForwardsBounded(t *testing.T) {
	r := New(Options{Upstreams: fixed(silent(t)), MaxForwards: 2, Timeout: time.Minute})
	r.SetMap(testMap())
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var rcodes [2]atomic.Int32
	for i := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rcodes[i].Store(int32(unpack(t, r.Respond(ctx, query(t, fmt.Sprintf("slow%d.example.", i), dns.TypeA, 0), false)).Rcode))
		}()
	}
	for deadline := time.Now().Add(10 * time.Second); len(r.fwd) < 2; {
		if time.Now().After(deadline) {
			t.Fatal("the two forwards never took their slots")
		}
		time.Sleep(time.Millisecond)
	}
	start := time.Now()
	m := unpack(t, r.Respond(context.Background(), query(t, "third.example.", dns.TypeA, 0), false))
	if m.Rcode != dns.RcodeServerFailure || time.Since(start) > time.Second || r.refusedFull.Load() != 1 {
		t.Fatalf("third forward: %s after %v, refused %d", dns.RcodeToString[m.Rcode], time.Since(start), r.refusedFull.Load())
	}
	if m := unpack(t, r.Respond(context.Background(), query(t, "b.meshd.internal.", dns.TypeA, 0), false)); m.Rcode != dns.RcodeSuccess {
		t.Fatalf("tailnet name while forwards are full: %s", dns.RcodeToString[m.Rcode])
	}
	cancel()
	wg.Wait()
	for i := range rcodes {
		if rc := int(rcodes[i].Load()); rc != dns.RcodeServerFailure {
			t.Fatalf("cancelled forward %d: %s", i, dns.RcodeToString[rc])
		}
	}
	if len(r.fwd) != 0 {
		t.Fatalf("%d slots still held", len(r.fwd))
	}
}

// TestServe runs the UDP and TCP servers with a real client, and checks
// the source check: a query from a refused source gets no answer, a TCP
// connection from one is closed at once.
func TestServe(t *testing.T) {
	refused := netip.MustParseAddr("127.0.0.2")
	r := New(Options{Upstreams: fixed()})
	accept := func(a netip.Addr) bool { return a != refused }
	r.SetMap(testMap())
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 2)
	go func() { errc <- r.ServeUDP(ctx, pc, accept) }()
	go func() { errc <- r.ServeTCP(ctx, ln, accept) }()
	for _, tc := range []struct{ net, addr string }{{"udp", pc.LocalAddr().String()}, {"tcp", ln.Addr().String()}} {
		c := &dns.Client{Net: tc.net, Timeout: 5 * time.Second}
		m, _, err := c.Exchange(new(dns.Msg).SetQuestion("b.meshd.internal.", dns.TypeA), tc.addr)
		if err != nil || !slices.Equal(answerText(m), []string{"100.64.0.2"}) {
			t.Fatalf("%s: %v %v", tc.net, m, err)
		}
	}

	// TCP from the refused source: closed without an answer.
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: refused.AsSlice()}}
	tc, err := d.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	tc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := tc.Read(make([]byte, 1)); n != 0 || err == nil || isTimeout(err) {
		t.Fatalf("refused TCP source: read %d, %v; want the connection closed", n, err)
	}
	tc.Close()

	// UDP from the refused source, then from an accepted one: the server
	// reads datagrams in order, so once the second is answered the first
	// was judged; its answer, had it been accepted, would be on its way.
	bad, err := net.DialUDP("udp", &net.UDPAddr{IP: refused.AsSlice()}, pc.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer bad.Close()
	good, err := net.Dial("udp", pc.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer good.Close()
	if _, err := bad.Write(query(t, "b.meshd.internal.", dns.TypeA, 0)); err != nil {
		t.Fatal(err)
	}
	if _, err := good.Write(query(t, "c.meshd.internal.", dns.TypeA, 0)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 2048)
	good.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := good.Read(buf); err != nil {
		t.Fatalf("accepted source: %v", err)
	}
	bad.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	if n, err := bad.Read(buf); err == nil {
		t.Fatalf("refused source answered: %x", buf[:n])
	}
	cancel()
	for range 2 {
		if err := <-errc; err != nil {
			t.Fatalf("serve: %v", err)
		}
	}
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

// TestForwardRetransmits: a query whose datagram (or answer) was lost is
// sent again after udpRetry instead of waiting out the timeout, so the
// client gets the answer, not SERVFAIL.
func TestForwardRetransmits(t *testing.T) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	seen := make(chan int, 4)
	go func() {
		buf := make([]byte, 2048)
		for i := 1; ; i++ {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			seen <- i
			if i == 1 {
				continue // the first copy is lost
			}
			q := new(dns.Msg)
			if q.Unpack(buf[:n]) != nil {
				return
			}
			m := new(dns.Msg).SetReply(q)
			m.Answer = []dns.RR{&dns.A{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.ParseIP("198.18.0.80")}}
			b, _ := m.Pack()
			pc.WriteTo(b, from)
		}
	}()
	r := New(Options{Upstreams: fixed(pc.LocalAddr().(*net.UDPAddr).AddrPort()), Timeout: 5 * time.Second})
	start := time.Now()
	m := unpack(t, r.Respond(context.Background(), query(t, "www.example.com.", dns.TypeA, 0), false))
	if m.Rcode != dns.RcodeSuccess || !slices.Equal(answerText(m), []string{"198.18.0.80"}) {
		t.Fatalf("first datagram lost: %s %v after %v; want the answer from the second", dns.RcodeToString[m.Rcode], answerText(m), time.Since(start))
	}
	if len(seen) != 2 {
		t.Fatalf("upstream saw %d copies of the query; want 2", len(seen))
	}
}
