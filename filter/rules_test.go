package filter

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"meshd.dev/meshd/netmap"
	"meshd.dev/meshd/packet"
)

func pfx(s string) netip.Prefix {
	if !strings.Contains(s, "/") {
		a := netip.MustParseAddr(s)
		return netip.PrefixFrom(a, a.BitLen())
	}
	return netip.MustParsePrefix(s)
}

func pfxs(ss ...string) []netip.Prefix {
	out := make([]netip.Prefix, len(ss))
	for i, s := range ss {
		out[i] = pfx(s)
	}
	return out
}

func dst(net string, first, last uint16) netmap.NetPortRange {
	return netmap.NetPortRange{Net: pfx(net), Ports: netmap.PortRange{First: first, Last: last}}
}

// Addresses of the seed policy used across the tests: ml-engineers reach
// inference on every port and training only on 22 and 8080.
const (
	inference  = "100.64.0.10"
	training   = "100.64.0.20"
	engineer   = "100.64.1.1"
	engineer6  = "fd7a:115c:a1e0::1:1"
	inference6 = "fd7a:115c:a1e0::a"
	outsider   = "100.64.9.9"
	outsider6  = "fd7a:115c:a1e0::9:9"
)

func seedRules(self string) ([]netmap.FilterRule, []netip.Prefix) {
	engineers := pfxs(engineer, "100.64.1.2", engineer6)
	switch self {
	case inference:
		return []netmap.FilterRule{{
			SrcIPs:   engineers,
			DstPorts: []netmap.NetPortRange{dst(inference, 0, 65535), dst(inference6, 0, 65535)},
			Origin:   "policy.hujson:12",
		}}, pfxs(inference, inference6)
	case training:
		return []netmap.FilterRule{{
			SrcIPs:   engineers,
			DstPorts: []netmap.NetPortRange{dst(training, 22, 22), dst(training, 8080, 8080)},
			IPProto:  []uint8{protoTCP},
			Origin:   "policy.hujson:17",
		}}, pfxs(training)
	}
	panic(self)
}

