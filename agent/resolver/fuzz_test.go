package resolver

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// FuzzServe feeds arbitrary bytes to the request path, as a UDP or a TCP
// query: it must never panic, and either stay silent or answer with the
// query's ID, QR set, a message that parses, within the client's size.
// Forwards go to a closed port on loopback (fast errors) and a route to
// one too, so the forwarding path runs without leaving the machine.
func FuzzServe(f *testing.F) {
	// Seeds: testdata/fuzz/FuzzServe (a tailnet name, a PTR, a forward, a
	// routed name, EDNS, a truncated query, a response) plus these.
	for _, s := range []struct {
		name  string
		qtype uint16
		edns  uint16
	}{
		{"b.meshd.internal.", dns.TypeA, 0},
		{"B.MESHD.INTERNAL.", dns.TypeAAAA, 4096},
		{"dup.meshd.internal.", dns.TypeA, 0},
		{"2.0.64.100.in-addr.arpa.", dns.TypePTR, 0},
		{"www.corp.example.", dns.TypeA, 1232},
		{"www.example.com.", dns.TypeA, 0},
	} {
		f.Add(query(f, s.name, s.qtype, s.edns), false)
		f.Add(query(f, s.name, s.qtype, s.edns), true)
	}
	nm := testMap()
	nm.DNS.Routes = map[string][]netip.AddrPort{"corp.example": {netip.MustParseAddrPort("127.0.0.1:1")}}
	r := New(Options{Upstreams: fixed(netip.MustParseAddrPort("127.0.0.1:1")), Timeout: 200 * time.Millisecond})
	r.SetMap(nm)
	f.Fuzz(func(t *testing.T, req []byte, tcp bool) {
		resp := r.Respond(context.Background(), req, tcp)
		if resp == nil {
			return
		}
		if len(req) < 12 {
			t.Fatalf("answered %d bytes", len(req))
		}
		if len(resp) < 12 || resp[0] != req[0] || resp[1] != req[1] || resp[2]&0x80 == 0 {
			t.Fatalf("answer %x to %x: want the query's ID and QR", resp, req)
		}
		if !tcp && len(resp) > udpSize {
			t.Fatalf("%d-byte UDP answer", len(resp))
		}
		if err := new(dns.Msg).Unpack(resp); err != nil {
			t.Fatalf("answer does not parse: %v", err)
		}
	})
}
