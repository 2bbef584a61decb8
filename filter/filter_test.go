package filter

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"meshd.dev/meshd/netmap"
	"meshd.dev/meshd/packet"
)

func seedFilter(t testing.TB, self string, opts Options) *Filter {
	t.Helper()
	rules, local := seedRules(self)
	r, err := Compile(rules, local)
	if err != nil {
		t.Fatal(err)
	}
	f := New(opts)
	f.SetRules(r)
	return f
}

type step struct {
	dir  Direction
	p    pkt
	want Verdict
	wait time.Duration // advance the clock before this packet
}

func runSteps(t *testing.T, f *Filter, steps []step) {
	t.Helper()
	now := time.Now()
	for i, s := range steps {
		now = now.Add(s.wait)
		var got Verdict
		if s.dir == In {
			got = f.Inbound(s.p.build(), now)
		} else {
			got = f.Outbound(s.p.build(), now)
		}
		if got != s.want {
			t.Fatalf("step %d (%s %+v): verdict %v, want %v", i, s.dir, s.p, got, s.want)
		}
	}
}

func TestInboundRules(t *testing.T) {
	tcp := func(src, dst string, port uint16) pkt {
		return pkt{src: src, dst: dst, proto: protoTCP, sport: 40000, dport: port, flags: tcpSYN}
	}
	tests := []struct {
		name string
		self string
		p    pkt
		want Verdict
	}{
		{"inference: engineer any port", inference, tcp(engineer, inference, 5432), Accept},
		{"inference: engineer v6", inference, tcp(engineer6, inference6, 443), Accept},
		{"inference: engineer udp", inference, pkt{src: engineer, dst: inference, proto: protoUDP, sport: 5000, dport: 53}, Accept},
		{"inference: engineer ping", inference, pkt{src: engineer, dst: inference, proto: protoICMPv4, icmpType: 8, icmpID: 7}, Accept},
		{"inference: engineer ping v6", inference, pkt{src: engineer6, dst: inference6, proto: protoICMPv6, icmpType: 128, icmpID: 7}, Accept},
		{"inference: outsider", inference, tcp(outsider, inference, 443), DropNoRule},
		{"inference: outsider v6", inference, tcp(outsider6, inference6, 443), DropNoRule},
		{"inference: outsider ping", inference, pkt{src: outsider, dst: inference, proto: protoICMPv4, icmpType: 8}, DropNoRule},
		{"inference: sctp not in default protos", inference, pkt{src: engineer, dst: inference, proto: protoSCTP, sport: 1, dport: 2}, DropNoRule},
		{"inference: gre not in default protos", inference, pkt{src: engineer, dst: inference, proto: 47, payload: 4}, DropNoRule},
		{"inference: not our address", inference, tcp(engineer, training, 22), DropNotLocal},
		{"training: ssh", training, tcp(engineer, training, 22), Accept},
		{"training: 8080", training, tcp(engineer, training, 8080), Accept},
		{"training: 8081 denied", training, tcp(engineer, training, 8081), DropNoRule},
		{"training: 21 denied", training, tcp(engineer, training, 21), DropNoRule},
		{"training: udp 22 denied (tcp-only rule)", training, pkt{src: engineer, dst: training, proto: protoUDP, sport: 1, dport: 22}, DropNoRule},
		{"training: non-SYN TCP of no flow", training, pkt{src: engineer, dst: training, proto: protoTCP, sport: 22, dport: 40000, flags: tcpACK}, DropNoRule},
		{"training: echo reply of no flow", training, pkt{src: engineer, dst: training, proto: protoICMPv4, icmpType: 0, icmpID: 9}, DropNoRule},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := seedFilter(t, tt.self, Options{})
			if got := f.Inbound(tt.p.build(), time.Now()); got != tt.want {
				t.Fatalf("Inbound = %v, want %v", got, tt.want)
			}
			if tt.want != Accept && f.Dropped(In, tt.want) != 1 {
				t.Errorf("drop counter %v = %d, want 1", tt.want, f.Dropped(In, tt.want))
			}
		})
	}
}

func TestDefaultDeny(t *testing.T) {
	f := New(Options{})
	p := pkt{src: engineer, dst: inference, proto: protoTCP, sport: 1, dport: 22, flags: tcpSYN}
	if v := f.Inbound(p.build(), time.Now()); v != DropNoRule {
		t.Fatalf("no rules installed: %v, want %v", v, DropNoRule)
	}
}