func TestCompileMatch(t *testing.T) {
	rules := []netmap.FilterRule{
		{SrcIPs: pfxs("10.0.0.1"), DstPorts: []netmap.NetPortRange{dst("10.9.0.1", 22, 22)}, Origin: "host"},
		{SrcIPs: pfxs("10.1.0.0/16"), DstPorts: []netmap.NetPortRange{dst("10.9.0.1", 8000, 8999)}, Origin: "range"},
		{SrcIPs: pfxs("0.0.0.0/0", "::/0"), DstPorts: []netmap.NetPortRange{dst("10.9.0.1", 443, 443), dst("fd00::1", 443, 443)}, Origin: "wildcard"},
		{SrcIPs: pfxs("10.2.0.1"), DstPorts: []netmap.NetPortRange{dst("10.9.0.1", 0, 65535)}, IPProto: []uint8{protoUDP}, Origin: "udp-only"},
		{SrcIPs: pfxs("10.3.0.1"), DstPorts: []netmap.NetPortRange{dst("10.9.0.1", 0, 65535)}, IPProto: []uint8{47}, Origin: "gre"},
		{SrcIPs: pfxs("10.3.0.2"), DstPorts: []netmap.NetPortRange{dst("10.9.0.1", 22, 22)}, IPProto: []uint8{47}, Origin: "gre-with-port"},
		{SrcIPs: pfxs("10.4.0.1"), DstPorts: []netmap.NetPortRange{dst("10.9.0.1", 38412, 38412)}, IPProto: []uint8{protoSCTP}, Origin: "sctp"},
		{SrcIPs: pfxs("10.5.0.1"), DstPorts: []netmap.NetPortRange{dst("10.9.0.0/24", 80, 80)}, Origin: "subnet"},
		{SrcIPs: pfxs("10.5.0.2"), DstPorts: []netmap.NetPortRange{dst("10.9.0.7", 80, 80)}, Origin: "host-in-subnet"},
		{SrcIPs: pfxs("fd00::/64"), DstPorts: []netmap.NetPortRange{dst("fd00::1", 5000, 5001)}, Origin: "v6"},
		{SrcIPs: pfxs("10.6.0.1"), DstPorts: []netmap.NetPortRange{dst("10.9.0.1", 9000, 9000)}, IPProto: []uint8{protoTCP, protoTCP}, Origin: "dup-proto"},
		{SrcIPs: nil, DstPorts: []netmap.NetPortRange{dst("10.9.0.1", 0, 65535)}, Origin: "no-sources"},
	}
	r, err := Compile(rules, pfxs("10.9.0.0/24", "fd00::1"))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		proto uint8
		src   string
		dst   string
		port  uint16
		want  string // origin, "" = no match
	}{
		{"host tcp", protoTCP, "10.0.0.1", "10.9.0.1", 22, "host"},
		{"host udp default protos", protoUDP, "10.0.0.1", "10.9.0.1", 22, "host"},
		{"host wrong port", protoTCP, "10.0.0.1", "10.9.0.1", 23, ""},
		{"host wrong src", protoTCP, "10.0.0.2", "10.9.0.1", 22, ""},
		{"host icmp ignores port", protoICMPv4, "10.0.0.1", "10.9.0.1", 0, "host"},
		{"range low edge", protoTCP, "10.1.2.3", "10.9.0.1", 8000, "range"},
		{"range high edge", protoTCP, "10.1.2.3", "10.9.0.1", 8999, "range"},
		{"range past end", protoTCP, "10.1.2.3", "10.9.0.1", 9000, ""},
		{"range before start", protoTCP, "10.1.2.3", "10.9.0.1", 7999, ""},
		{"wildcard v4", protoTCP, "192.0.2.1", "10.9.0.1", 443, "wildcard"},
		{"wildcard v6", protoTCP, "2001:db8::1", "fd00::1", 443, "wildcard"},
		{"udp-only rule udp", protoUDP, "10.2.0.1", "10.9.0.1", 53, "udp-only"},
		{"udp-only rule tcp", protoTCP, "10.2.0.1", "10.9.0.1", 53, ""},
		{"icmp allowed by the wildcard's port 443 rule", protoICMPv4, "10.2.0.1", "10.9.0.1", 0, "wildcard"},
		{"gre all ports", 47, "10.3.0.1", "10.9.0.1", 0, "gre"},
		{"gre rule with port range opens nothing", 47, "10.3.0.2", "10.9.0.1", 0, ""},
		{"sctp", protoSCTP, "10.4.0.1", "10.9.0.1", 38412, "sctp"},
		{"sctp wrong port", protoSCTP, "10.4.0.1", "10.9.0.1", 38413, ""},
		{"sctp not in default protos", protoSCTP, "10.0.0.1", "10.9.0.1", 22, ""},
		{"subnet rule host in it", protoTCP, "10.5.0.1", "10.9.0.7", 80, "subnet"},
		{"nested dst: subnet source reaches host too", protoTCP, "10.5.0.1", "10.9.0.7", 80, "subnet"},
		{"nested dst: host source", protoTCP, "10.5.0.2", "10.9.0.7", 80, "host-in-subnet"},
		{"nested dst: host source other host", protoTCP, "10.5.0.2", "10.9.0.8", 80, ""},
		{"v6 prefix src", protoTCP, "fd00::abcd", "fd00::1", 5001, "v6"},
		{"v6 outside prefix", protoTCP, "fd00:1::1", "fd00::1", 5001, ""},
		{"v6 icmp", protoICMPv6, "fd00::abcd", "fd00::1", 0, "v6"},
		{"duplicate proto", protoTCP, "10.6.0.1", "10.9.0.1", 9000, "dup-proto"},
		{"not local", protoTCP, "10.0.0.1", "10.8.0.1", 22, ""},
		{"v4-mapped src unmapped", protoTCP, "::ffff:10.0.0.1", "10.9.0.1", 22, "host"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := r.Match(tt.proto, netip.MustParseAddr(tt.src), netip.MustParseAddr(tt.dst), tt.port)
			if ok != (tt.want != "") || got != tt.want {
				t.Errorf("Match = %q, %v; want %q", got, ok, tt.want)
			}
		})
	}
	if r.Len() != len(rules) {
		t.Errorf("Len = %d, want %d", r.Len(), len(rules))
	}
}

func TestCompileErrors(t *testing.T) {
	tests := []struct {
		name  string
		rule  netmap.FilterRule
		local []netip.Prefix
		want  string
	}{
		{"invalid source", netmap.FilterRule{SrcIPs: []netip.Prefix{{}}, DstPorts: []netmap.NetPortRange{dst("10.0.0.1", 1, 1)}, Origin: "p:3"}, nil, "rule 0 (p:3): invalid source prefix"},
		{"invalid destination", netmap.FilterRule{SrcIPs: pfxs("10.0.0.1"), DstPorts: []netmap.NetPortRange{{Ports: netmap.AllPorts}}}, nil, "rule 0: invalid destination prefix"},
		{"empty port range", netmap.FilterRule{SrcIPs: pfxs("10.0.0.1"), DstPorts: []netmap.NetPortRange{dst("10.0.0.1", 9, 8)}}, nil, "port range 9-8 is empty"},
		{"invalid local", netmap.FilterRule{}, []netip.Prefix{{}}, "local prefix 0 is invalid"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Compile([]netmap.FilterRule{tt.rule}, tt.local)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want it to mention %q", err, tt.want)
			}
		})
	}
}

