package resolver

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/miekg/dns"

	"meshd.dev/meshd/netmap"
)

func pfx(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

// node is a map entry with a v4 and (when v6 is non-empty) a v6 address.
func node(id netmap.NodeID, host, v4, v6 string) *netmap.Node {
	n := &netmap.Node{ID: id, Hostname: host, DNSName: netmap.DNSName(host, "meshd.internal"), Addresses: pfx(v4 + "/32")}
	if v6 != "" {
		n.Addresses = append(n.Addresses, netip.MustParsePrefix(v6+"/128"))
	}
	return n
}

// testMap is what node "self" sees: peers b (v4+v6), c (v4 only) and two
// nodes that both claim "dup" (a map the coordinator never sends). Node
// "hidden" exists in the tailnet but the policy hides it from self, so the
// coordinator leaves it out of the map.
func testMap() *netmap.NetworkMap {
	self := node(1, "self", "100.64.0.1", "fd5e:5a1e:d::6440:1")
	b := node(2, "b", "100.64.0.2", "fd5e:5a1e:d::6440:2")
	c := node(3, "c", "100.64.0.3", "")
	dup1 := node(4, "dup", "100.64.0.4", "")
	dup2 := node(5, "dup", "100.64.0.5", "")
	evil := node(6, "evil", "100.64.0.6", "")
	evil.DNSName = "www.example.com." // not under the suffix: never served
	legacy := node(7, "Legacy", "100.64.0.7", "")
	legacy.DNSName = "" // an older coordinator: the hostname is used
	return &netmap.NetworkMap{
		Self:  *self,
		Peers: map[netmap.NodeID]*netmap.Node{2: b, 3: c, 4: dup1, 5: dup2, 6: evil, 7: legacy},
		DNS: netmap.DNSConfig{Suffix: "meshd.internal", Routes: map[string][]netip.AddrPort{
			"corp.example":      {netip.MustParseAddrPort("127.0.0.1:1")},
			"meshd.internal":    {netip.MustParseAddrPort("127.0.0.1:1")}, // ignored: the suffix is ours
			"sub.corp.example":  {netip.MustParseAddrPort("127.0.0.1:2")},
			"other.corp.exampl": {netip.MustParseAddrPort("127.0.0.1:3")},
		}},
	}
}

// query packs a question; edns > 0 adds an OPT record with that size.
func query(t testing.TB, name string, qtype uint16, edns uint16) []byte {
	t.Helper()
	m := new(dns.Msg).SetQuestion(name, qtype)
	if edns > 0 {
		m.SetEdns0(edns, false)
	}
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func unpack(t testing.TB, b []byte) *dns.Msg {
	t.Helper()
	if b == nil {
		t.Fatal("no answer")
	}
	m := new(dns.Msg)
	if err := m.Unpack(b); err != nil {
		t.Fatalf("answer does not parse: %v", err)
	}
	return m
}

// answerText is the answer section's data, one string per record.
func answerText(m *dns.Msg) []string {
	var out []string
	for _, rr := range m.Answer {
		switch rr := rr.(type) {
		case *dns.A:
			out = append(out, rr.A.String())
		case *dns.AAAA:
			out = append(out, rr.AAAA.String())
		case *dns.PTR:
			out = append(out, rr.Ptr)
		case *dns.SOA:
			out = append(out, "SOA "+rr.Hdr.Name)
		default:
			out = append(out, rr.String())
		}
	}
	return out
}

// noUpstreams is a resolver that must answer everything itself: any
// forward fails with SERVFAIL at once.
func noUpstreams() *Resolver {
	return New(Options{Upstreams: func() []netip.AddrPort { return nil }})
}

func TestTableAnswers(t *testing.T) {
	r := noUpstreams()
	r.SetMap(testMap())
	for _, tc := range []struct {
		name   string
		qname  string
		qtype  uint16
		rcode  int
		answer []string
		// authority: a SOA in the authority section (negative answers).
		authority bool
	}{
		{"peer A", "b.meshd.internal.", dns.TypeA, dns.RcodeSuccess, []string{"100.64.0.2"}, false},
		{"peer AAAA", "b.meshd.internal.", dns.TypeAAAA, dns.RcodeSuccess, []string{"fd5e:5a1e:d::6440:2"}, false},
		{"peer ANY", "b.meshd.internal.", dns.TypeANY, dns.RcodeSuccess, []string{"100.64.0.2", "fd5e:5a1e:d::6440:2"}, false},
		{"self resolves", "self.meshd.internal.", dns.TypeA, dns.RcodeSuccess, []string{"100.64.0.1"}, false},
		{"case-insensitive", "B.MeshD.INTERNAL.", dns.TypeA, dns.RcodeSuccess, []string{"100.64.0.2"}, false},
		{"known name lacking the family: NODATA", "c.meshd.internal.", dns.TypeAAAA, dns.RcodeSuccess, nil, true},
		{"known name, other type: NODATA", "b.meshd.internal.", dns.TypeMX, dns.RcodeSuccess, nil, true},
		{"unknown name under the suffix: NXDOMAIN", "nope.meshd.internal.", dns.TypeA, dns.RcodeNameError, nil, true},
		{"hidden node does not resolve", "hidden.meshd.internal.", dns.TypeA, dns.RcodeNameError, nil, true},
		{"below a node's name: NXDOMAIN", "x.b.meshd.internal.", dns.TypeA, dns.RcodeNameError, nil, true},
		{"ambiguous name refused", "dup.meshd.internal.", dns.TypeA, dns.RcodeServerFailure, nil, false},
		{"name outside the suffix is not served (forwarded)", "www.example.com.", dns.TypeA, dns.RcodeServerFailure, nil, false},
		{"hostname of an old coordinator's node", "legacy.meshd.internal.", dns.TypeA, dns.RcodeSuccess, []string{"100.64.0.7"}, false},
		{"apex SOA", "meshd.internal.", dns.TypeSOA, dns.RcodeSuccess, []string{"SOA meshd.internal."}, false},
		{"apex A: NODATA", "meshd.internal.", dns.TypeA, dns.RcodeSuccess, nil, true},
		{"PTR of a peer", "2.0.64.100.in-addr.arpa.", dns.TypePTR, dns.RcodeSuccess, []string{"b.meshd.internal."}, false},
		{"PTR of a peer, IPv6", "2.0.0.0.0.4.4.6.0.0.0.0.0.0.0.0.0.0.0.0.d.0.0.0.e.1.a.5.e.5.d.f.ip6.arpa.", dns.TypePTR, dns.RcodeSuccess, []string{"b.meshd.internal."}, false},
		{"PTR of an unused tailnet address: NXDOMAIN, not forwarded", "99.0.64.100.in-addr.arpa.", dns.TypePTR, dns.RcodeNameError, nil, false},
		{"PTR of one node holding an ambiguous name", "4.0.64.100.in-addr.arpa.", dns.TypePTR, dns.RcodeSuccess, []string{"dup.meshd.internal."}, false},
		{"PTR outside the tailnet is forwarded", "1.0.0.10.in-addr.arpa.", dns.TypePTR, dns.RcodeServerFailure, nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			q := query(t, tc.qname, tc.qtype, 0)
			m := unpack(t, r.Respond(context.Background(), q, false))
			if m.Id != binaryID(q) || !m.Response {
				t.Fatalf("id %d response %v; want id %d", m.Id, m.Response, binaryID(q))
			}
			if m.Rcode != tc.rcode {
				t.Fatalf("rcode %s, want %s", dns.RcodeToString[m.Rcode], dns.RcodeToString[tc.rcode])
			}
			if got := answerText(m); !slices.Equal(got, tc.answer) {
				t.Fatalf("answer %q, want %q", got, tc.answer)
			}
			if got := len(m.Ns) == 1 && m.Ns[0].Header().Rrtype == dns.TypeSOA; got != tc.authority {
				t.Fatalf("SOA in authority: %v, want %v (%v)", got, tc.authority, m.Ns)
			}
			for _, rr := range m.Answer {
				if rr.Header().Name != tc.qname || rr.Header().Ttl != TTL {
					t.Fatalf("record %v: want owner %q (the query's spelling) and TTL %d", rr, tc.qname, TTL)
				}
			}
		})
	}
}

func binaryID(q []byte) uint16 { return uint16(q[0])<<8 | uint16(q[1]) }

// TestPTRSharedAddressRefused: an address two nodes claim (a map the
// coordinator never sends) names neither.
func TestPTRSharedAddressRefused(t *testing.T) {
	nm := testMap()
	nm.Peers[5].Addresses = pfx("100.64.0.4/32")
	r := noUpstreams()
	r.SetMap(nm)
	m := unpack(t, r.Respond(context.Background(), query(t, "4.0.64.100.in-addr.arpa.", dns.TypePTR, 0), false))
	if m.Rcode != dns.RcodeServerFailure || len(m.Answer) != 0 {
		t.Fatalf("PTR of an address two nodes hold: %s %v", dns.RcodeToString[m.Rcode], m.Answer)
	}
}

// TestSetMapReflectsPolicy: a map without a peer (the policy now hides it)
// stops its name and reverse name at once; a map with it brings them back.
func TestSetMapReflectsPolicy(t *testing.T) {
	r := noUpstreams()
	nm := testMap()
	r.SetMap(nm)
	ask := func() int {
		return unpack(t, r.Respond(context.Background(), query(t, "b.meshd.internal.", dns.TypeA, 0), false)).Rcode
	}
	if rc := ask(); rc != dns.RcodeSuccess {
		t.Fatalf("b before the change: %s", dns.RcodeToString[rc])
	}
	hidden := nm.Clone()
	delete(hidden.Peers, 2)
	r.SetMap(hidden)
	if rc := ask(); rc != dns.RcodeNameError {
		t.Fatalf("b once the policy hides it: %s, want NXDOMAIN", dns.RcodeToString[rc])
	}
	if m := unpack(t, r.Respond(context.Background(), query(t, "2.0.64.100.in-addr.arpa.", dns.TypePTR, 0), false)); m.Rcode != dns.RcodeNameError {
		t.Fatalf("PTR of hidden b: %s %v", dns.RcodeToString[m.Rcode], m.Answer)
	}
	r.SetMap(nm)
	if rc := ask(); rc != dns.RcodeSuccess {
		t.Fatalf("b visible again: %s", dns.RcodeToString[rc])
	}
	// A map without a suffix answers no names (and forwards them).
	none := nm.Clone()
	none.DNS = netmap.DNSConfig{}
	r.SetMap(none)
	if rc := ask(); rc != dns.RcodeServerFailure {
		t.Fatalf("b without a suffix: %s, want a forward (SERVFAIL: no upstreams)", dns.RcodeToString[rc])
	}
}

func TestRoutesLongestMatch(t *testing.T) {
	tab, problems := newTable(testMap())
	if len(problems) != 2 {
		t.Fatalf("problems %q: want the route under the suffix and the name outside it", problems)
	}
	for _, tc := range []struct {
		name string
		want string
	}{
		{"corp.example.", "127.0.0.1:1"},
		{"www.corp.example.", "127.0.0.1:1"},
		{"sub.corp.example.", "127.0.0.1:2"},
		{"a.sub.corp.example.", "127.0.0.1:2"},
		{"xsub.corp.example.", "127.0.0.1:1"},
		{"notcorp.example.", ""},
		{"example.", ""},
		{"b.meshd.internal.", ""},
	} {
		got := ""
		if s := tab.route(tc.name); s != nil {
			got = s[0].String()
		}
		if got != tc.want {
			t.Errorf("route(%q) = %q, want %q", tc.name, got, tc.want)
		}
	}
}

func TestRespondMalformed(t *testing.T) {
	r := noUpstreams()
	r.SetMap(testMap())
	good := query(t, "b.meshd.internal.", dns.TypeA, 0)
	resp := good[:0:0]
	resp = append(resp, good...)
	resp[2] |= 0x80
	twoQ := new(dns.Msg)
	twoQ.Id = 7
	twoQ.Question = []dns.Question{{Name: "b.meshd.internal.", Qtype: dns.TypeA, Qclass: dns.ClassINET}, {Name: "c.meshd.internal.", Qtype: dns.TypeA, Qclass: dns.ClassINET}}
	twoQB, _ := twoQ.Pack()
	notify := new(dns.Msg).SetNotify("meshd.internal.")
	notifyB, _ := notify.Pack()
	badVers := new(dns.Msg).SetQuestion("b.meshd.internal.", dns.TypeA)
	badVers.SetEdns0(1232, false)
	badVers.IsEdns0().SetVersion(1)
	badVersB, _ := badVers.Pack()
	chaos := new(dns.Msg).SetQuestion("b.meshd.internal.", dns.TypeA)
	chaos.Question[0].Qclass = dns.ClassCHAOS
	chaosB, _ := chaos.Pack()
	for _, tc := range []struct {
		name  string
		req   []byte
		rcode int // -1: no answer at all
	}{
		{"empty", nil, -1},
		{"short", good[:11], -1},
		{"a response is never answered", resp, -1},
		{"truncated question", good[:15], dns.RcodeFormatError},
		{"two questions", twoQB, dns.RcodeFormatError},
		{"not a query", notifyB, dns.RcodeNotImplemented},
		{"EDNS version 1", badVersB, dns.RcodeBadVers},
		{"class CHAOS", chaosB, dns.RcodeRefused},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := r.Respond(context.Background(), tc.req, false)
			if tc.rcode < 0 {
				if b != nil {
					t.Fatalf("answered %x", b)
				}
				return
			}
			m := unpack(t, b)
			if m.Id != binaryID(tc.req) || !m.Response || m.Rcode != tc.rcode {
				t.Fatalf("id %d rcode %s; want id %d rcode %s", m.Id, dns.RcodeToString[m.Rcode], binaryID(tc.req), dns.RcodeToString[tc.rcode])
			}
		})
	}
}