func TestStateful(t *testing.T) {
	// training only accepts engineers on 22/8080; everything below is about
	// flows training itself opens to engineer (and outsider).
	syn := pkt{src: training, dst: outsider, proto: protoTCP, sport: 41000, dport: 443, flags: tcpSYN}
	synack := syn.reply()
	synack.flags = tcpSYN | tcpACK
	ack := synack
	ack.flags = tcpACK
	fin := ack
	fin.flags = tcpFIN | tcpACK
	udp := pkt{src: training, dst: outsider, proto: protoUDP, sport: 5353, dport: 53}
	echo := pkt{src: training, dst: outsider, proto: protoICMPv4, icmpType: 8, icmpID: 77}
	echoReply := pkt{src: outsider, dst: training, proto: protoICMPv4, icmpType: 0, icmpID: 77}
	otherID := echoReply
	otherID.icmpID = 78
	sctp := pkt{src: training, dst: outsider, proto: protoSCTP, sport: 9, dport: 38412}

	tests := []struct {
		name  string
		steps []step
	}{
		{"tcp reply needs the flow", []step{
			{dir: In, p: synack, want: DropNoRule},
			{dir: Out, p: syn, want: Accept},
			{dir: In, p: synack, want: Accept},
			{dir: In, p: ack, want: Accept},
		}},
		{"tcp flow from another port is not the flow", []step{
			{dir: Out, p: syn, want: Accept},
			{dir: In, p: func() pkt { q := ack; q.sport = 444; return q }(), want: DropNoRule},
		}},
		{"tcp flow expires when idle", []step{
			{dir: Out, p: syn, want: Accept},
			{dir: In, p: ack, want: Accept, wait: time.Hour},
			{dir: In, p: ack, want: DropNoRule, wait: 121 * time.Hour},
		}},
		{"tcp after FIN expires quickly", []step{
			{dir: Out, p: syn, want: Accept},
			{dir: In, p: fin, want: Accept},
			{dir: In, p: ack, want: Accept, wait: 10 * time.Second},
			{dir: In, p: ack, want: DropNoRule, wait: 31 * time.Second},
		}},
		{"tcp new SYN reopens a closing flow", []step{
			{dir: Out, p: syn, want: Accept},
			{dir: In, p: fin, want: Accept},
			{dir: Out, p: syn, want: Accept, wait: 20 * time.Second},
			{dir: In, p: ack, want: Accept, wait: 20 * time.Second},
			{dir: In, p: ack, want: Accept, wait: 20 * time.Second},
		}},
		{"tcp picked up at FIN expires quickly", []step{
			{dir: Out, p: func() pkt { q := syn; q.flags = tcpFIN | tcpACK; return q }(), want: Accept},
			{dir: In, p: ack, want: Accept, wait: 10 * time.Second},
			{dir: In, p: ack, want: DropNoRule, wait: 31 * time.Second},
		}},
		{"tcp outbound RST opens nothing", []step{
			{dir: Out, p: func() pkt { q := syn; q.flags = tcpRST; return q }(), want: Accept},
			{dir: In, p: ack, want: DropNoRule},
		}},
		{"udp reply", []step{
			{dir: In, p: udp.reply(), want: DropNoRule},
			{dir: Out, p: udp, want: Accept},
			{dir: In, p: udp.reply(), want: Accept},
			{dir: In, p: udp.reply(), want: Accept, wait: 170 * time.Second},
			{dir: In, p: udp.reply(), want: DropNoRule, wait: 181 * time.Second},
		}},
		{"sctp reply", []step{
			{dir: Out, p: sctp, want: Accept},
			{dir: In, p: sctp.reply(), want: Accept},
		}},
		{"icmp echo reply matches the request id", []step{
			{dir: In, p: echoReply, want: DropNoRule},
			{dir: Out, p: echo, want: Accept},
			{dir: In, p: otherID, want: DropNoRule},
			{dir: In, p: echoReply, want: Accept},
			{dir: In, p: echoReply, want: DropNoRule, wait: 31 * time.Second},
		}},
		{"other protocol (GRE) reply by addresses", []step{
			{dir: In, p: pkt{src: outsider, dst: training, proto: 47, payload: 8}, want: DropNoRule},
			{dir: Out, p: pkt{src: training, dst: outsider, proto: 47, payload: 8}, want: Accept},
			{dir: In, p: pkt{src: outsider, dst: training, proto: 47, payload: 8}, want: Accept},
			{dir: In, p: pkt{src: engineer, dst: training, proto: 47, payload: 8}, want: DropNoRule},
			{dir: In, p: pkt{src: outsider, dst: training, proto: 50, payload: 8}, want: DropNoRule},
			{dir: In, p: pkt{src: outsider, dst: training, proto: 47, payload: 8}, want: DropNoRule, wait: 181 * time.Second},
		}},
		{"icmpv6 echo and udp over v6", []step{
			{dir: In, p: pkt{src: outsider6, dst: "fd7a::20", proto: protoICMPv6, icmpType: 129, icmpID: 5}, want: DropNoRule},
			{dir: Out, p: pkt{src: "fd7a::20", dst: outsider6, proto: protoICMPv6, icmpType: 128, icmpID: 5}, want: Accept},
			{dir: In, p: pkt{src: outsider6, dst: "fd7a::20", proto: protoICMPv6, icmpType: 129, icmpID: 5}, want: Accept},
			{dir: In, p: pkt{src: outsider6, dst: "fd7a::20", proto: protoICMPv6, icmpType: 129, icmpID: 6}, want: DropNoRule},
			{dir: Out, p: pkt{src: "fd7a::20", dst: outsider6, proto: protoUDP, sport: 4000, dport: 443}, want: Accept},
			{dir: In, p: pkt{src: outsider6, dst: "fd7a::20", proto: protoUDP, sport: 443, dport: 4000}, want: Accept},
			{dir: In, p: pkt{src: outsider6, dst: "fd7a::20", proto: protoUDP, sport: 443, dport: 4001}, want: DropNoRule},
		}},
		{"v6 tcp reply", []step{
			{dir: Out, p: pkt{src: "fd7a::20", dst: outsider6, proto: protoTCP, sport: 1, dport: 2, flags: tcpSYN}, want: Accept},
			{dir: In, p: pkt{src: outsider6, dst: "fd7a::20", proto: protoTCP, sport: 2, dport: 1, flags: tcpACK}, want: Accept},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rules, _ := seedRules(training)
			r, err := Compile(rules, pfxs(training, "fd7a::20"))
			if err != nil {
				t.Fatal(err)
			}
			f := New(Options{})
			f.SetRules(r)
			runSteps(t, f, tt.steps)
		})
	}
}