// refMatch is the obvious linear matcher the compiled tables must agree
// with.
func refMatch(rules []netmap.FilterRule, proto uint8, src, dst netip.Addr, port uint16) bool {
	for _, r := range rules {
		protos := r.IPProto
		if len(protos) == 0 {
			protos = defaultProtos
		}
		if !slices.Contains(protos, proto) {
			continue
		}
		srcOK := false
		for _, s := range r.SrcIPs {
			if s.Contains(src) {
				srcOK = true
			}
		}
		if !srcOK {
			continue
		}
		for _, d := range r.DstPorts {
			if !d.Net.Contains(dst) {
				continue
			}
			all := d.Ports.First == 0 && d.Ports.Last == 65535
			switch {
			case hasPorts(proto) && d.Ports.First <= port && port <= d.Ports.Last:
				return true
			case proto == protoICMPv4 || proto == protoICMPv6:
				return true
			case !hasPorts(proto) && all:
				return true
			}
		}
	}
	return false
}

func TestCompileAgreesWithReference(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	addr := func() netip.Addr {
		if rng.IntN(4) == 0 {
			return netip.AddrFrom16([16]byte{0xfd, 15: byte(rng.IntN(16))})
		}
		return netip.AddrFrom4([4]byte{10, byte(rng.IntN(2)), byte(rng.IntN(4)), byte(rng.IntN(16))})
	}
	prefix := func() netip.Prefix {
		a := addr()
		bits := a.BitLen() - rng.IntN(6)
		if rng.IntN(10) == 0 {
			bits = rng.IntN(a.BitLen())
		}
		p, _ := a.Prefix(bits)
		return p
	}
	port := func() uint16 { return uint16(rng.IntN(12)) * 1000 }
	protos := []uint8{protoTCP, protoUDP, protoICMPv4, protoICMPv6, protoSCTP, 47}
	for round := range 40 {
		var rules []netmap.FilterRule
		for range 1 + rng.IntN(30) {
			var r netmap.FilterRule
			for range 1 + rng.IntN(4) {
				r.SrcIPs = append(r.SrcIPs, prefix())
			}
			for range 1 + rng.IntN(3) {
				lo, hi := port(), port()
				if lo > hi {
					lo, hi = hi, lo
				}
				if rng.IntN(5) == 0 {
					lo, hi = 0, 65535
				}
				r.DstPorts = append(r.DstPorts, netmap.NetPortRange{Net: prefix(), Ports: netmap.PortRange{First: lo, Last: hi}})
			}
			if rng.IntN(2) == 0 {
				r.IPProto = []uint8{protos[rng.IntN(len(protos))]}
			}
			rules = append(rules, r)
		}
		c, err := Compile(rules, nil)
		if err != nil {
			t.Fatal(err)
		}
		for range 2000 {
			proto := protos[rng.IntN(len(protos))]
			src, dst := addr(), addr()
			p := port() + uint16(rng.IntN(3)) - 1
			want := refMatch(rules, proto, src, dst, p)
			if got := c.allowed(proto, packet.AddrFromNetip(src), packet.AddrFromNetip(dst), p); got != want {
				t.Fatalf("round %d: allowed(%d, %v, %v, %d) = %v, reference says %v\nrules: %+v", round, proto, src, dst, p, got, want, rules)
			}
			i := c.match(proto, packet.AddrFromNetip(src), packet.AddrFromNetip(dst), p)
			if (i >= 0) != want {
				t.Fatalf("round %d: match(%d, %v, %v, %d) = %d, reference says %v", round, proto, src, dst, p, i, want)
			}
			if i >= 0 && !refMatch(rules[i:i+1], proto, src, dst, p) {
				t.Fatalf("round %d: match names rule %d, which does not allow (%d, %v, %v, %d)", round, i, proto, src, dst, p)
			}
		}
	}
}

// More than 256 port intervals take the binary-search path instead of the
// direct port index; both must agree with the reference.
func TestManyPortIntervals(t *testing.T) {
	var rules []netmap.FilterRule
	for i := range 300 {
		rules = append(rules, netmap.FilterRule{
			SrcIPs:   pfxs(fmt.Sprintf("10.0.%d.%d", i/200, i%200)),
			DstPorts: []netmap.NetPortRange{dst("10.9.0.1", uint16(1000+3*i), uint16(1000+3*i+1))},
		})
	}
	r, err := Compile(rules, nil)
	if err != nil {
		t.Fatal(err)
	}
	if pr := r.protos[protoTCP]; pr.byPort != nil || len(pr.cells) <= 256 {
		t.Fatalf("%d cells, byPort=%v: test does not exercise the binary search", len(pr.cells), pr.byPort != nil)
	}
	d := netip.MustParseAddr("10.9.0.1")
	for i := range 300 {
		src := netip.MustParseAddr(fmt.Sprintf("10.0.%d.%d", i/200, i%200))
		for port := uint16(999 + 3*i); port <= uint16(1003+3*i); port++ {
			want := refMatch(rules, protoTCP, src, d, port)
			if _, got := r.Match(protoTCP, src, d, port); got != want {
				t.Fatalf("Match(%v, %d) = %v, want %v", src, port, got, want)
			}
		}
	}
}