// TestTruncation: an answer larger than the client takes is cut with TC
// set, at 512 bytes without EDNS and at the client's EDNS size (at most
// 1232) with it; over TCP it is whole.
func TestTruncation(t *testing.T) {
	nm := testMap()
	big := nm.Peers[2]
	for i := range 60 {
		big.Addresses = append(big.Addresses, netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfd, 0x5e, 0x5a, 0x1e, 0, 0xd, 15: byte(i + 10)}), 128))
	}
	r := noUpstreams()
	r.SetMap(nm)
	for _, tc := range []struct {
		name  string
		edns  uint16
		tcp   bool
		limit int
		tc    bool
	}{
		{"UDP without EDNS", 0, false, 512, true},
		{"UDP with EDNS 1000", 1000, false, 1000, true},
		{"UDP with EDNS 4096 is capped", 4096, false, 1232, true},
		{"TCP", 0, true, 65535, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := r.Respond(context.Background(), query(t, "b.meshd.internal.", dns.TypeAAAA, tc.edns), tc.tcp)
			m := unpack(t, b)
			if len(b) > tc.limit || m.Truncated != tc.tc {
				t.Fatalf("%d bytes TC=%v; want at most %d, TC=%v", len(b), m.Truncated, tc.limit, tc.tc)
			}
			if !tc.tc && len(m.Answer) != 61 {
				t.Fatalf("%d records over TCP, want 61", len(m.Answer))
			}
			if tc.edns > 0 && m.IsEdns0() == nil {
				t.Fatal("EDNS query answered without OPT")
			}
		})
	}
}