func TestICMPErrors(t *testing.T) {
	flow := pkt{src: training, dst: outsider, proto: protoUDP, sport: 5000, dport: 6000}
	quoted := flow.build()[:28]
	unreach := pkt{src: outsider, dst: training, proto: protoICMPv4, icmpType: 3, icmpCode: 4, quote: quoted}
	unknown := unreach
	unknown.quote = pkt{src: training, dst: outsider, proto: protoUDP, sport: 5001, dport: 6000}.build()[:28]
	notOurs := unreach
	notOurs.quote = pkt{src: outsider, dst: engineer, proto: protoUDP, sport: 5000, dport: 6000}.build()[:28]
	short := unreach
	short.quote = quoted[:20]

	flow6 := pkt{src: "fd7a::20", dst: outsider6, proto: protoTCP, sport: 5000, dport: 443, flags: tcpSYN}
	tooBig := pkt{src: outsider6, dst: "fd7a::20", proto: protoICMPv6, icmpType: 2, quote: flow6.build()[:48]}

	echo := pkt{src: training, dst: outsider, proto: protoICMPv4, icmpType: 8, icmpID: 3}
	echoTimeExceeded := pkt{src: outsider, dst: training, proto: protoICMPv4, icmpType: 11, quote: echo.build()[:28]}

	// Quotes behind an IPv6 fragment header (a first fragment carries the
	// ports), and of a protocol tracked by addresses.
	frag6 := pkt{src: "fd7a::20", dst: outsider6, proto: protoUDP, sport: 7000, dport: 7001, more: true, id: 9, payload: 64}
	fragTooBig := pkt{src: outsider6, dst: "fd7a::20", proto: protoICMPv6, icmpType: 2, quote: frag6.build()[:56]}
	gre := pkt{src: training, dst: outsider, proto: 47, payload: 8}
	greUnreach := pkt{src: outsider, dst: training, proto: protoICMPv4, icmpType: 3, icmpCode: 4, quote: gre.build()[:28]}

	runSteps(t, trainingFilterV6(t), []step{
		{dir: In, p: unreach, want: DropNoRule},
		{dir: Out, p: flow, want: Accept},
		{dir: In, p: unreach, want: Accept},
		{dir: In, p: unknown, want: DropNoRule},
		{dir: In, p: notOurs, want: DropNoRule},
		{dir: In, p: short, want: DropNoRule},
		{dir: In, p: tooBig, want: DropNoRule},
		{dir: Out, p: flow6, want: Accept},
		{dir: In, p: tooBig, want: Accept},
		{dir: Out, p: echo, want: Accept},
		{dir: In, p: echoTimeExceeded, want: Accept},
		{dir: In, p: fragTooBig, want: DropNoRule},
		{dir: Out, p: frag6, want: Accept},
		{dir: In, p: fragTooBig, want: Accept},
		{dir: In, p: greUnreach, want: DropNoRule},
		{dir: Out, p: gre, want: Accept},
		{dir: In, p: greUnreach, want: Accept},
	})
}

func trainingFilterV6(t *testing.T) *Filter {
	rules, _ := seedRules(training)
	r, err := Compile(rules, pfxs(training, "fd7a::20"))
	if err != nil {
		t.Fatal(err)
	}
	f := New(Options{})
	f.SetRules(r)
	return f
}

// A connection that was up before the daemon (re)started is picked up from
// its first outbound packet, as conntrack's loose mode does.
func TestMidFlowPickup(t *testing.T) {
	out := pkt{src: training, dst: outsider, proto: protoTCP, sport: 45000, dport: 29500, flags: tcpACK, payload: 100}
	runSteps(t, seedFilter(t, training, Options{}), []step{
		{dir: In, p: out.reply(), want: DropNoRule},
		{dir: Out, p: out, want: Accept},
		{dir: In, p: out.reply(), want: Accept},
	})
}

// A flow the peer opened under a rule is judged by the rules in force:
// revoking the rule cuts it on the next packet, even though this node keeps
// answering it.
func TestRevocationCutsPeerOpenedFlows(t *testing.T) {
	f := seedFilter(t, training, Options{})
	in := pkt{src: engineer, dst: training, proto: protoTCP, sport: 50000, dport: 22, flags: tcpSYN}
	synack := in.reply()
	synack.flags = tcpSYN | tcpACK
	data := in
	data.flags = tcpACK
	reply := data.reply()
	runSteps(t, f, []step{
		{dir: In, p: in, want: Accept},
		{dir: Out, p: synack, want: Accept},
		{dir: In, p: data, want: Accept},
		{dir: Out, p: reply, want: Accept},
	})
	r, err := Compile(nil, pfxs(training))
	if err != nil {
		t.Fatal(err)
	}
	f.SetRules(r)
	runSteps(t, f, []step{
		{dir: In, p: data, want: DropNoRule},
		{dir: Out, p: reply, want: Accept},
		{dir: In, p: data, want: DropNoRule},
	})

	// Picked up mid-flow while a rule explains it: still the peer's flow.
	f2 := seedFilter(t, training, Options{})
	runSteps(t, f2, []step{{dir: Out, p: reply, want: Accept}})
	f2.SetRules(r)
	runSteps(t, f2, []step{{dir: In, p: data, want: DropNoRule}})
}

