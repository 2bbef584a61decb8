package filter

import (
	"encoding/json"
	"testing"
	"time"

	"meshd.dev/meshd/netmap"
	"meshd.dev/meshd/packet"
)

// FuzzFilter feeds arbitrary bytes to both directions of a filter with
// rules and flow state: nothing may panic, a packet is malformed exactly
// when packet.Parsed.Decode refuses it (on the way out the only drop),
// a batch reaches the verdicts single packets do, and a packet the rules
// would let in is never dropped.
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
		var p packet.Parsed
		ok := p.Decode(b)
		in := flt.Inbound(b, now)
		if in >= numVerdicts || (!ok && in != DropMalformed) || (ok && in == DropMalformed) {
			t.Fatalf("Inbound = %v (decoded: %v)", in, ok)
		}
		if ok && p.HasPorts && p.Frag == packet.FragNone && r.allows(&p) && in != Accept {
			t.Fatalf("Inbound = %v for a packet the rules allow", in)
		}
		// Inbound creates no flows, so the same packet in a batch (twice)
		// meets the same state.
		bufs := [][]byte{b, b}
		pp := decoded(make([]packet.Parsed, 2), bufs, 0, nil)
		kept := flt.InboundBatch(bufs, pp, 0, now)
		if want := map[bool]int{true: 2, false: 0}[in == Accept]; len(kept) != want {
			t.Fatalf("InboundBatch kept %d of 2, Inbound said %v", len(kept), in)
		}
		if v := flt.Outbound(b, now); (v == DropMalformed) == ok || (ok && v != Accept) {
			t.Fatalf("Outbound = %v (decoded: %v)", v, ok)
		}
		// The reply direction exercises the flow table with whatever
		// addresses and ports the input carries.
		if ok {
			rev := append([]byte(nil), b...)
			if p.Version == 6 {
				copy(rev[8:24], b[24:40])
				copy(rev[24:40], b[8:24])
			} else {
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
							if got := r.allowed(proto, packet.AddrFromNetip(src), packet.AddrFromNetip(dst), port); got != want {
								t.Fatalf("allowed(%d, %v, %v, %d) = %v, reference %v", proto, src, dst, port, got, want)
							}
						}
					}
				}
			}
		}
	})
}