func TestUpstreamsFromResolvConf(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "resolv.conf")
	r := New(Options{ResolvConf: path, Self: []netip.Addr{netip.MustParseAddr("100.64.0.1")}})
	if got := r.upstreams(); len(got) != 0 {
		t.Fatalf("missing file: upstreams %v", got)
	}
	conf := "# generated\nsearch meshd.internal\nnameserver 100.100.100.100\nnameserver fd5e:5a1e:d::53\n" +
		"nameserver 100.64.0.1\nnameserver 198.18.0.53\nnameserver   fe80::1%eth0\nnameserver bogus\noptions edns0\nnameserver 0.0.0.0\n"
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	want := []string{"198.18.0.53:53", "[fe80::1%eth0]:53"}
	var got []string
	for _, a := range r.upstreams() {
		got = append(got, a.String())
	}
	if !slices.Equal(got, want) {
		t.Fatalf("upstreams %v, want %v (the resolver's own addresses left out)", got, want)
	}
	// Read at forward time: a changed file is seen without a restart.
	if err := os.WriteFile(path, []byte("nameserver 198.18.0.54\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := r.upstreams(); len(got) != 1 || got[0].String() != "198.18.0.54:53" {
		t.Fatalf("after the file changed: %v", got)
	}
}

func FuzzParseResolvConf(f *testing.F) {
	for _, s := range []string{"nameserver 1.2.3.4\n", "nameserver ::1\nsearch a b\n", "nameserver fe80::1%eth0", "nameserver\n\x00"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, a := range ParseResolvConf(b) {
			if !a.IsValid() || a.Port() != 53 || a.Addr().Is4In6() {
				t.Fatalf("bad nameserver %v from %q", a, b)
			}
			if !strings.Contains(string(b), "nameserver") {
				t.Fatalf("nameserver %v from text without one", a)
			}
		}
	})
}