// Swapping rules never loses a flow this node opened, and a policy change
// applies to the very next packet.
func TestSwapKeepsFlows(t *testing.T) {
	f := seedFilter(t, training, Options{})
	mine := pkt{src: training, dst: outsider, proto: protoTCP, sport: 45000, dport: 29500, flags: tcpSYN}
	reply := mine.reply()
	reply.flags = tcpACK
	newPort := pkt{src: engineer, dst: training, proto: protoTCP, sport: 1, dport: 9000, flags: tcpSYN}
	runSteps(t, f, []step{
		{dir: Out, p: mine, want: Accept},
		{dir: In, p: newPort, want: DropNoRule},
	})
	rules, local := seedRules(training)
	rules[0].DstPorts = append(rules[0].DstPorts, dst(training, 9000, 9000))
	r, err := Compile(rules, local)
	if err != nil {
		t.Fatal(err)
	}
	f.SetRules(r)
	runSteps(t, f, []step{
		{dir: In, p: newPort, want: Accept},
		{dir: In, p: reply, want: Accept},
	})
}

func TestFragments(t *testing.T) {
	tests := []struct {
		name string
		v6   bool
	}{{"v4", false}, {"v6", true}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src, dstA, out := engineer, training, outsider
			if tt.v6 {
				src, dstA, out = engineer6, "fd7a::20", outsider6
			}
			rules := []netmap.FilterRule{{SrcIPs: pfxs(src), DstPorts: []netmap.NetPortRange{dst(dstA, 22, 22)}}}
			r, err := Compile(rules, pfxs(dstA))
			if err != nil {
				t.Fatal(err)
			}
			f := New(Options{})
			f.SetRules(r)
			first := pkt{src: src, dst: dstA, proto: protoUDP, sport: 1, dport: 22, more: true, id: 0x10203, payload: 64}
			later := pkt{src: src, dst: dstA, proto: protoUDP, fragOff: 72, id: 0x10203, payload: 64}
			last := later
			last.fragOff, last.more = 136, false
			deniedFirst := first
			deniedFirst.dport, deniedFirst.id = 23, 9
			deniedLater := later
			deniedLater.id = 9
			orphan := later
			orphan.id = 4242
			otherSrc := later
			otherSrc.src = out
			tiny := pkt{src: src, dst: dstA, proto: protoTCP, more: true, id: 5}
			tinyBytes := tiny.build()
			// Cut the TCP header short: a first fragment must carry it whole.
			tinyBytes = truncateIP(tinyBytes, 8)
			atomic := pkt{src: src, dst: dstA, proto: protoUDP, sport: 1, dport: 22, id: 6}
			atomic.frag = tt.v6

			runSteps(t, f, []step{
				{dir: In, p: later, want: DropFragment},
				{dir: In, p: first, want: Accept},
				{dir: In, p: later, want: Accept},
				{dir: In, p: last, want: Accept},
				{dir: In, p: orphan, want: DropFragment},
				{dir: In, p: otherSrc, want: DropFragment},
				{dir: In, p: deniedFirst, want: DropNoRule},
				{dir: In, p: deniedLater, want: DropFragment},
				{dir: In, p: atomic, want: Accept},
				{dir: In, p: later, want: DropFragment, wait: 31 * time.Second},
			})
			if v := f.Inbound(tinyBytes, time.Now()); v != DropMalformed {
				t.Errorf("tiny first fragment: %v, want %v", v, DropMalformed)
			}
		})
	}
}

// truncateIP keeps n bytes of payload after the IP header(s) and fixes the
// length field.
func truncateIP(b []byte, n int) []byte {
	if b[0]>>4 == 4 {
		b = b[:20+n]
		b[2], b[3] = byte(len(b)>>8), byte(len(b))
		return b
	}
	hl := 40
	if b[6] == 44 {
		hl = 48
	}
	b = b[:hl+n]
	b[4], b[5] = byte((len(b)-40)>>8), byte(len(b)-40)
	return b
}

