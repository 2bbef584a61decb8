package filter

import (
	"encoding/json"
	"testing"
	"time"

	"meshd.dev/meshd/netmap"
)

// FuzzFilter feeds arbitrary bytes to the parser and to both directions of
// a filter with rules and flow state: nothing may panic, the parser must
// stay inside the buffer, and a packet is malformed on the way out exactly
// when the parser rejects it.
func FuzzFilter(f *testing.F) {
	for _, p := range []pkt{
		{src: engineer, dst: inference, proto: protoTCP, sport: 40000, dport: 22, flags: tcpSYN},
		{src: engineer6, dst: inference6, proto: protoUDP, sport: 5000, dport: 53, payload: 4},
		{src: engineer, dst: inference, proto: protoICMPv4, icmpType: 8, icmpID: 1},
		{src: engineer, dst: inference, proto: protoICMPv4, icmpType: 3, quote: pkt{src: inference, dst: engineer, proto: protoUDP, sport: 1, dport: 2}.build()[:28]},
		{src: engineer6, dst: inference6, proto: protoICMPv6, icmpType: 2, quote: pkt{src: inference6, dst: engineer6, proto: protoTCP, sport: 1, dport: 2}.build()[:48]},
		{src: engineer, dst: inference, proto: protoUDP, sport: 1, dport: 2, more: true, id: 7, payload: 16},
		{src: engineer6, dst: inference6, proto: protoUDP, fragOff: 24, id: 7, payload: 16},
		{src: engineer, dst: inference, proto: protoSCTP, sport: 1, dport: 38412},
		{src: engineer, dst: inference, proto: 47, payload: 8},
	} {
		f.Add(p.build())
	}
	rules, local := seedRules(inference)
	r, err := Compile(rules, local)
	if err != nil {
		f.Fatal(err)
	}
	flt := New(Options{MaxFlows: 1024, MaxFragments: 64})
	flt.SetRules(r)
	now := time.Now()
	f.Fuzz(func(t *testing.T, b []byte) {
		var p packet
		ok := parse(b, &p)
		if ok && (p.end > len(b) || p.l4 > p.end || p.end < 20) {
			t.Fatalf("parse accepted with end=%d l4=%d for %d bytes", p.end, p.l4, len(b))
		}
		if ok && p.isICMP() {
			var q packet
			parseQuoted(p.icmpMsg, p.v6, &q)
		}
		// The outbound fast path's shape check: only whole packets with
		// ports, where its transport header is.
		if l4 := fastShape(b); l4 != 0 && (!ok || !p.ports || p.frag != fragNone || p.l4 != l4) {
			t.Fatalf("fastShape = %d for a packet the parser calls ok=%v ports=%v frag=%d l4=%d", l4, ok, p.ports, p.frag, p.l4)
		}
		// The fast path may only judge packets the full parser accepts
		// whole, with ports.
		// When it judges, it must agree with the rules as the full path
		// asks them.
		if res, l4, _ := r.fastAccept(b, nil); res != fastUnjudged && l4 != fastShape(b) {
			t.Fatalf("fastAccept's transport offset %d, fastShape's %d", l4, fastShape(b))
		}
		if res, _, _ := r.fastAccept(b, nil); res == fastAllow || res == fastDeny {
			accept := res == fastAllow
			if !ok || !p.ports || p.frag != fragNone {
				t.Fatalf("fast path judged a packet the parser calls ok=%v ports=%v frag=%d", ok, p.ports, p.frag)
			}
			if want := r.match(p.proto, p.src, p.dst, p.dstPort) >= 0; accept != want {
				t.Fatalf("fast path says %v, rules say %v", accept, want)
			}
			// Fast route (rules and flow from the bytes) and full route
			// must reach the same verdict, flow state included.
			c := clock{now: now, base: &flt.base}
			full, fast := flt.inFull(r, b, &c, false), flt.Inbound(b, now)
			if full != fast {
				t.Fatalf("full path %v, fast path %v", full, fast)
			}
			// A drop is recorded alike by both (the fast path does not
			// parse the packet again for its record).
			if d := flt.RecentDrops(); full != Accept && (len(d) < 2 || d[len(d)-1] != d[len(d)-2]) {
				t.Fatalf("drop records differ: full path %+v, fast path %+v", d[len(d)-2], d[len(d)-1])
			}
		}
		if v := flt.Inbound(b, now); v >= numVerdicts || (!ok && v != DropMalformed) {
			t.Fatalf("Inbound = %v (parsed: %v)", v, ok)
		}
		if v := flt.Outbound(b, now); (v == DropMalformed) == ok || (ok && v != Accept) {
			t.Fatalf("Outbound = %v (parsed: %v)", v, ok)
		}
		bufs := [][]byte{b, b}
		if kept := flt.InboundBatch(bufs, 0, now); len(kept) > 2 {
			t.Fatalf("InboundBatch returned %d packets of 2", len(kept))
		}
		// The reply direction exercises the flow table with whatever
		// addresses and ports the input carries.
		if ok && len(b) >= 20 {
			rev := append([]byte(nil), b...)
			if p.v6 && len(rev) >= 40 {
				copy(rev[8:24], b[24:40])
				copy(rev[24:40], b[8:24])
			} else if !p.v6 {
				copy(rev[12:16], b[16:20])
				copy(rev[16:20], b[12:16])
			}
			flt.Inbound(rev, now)
		}
	})
}

// FuzzCompile feeds arbitrary packet-filter JSON, as it arrives in a map
// response, to Compile: it must never panic, and whatever it compiles must
// answer like the reference matcher.
func FuzzCompile(f *testing.F) {
	f.Add([]byte(`[{"src_ips":["100.64.1.1/32","fd7a:115c:a1e0::1:1/128"],"dst_ports":[{"net":"100.64.0.10/32","ports":{"first":0,"last":65535}}],"origin":"policy.hujson:12"}]`))
	f.Add([]byte(`[{"src_ips":["100.64.1.0/24"],"dst_ports":[{"net":"100.64.0.20/32","ports":{"first":22,"last":22}},{"net":"100.64.0.20/32","ports":{"first":8080,"last":8080}}],"ip_proto":[6]}]`))
	f.Add([]byte(`[{"src_ips":["0.0.0.0/0","::/0"],"dst_ports":[{"net":"10.0.0.0/8","ports":{"first":9000,"last":8000}}]}]`))
	f.Add([]byte(`[{"src_ips":["10.0.0.1/32"],"dst_ports":[{"net":"10.9.0.0/24","ports":{"first":0,"last":65535}}],"ip_proto":[47,132,1,58]}]`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var rules []netmap.FilterRule
		if json.Unmarshal(data, &rules) != nil {
			return
		}
		r, err := Compile(rules, nil)
		if err != nil {
			return
		}
		// Probe with addresses and ports taken from the rules themselves.
		for _, rule := range rules {
			for _, s := range rule.SrcIPs {
				for _, d := range rule.DstPorts {
					if !s.IsValid() || !d.Net.IsValid() {
						continue
					}
					for _, proto := range []uint8{protoTCP, protoUDP, protoICMPv4, protoSCTP, 47} {
						for _, port := range []uint16{d.Ports.First, d.Ports.Last, d.Ports.Last + 1} {
							src, dst := s.Addr(), d.Net.Addr()
							want := refMatch(rules, proto, src.Unmap(), dst.Unmap(), port)
							if got := r.allowed(proto, fromNetip(src), fromNetip(dst), port); got != want {
								t.Fatalf("allowed(%d, %v, %v, %d) = %v, reference %v", proto, src, dst, port, got, want)
							}
						}
					}
				}
			}
		}
	})
}