func TestMalformed(t *testing.T) {
	good4 := pkt{src: engineer, dst: inference, proto: protoTCP, sport: 1, dport: 22, flags: tcpSYN}.build()
	good6 := pkt{src: engineer6, dst: inference6, proto: protoTCP, sport: 1, dport: 22, flags: tcpSYN}.build()
	mod := func(b []byte, fn func(b []byte) []byte) []byte { return fn(bytes.Clone(b)) }
	withOptions := func(opts ...byte) []byte {
		b := bytes.Clone(good4)
		h := append(bytes.Clone(b[:20]), opts...)
		h[0] = 0x40 | byte(len(h)/4)
		out := append(h, b[20:]...)
		out[2], out[3] = byte(len(out)>>8), byte(len(out))
		return out
	}
	tests := []struct {
		name string
		b    []byte
		want Verdict
	}{
		{"empty", nil, DropMalformed},
		{"version 5", mod(good4, func(b []byte) []byte { b[0] = 0x55; return b }), DropMalformed},
		{"v4 short", good4[:19], DropMalformed},
		{"v4 IHL < 5", mod(good4, func(b []byte) []byte { b[0] = 0x44; return b }), DropMalformed},
		{"v4 IHL past packet", mod(good4, func(b []byte) []byte { b[0] = 0x4f; return b[:40] }), DropMalformed},
		{"v4 total length > buffer", mod(good4, func(b []byte) []byte { b[3]++; return b }), DropMalformed},
		{"v4 total length < IHL", mod(good4, func(b []byte) []byte { b[2], b[3] = 0, 16; return b }), DropMalformed},
		{"v4 total length cuts TCP", mod(good4, func(b []byte) []byte { b[2], b[3] = 0, 30; return b }), DropMalformed},
		{"v4 trailing bytes beyond total length ok", append(bytes.Clone(good4), 0, 0, 0, 0), Accept},
		{"v4 evil bit", mod(good4, func(b []byte) []byte { b[6] |= 0x80; return b }), DropMalformed},
		{"v4 valid options", withOptions(1, 1, 1, 0), Accept},
		{"v4 option length past header", withOptions(7, 9, 0, 0), DropMalformed},
		{"v4 option length < 2", withOptions(7, 1, 0, 0), DropMalformed},
		{"v4 option type without length", withOptions(1, 1, 1, 7), DropMalformed},
		{"v4 fragment past 64k", mod(good4, func(b []byte) []byte { b[6], b[7] = 0x1f, 0xff; return b }), DropMalformed},
		{"tcp data offset < 5", mod(good4, func(b []byte) []byte { b[32] = 0x40; return b }), DropMalformed},
		{"tcp data offset past packet", mod(good4, func(b []byte) []byte { b[32] = 0xf0; return b }), DropMalformed},
		{"udp short", truncateIP(pkt{src: engineer, dst: inference, proto: protoUDP}.build(), 7), DropMalformed},
		{"icmp short", truncateIP(pkt{src: engineer, dst: inference, proto: protoICMPv4, icmpType: 8}.build(), 7), DropMalformed},
		{"udp length > packet", mod(pkt{src: engineer, dst: inference, proto: protoUDP, sport: 1, dport: 2}.build(), func(b []byte) []byte { b[25] = 9; return b }), DropMalformed},
		{"udp length < 8", mod(pkt{src: engineer, dst: inference, proto: protoUDP, sport: 1, dport: 2}.build(), func(b []byte) []byte { b[25] = 7; return b }), DropMalformed},
		{"sctp short", truncateIP(pkt{src: engineer, dst: inference, proto: protoSCTP}.build(), 11), DropMalformed},
		{"v6 short", good6[:39], DropMalformed},
		{"v6 payload length > buffer", mod(good6, func(b []byte) []byte { b[5]++; return b }), DropMalformed},
		{"v6 payload length cuts TCP", mod(good6, func(b []byte) []byte { b[4], b[5] = 0, 10; return b }), DropMalformed},
		{"v6 hop-by-hop", v6ext(good6, 0, 0), Accept},
		{"v6 dest opts then routing type 2", v6ext(v6ext(good6, 43, 2), 60, 0), Accept},
		{"v6 routing type 0", v6ext(good6, 43, 0), DropMalformed},
		{"v6 hop-by-hop not first", v6ext(v6ext(good6, 0, 0), 60, 0), DropMalformed},
		{"v6 too many extension headers", func() []byte {
			b := good6
			for range packet.MaxExtHeaders + 1 {
				b = v6ext(b, 60, 0)
			}
			return b
		}(), DropMalformed},
		{"v6 extension header past packet", mod(v6ext(good6, 60, 0), func(b []byte) []byte { b[41] = 200; return b }), DropMalformed},
		{"v6 two fragment headers", mod(pkt{src: engineer6, dst: inference6, proto: 44, frag: true, payload: 8}.build(), func(b []byte) []byte { b[40] = 44; return b }), DropMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := seedFilter(t, inference, Options{})
			if got := f.Inbound(tt.b, time.Now()); got != tt.want {
				t.Fatalf("Inbound = %v, want %v", got, tt.want)
			}
			wantOut := Accept
			if tt.want == DropMalformed {
				wantOut = DropMalformed
			}
			if got := f.Outbound(tt.b, time.Now()); got != wantOut {
				t.Fatalf("Outbound = %v, want %v", got, wantOut)
			}
		})
	}
}

// v6ext inserts an 8-byte extension header of type nh (routing type rt)
// right after the fixed IPv6 header.
func v6ext(b []byte, nh, rt byte) []byte {
	ext := []byte{b[6], 0, rt, 0, 0, 0, 0, 0}
	out := append(bytes.Clone(b[:40]), ext...)
	out = append(out, b[40:]...)
	out[6] = nh
	n := len(out) - 40
	out[4], out[5] = byte(n>>8), byte(n)
	return out
}

func TestFlowTableBounded(t *testing.T) {
	f := New(Options{MaxFlows: 256, MaxFlowsPerPeer: 64, Shards: 4})
	now := time.Now()
	open := func(peer string, port uint16) pkt {
		p := pkt{src: training, dst: peer, proto: protoUDP, sport: port, dport: 53}
		if f.Outbound(p.build(), now) != Accept {
			t.Fatal("outbound dropped")
		}
		return p
	}
	var victims []pkt
	for i := range 40 {
		victims = append(victims, open(fmt.Sprintf("100.64.2.%d", i), 1000))
	}
	// A noisy peer opens far more flows than its quota.
	for i := range 5000 {
		open(outsider, uint16(2000+i))
	}
	if n := f.Stats().Flows; n > 256 {
		t.Fatalf("flow table holds %d flows, bound is 256", n)
	}
	for _, v := range victims {
		if got := f.Inbound(v.reply().build(), now); got != Accept {
			t.Errorf("flow of %s evicted by a noisy peer: %v", v.dst, got)
		}
	}
	// The noisy peer keeps its most recent flows.
	last := pkt{src: training, dst: outsider, proto: protoUDP, sport: 2000 + 4999, dport: 53}
	if got := f.Inbound(last.reply().build(), now); got != Accept {
		t.Errorf("noisy peer's latest flow: %v", got)
	}

	// Many honest peers filling the table evict the least recently used.
	f2 := New(Options{MaxFlows: 64, Shards: 1})
	first := pkt{src: training, dst: "100.64.3.0", proto: protoUDP, sport: 1, dport: 2}
	f2.Outbound(first.build(), now)
	for i := 1; i <= 64; i++ {
		f2.Outbound(pkt{src: training, dst: fmt.Sprintf("100.64.3.%d", i), proto: protoUDP, sport: 1, dport: 2}.build(), now)
	}
	if got := f2.Inbound(first.reply().build(), now); got != DropNoRule {
		t.Errorf("least recently used flow survived a full table: %v", got)
	}
	if n := f2.Stats().Flows; n != 64 {
		t.Errorf("flows = %d, want 64", n)
	}
}

func TestBatch(t *testing.T) {
	f := seedFilter(t, training, Options{})
	const off = 16
	mk := func(p []byte) []byte { return append(make([]byte, off), p...) }
	okPkt := pkt{src: engineer, dst: training, proto: protoTCP, sport: 1, dport: 22, flags: tcpSYN}
	ok := okPkt.build()
	denied := pkt{src: outsider, dst: training, proto: protoTCP, sport: 1, dport: 22, flags: tcpSYN}.build()
	bufs := [][]byte{mk(ok), mk(denied), mk([]byte{0x45}), mk(ok), {1, 2}}
	want := [][]byte{bufs[0], bufs[3]}
	got := f.InboundBatch(bufs, decoded(make([]packet.Parsed, len(bufs)), bufs, off, nil), off, time.Now())
	if len(got) != 2 || &got[0][0] != &want[0][0] || &got[1][0] != &want[1][0] {
		t.Fatalf("InboundBatch kept %d packets, want the two accepted ones in order", len(got))
	}
	if f.Dropped(In, DropMalformed) != 2 || f.Dropped(In, DropNoRule) != 1 {
		t.Errorf("drops: %+v", f.Stats())
	}

	out := [][]byte{mk(okPkt.bytesReply()), mk([]byte{0x60, 1}), mk(okPkt.bytesReply()), make([]byte, 4)}
	out[0] = append(out[0], 0xff, 0xff) // slack after the packet, as in wireguard-go's buffers
	sizes := []int{len(ok), 2, 0, 100}
	if n := f.OutboundBatch(out, decoded(make([]packet.Parsed, len(out)), out, off, sizes), off, sizes, time.Now()); n != 2 {
		t.Errorf("OutboundBatch dropped %d, want 2", n)
	}
	if sizes[0] != len(ok) || sizes[1] != 0 || sizes[2] != 0 || sizes[3] != 0 {
		t.Errorf("sizes after OutboundBatch = %v", sizes)
	}
}

func (k pkt) bytesReply() []byte { return k.reply().build() }

func TestStatsAndRecentDrops(t *testing.T) {
	var logBuf bytes.Buffer
	f := seedFilter(t, training, Options{
		RecentDrops:  4,
		Logger:       slog.New(slog.NewTextHandler(&logBuf, nil)),
		DropLogEvery: time.Hour,
		DropLogBurst: 2,
	})
	now := time.Now()
	for i := range 10 {
		p := pkt{src: outsider, dst: training, proto: protoTCP, sport: uint16(100 + i), dport: 22, flags: tcpSYN}
		f.Inbound(p.build(), now)
	}
	f.Inbound([]byte{0x45, 0}, now)
	s := f.Stats()
	if s.DropsIn["no_rule"] != 10 || s.DropsIn["malformed"] != 1 || s.Rules != 1 {
		t.Errorf("stats = %+v", s)
	}
	if _, ok := s.DropsOut["fragment"]; !ok {
		t.Errorf("stats omit a reason: %+v", s)
	}
	if _, err := json.Marshal(s); err != nil {
		t.Fatal(err)
	}
	recent := f.RecentDrops()
	if len(recent) != 4 {
		t.Fatalf("RecentDrops kept %d, want 4", len(recent))
	}
	if r := recent[2]; r.Reason != "no_rule" || r.SrcPort != 109 || r.Src != netip.MustParseAddr(outsider) || r.DstPort != 22 || r.Dir != "in" {
		t.Errorf("recent[2] = %+v", r)
	}
	if r := recent[3]; r.Reason != "malformed" || r.Len != 2 {
		t.Errorf("recent[3] = %+v", r)
	}
	if n := strings.Count(logBuf.String(), "packet dropped"); n != 2 {
		t.Errorf("drop log wrote %d lines, want 2 (rate limited):\n%s", n, logBuf.String())
	}
}

func TestZeroAllocs(t *testing.T) {
	f := seedFilter(t, inference, Options{})
	now := time.Now()
	accept := pkt{src: engineer, dst: inference, proto: protoTCP, sport: 1, dport: 22, flags: tcpSYN}.build()
	deny := pkt{src: outsider, dst: inference, proto: protoTCP, sport: 1, dport: 22, flags: tcpSYN}.build()
	out := pkt{src: inference, dst: outsider, proto: protoUDP, sport: 1, dport: 53}
	outB, replyB := out.build(), out.bytesReply()
	newFlow := pkt{src: inference, dst: outsider, proto: protoUDP, dport: 53}
	i := 0
	pp := make([]packet.Parsed, 3)
	cases := map[string]func(){
		"accept":    func() { f.Inbound(accept, now) },
		"deny":      func() { f.Inbound(deny, now) },
		"outbound":  func() { f.Outbound(outB, now) },
		"reply":     func() { f.Inbound(replyB, now) },
		"malformed": func() { f.Inbound(accept[:10], now) },
		"new flows": func() { i++; newFlow.sport = uint16(i); f.Outbound(newFlow.build(), now) },
		"inbound batch": func() {
			bufs := [][]byte{accept, deny, replyB}
			f.InboundBatch(bufs, decoded(pp, bufs, 0, nil), 0, now)
		},
		"outbound batch": func() {
			bufs := [][]byte{outB, outB}
			sizes := []int{len(outB), len(outB)}
			f.OutboundBatch(bufs, decoded(pp, bufs, 0, sizes), 0, sizes, now)
		},
	}
	for name, fn := range cases {
		if name == "new flows" {
			// Building the packet allocates; measure only the filter.
			pkts := make([][]byte, 2000)
			for j := range pkts {
				newFlow.sport = uint16(10000 + j)
				pkts[j] = newFlow.build()
			}
			j := 0
			fn = func() { f.Outbound(pkts[j%len(pkts)], now); j++ }
		}
		if a := testing.AllocsPerRun(1000, fn); a != 0 {
			t.Errorf("%s: %v allocations per packet, want 0", name, a)
		}
	}
}

// Swapping rules while traffic flows: every packet sees either the old or
// the new rules, never a mix, and flows survive (run with -race).
func TestConcurrentSwap(t *testing.T) {
	f := seedFilter(t, training, Options{})
	allow22, local := seedRules(training)
	allow9000 := []netmap.FilterRule{{SrcIPs: allow22[0].SrcIPs, DstPorts: []netmap.NetPortRange{dst(training, 9000, 9000)}}}
	rA, _ := Compile(allow22, local)
	rB, _ := Compile(allow9000, local)
	p22 := pkt{src: engineer, dst: training, proto: protoTCP, sport: 1, dport: 22, flags: tcpSYN}.build()
	p9000 := pkt{src: engineer, dst: training, proto: protoTCP, sport: 1, dport: 9000, flags: tcpSYN}.build()
	mine := pkt{src: training, dst: outsider, proto: protoTCP, sport: 7, dport: 8, flags: tcpSYN}
	f.Outbound(mine.build(), time.Now())
	reply := mine.reply()
	reply.flags = tcpACK
	replyB := reply.build()

	var stop atomic.Bool
	var wg sync.WaitGroup
	errs := make(chan string, 4)
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				bufs := [][]byte{p22, p9000, replyB}
				kept := f.InboundBatch(bufs, decoded(make([]packet.Parsed, 3), bufs, 0, nil), 0, time.Now())
				// One batch, one rule set: exactly one of the two ports
				// and always the reply.
				if len(kept) != 2 || &kept[1][0] != &replyB[0] {
					errs <- fmt.Sprintf("batch kept %d packets", len(kept))
					return
				}
			}
		}()
	}
	for i := range 2000 {
		if i%2 == 0 {
			f.SetRules(rB)
		} else {
			f.SetRules(rA)
		}
	}
	stop.Store(true)
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Fatal(e)
	}
}

// Many goroutines opening, answering and evicting flows in a small table:
// the shards' bookkeeping must hold up (run with -race), and every flow
// still in the table must be one that was opened.
func TestConcurrentFlows(t *testing.T) {
	f := New(Options{MaxFlows: 512, MaxFlowsPerPeer: 256, Shards: 8})
	now := time.Now()
	var wg sync.WaitGroup
	var accepted, opened atomic.Int64
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 3000 {
				peer := fmt.Sprintf("100.64.%d.%d", g, i%50)
				p := pkt{src: training, dst: peer, proto: protoUDP, sport: uint16(1000 + i%700), dport: 53}
				f.Outbound(p.build(), now)
				opened.Add(1)
				if f.Inbound(p.reply().build(), now) == Accept {
					accepted.Add(1)
				}
				// A reply to a flow nobody opened never passes.
				bogus := pkt{src: peer, dst: training, proto: protoUDP, sport: 53, dport: 9}
				if v := f.Inbound(bogus.build(), now); v != DropNoRule {
					t.Errorf("reply of an unopened flow: %v", v)
					return
				}
			}
		}()
	}
	wg.Wait()
	if n := f.Stats().Flows; n > 512 || n == 0 {
		t.Errorf("flows = %d, want 1..512", n)
	}
	// Each reply follows its own flow's creation by one packet; eviction by
	// other goroutines in between is possible but rare.
	if a, o := accepted.Load(), opened.Load(); a < o*9/10 {
		t.Errorf("only %d of %d replies accepted right after their flow opened", a, o)
	}
}

// Inbound packets to a local port this node has opened flows from ask the
// flow table before the rules (an ordering hint). The verdicts, counters
// and drop records must be exactly those of a filter without the hint.
func TestReplyFirstSameVerdicts(t *testing.T) {
	now := time.Now()
	hinted := seedFilter(t, training, Options{})
	plain := seedFilter(t, training, Options{})
	opened := []pkt{
		{src: training, dst: outsider, proto: protoTCP, sport: 22, dport: 80, flags: tcpSYN},
		{src: training, dst: outsider, proto: protoTCP, sport: 40000, dport: 443, flags: tcpSYN},
		{src: training, dst: outsider, proto: protoUDP, sport: 40000, dport: 53},
	}
	for _, f := range []*Filter{hinted, plain} {
		for _, p := range opened {
			if v := f.Outbound(p.build(), now); v != Accept {
				t.Fatalf("outbound %+v: %v", p, v)
			}
		}
	}
	for r := range plain.replyPorts.bits {
		for i := range plain.replyPorts.bits[r] {
			plain.replyPorts.bits[r][i].Store(0)
		}
	}
	if !hinted.replyPorts.has(protoTCP, 22) || !hinted.replyPorts.has(protoUDP, 40000) || hinted.replyPorts.has(protoUDP, 22) {
		t.Fatal("replyPorts does not hold the ports of the flows this node opened")
	}
	ack := func(src string, sport, dport uint16, flags uint8) pkt {
		return pkt{src: src, dst: training, proto: protoTCP, sport: sport, dport: dport, flags: flags}
	}
	for _, tc := range []struct {
		p    pkt
		want Verdict
	}{
		{ack(engineer, 5000, 22, tcpSYN), Accept},          // rule, hinted port
		{ack(engineer, 5000, 22, tcpACK), Accept},          // rule, hinted port
		{ack(outsider, 80, 22, tcpSYN|tcpACK), Accept},     // reply on a service port
		{ack(outsider, 81, 22, tcpACK), DropNoRule},        // no such flow
		{ack(outsider, 5000, 22, tcpSYN), DropNoRule},      // a bare SYN answers nothing
		{ack(outsider, 443, 40000, tcpACK), Accept},        // reply
		{ack(outsider, 443, 40000, tcpACK|tcpFIN), Accept}, // reply, closing
		{ack(outsider, 443, 40001, tcpACK), DropNoRule},    // unhinted port
		{ack(engineer, 443, 40000, tcpACK), DropNoRule},    // hinted port, other peer, no rule
		{pkt{src: outsider, dst: training, proto: protoUDP, sport: 53, dport: 40000}, Accept},
		{pkt{src: outsider, dst: training, proto: protoUDP, sport: 54, dport: 40000}, DropNoRule},
		{pkt{src: engineer, dst: "100.64.0.99", proto: protoTCP, sport: 1, dport: 22, flags: tcpSYN}, DropNotLocal},
	} {
		b := tc.p.build()
		if got, ref := hinted.Inbound(b, now), plain.Inbound(b, now); got != tc.want || ref != tc.want {
			t.Errorf("%+v: hinted %v, plain %v, want %v", tc.p, got, ref, tc.want)
		}
	}
	if h, p := hinted.Stats(), plain.Stats(); fmt.Sprint(h) != fmt.Sprint(p) {
		t.Errorf("stats differ: hinted %+v, plain %+v", h, p)
	}
	if h, p := hinted.RecentDrops(), plain.RecentDrops(); fmt.Sprint(h) != fmt.Sprint(p) || len(h) != 6 {
		t.Errorf("drop records differ or are missing:\nhinted %+v\nplain  %+v", h, p)
	}
}

// A batch remembers the last flow whose reply it let in, so that a GRO
// batch of one flow costs one lookup. The memo must not let another flow's
// packet in, nor a bare SYN on the remembered flow (it answers nothing, and
// no rule lets the peer open connections), and a FIN in the middle of the
// batch must still close the flow.
func TestBatchFlowMemo(t *testing.T) {
	f := seedFilter(t, training, Options{})
	now := time.Now()
	udp := pkt{src: training, dst: outsider, proto: protoUDP, sport: 40000, dport: 53}
	tcp := pkt{src: training, dst: outsider, proto: protoTCP, sport: 40001, dport: 443, flags: tcpSYN}
	for _, p := range []pkt{udp, tcp} {
		f.Outbound(p.build(), now)
	}
	other := udp.reply()
	other.sport = 54 // same hosts and local port, another flow
	ack := tcp.reply()
	ack.flags = tcpACK
	fin := ack
	fin.flags = tcpACK | tcpFIN
	syn := ack
	syn.flags = tcpSYN
	batch := []pkt{udp.reply(), udp.reply(), other, udp.reply(), ack, syn, ack, fin, ack}
	bufs := make([][]byte, len(batch))
	for i, p := range batch {
		bufs[i] = p.build()
	}
	if kept := f.InboundBatch(bufs, decoded(make([]packet.Parsed, len(bufs)), bufs, 0, nil), 0, now); len(kept) != len(batch)-2 {
		t.Fatalf("kept %d of %d packets, want all but the other flow's and the bare SYN", len(kept), len(batch))
	}
	if d := f.RecentDrops(); len(d) != 2 || d[0].SrcPort != 54 || d[1].SrcPort != 443 {
		t.Fatalf("drops %+v, want the other flow's packet and the bare SYN", d)
	}
	// The FIN closed the TCP flow (30 s); the UDP flow lives on (180 s).
	later := now.Add(31 * time.Second)
	if v := f.Inbound(ack.build(), later); v != DropNoRule {
		t.Errorf("TCP reply 31 s after a FIN: %v, want the flow closed", v)
	}
	if v := f.Inbound(udp.reply().build(), later); v != Accept {
		t.Errorf("UDP reply after 31 s: %v", v)
	}
}
