package throughput

import (
	"strings"
	"testing"
)

const (
	iperfTCP = `{"start":{},"intervals":[],"end":{"streams":[],"sum_sent":{"start":0,"end":10.0,"seconds":10.0,"bytes":3500000000,"bits_per_second":2.8e9,"retransmits":12,"sender":true},
"sum_received":{"start":0,"end":10.04,"seconds":10.04,"bytes":3499000000,"bits_per_second":2.788e9,"sender":true},"cpu_utilization_percent":{}}}`
	iperfUDP = `{"end":{"sum":{"seconds":1.000437,"bytes":219123200,"lost_packets":99338,"packets":171190,"sender":true},
"sum_sent":{"seconds":1.000308,"bytes":219123200,"packets":171190,"sender":true},
"sum_received":{"start":0,"end":1.000437,"seconds":1.000437,"bytes":90981120,"bits_per_second":727531028.9,"lost_packets":99338,"packets":170417,"sender":false}}}`
	iperfRefused = `{"start":{"connected":[],"version":"iperf 3.12"},"intervals":[],"end":{},"error":"unable to connect to server: Connection refused"}`
)

func TestParseIperf(t *testing.T) {
	for _, tc := range []struct {
		name    string
		in      string
		bytes   int64
		seconds float64
		err     string
	}{
		{"tcp", iperfTCP, 3499000000, 10.04, ""},
		{"udp receiver totals, not the sender's", iperfUDP, 90981120, 1.000437, ""},
		{"iperf3 error", iperfRefused, 0, 0, "Connection refused"},
		{"no receiver totals", `{"end":{"sum_sent":{"bytes":5,"seconds":1}}}`, 0, 0, "no end.sum_received"},
		{"negative", `{"end":{"sum_received":{"bytes":-5,"seconds":1}}}`, 0, 0, "implausible"},
		{"not JSON", `iperf3: error - unable to connect`, 0, 0, "iperf3 JSON"},
		{"empty", ``, 0, 0, "iperf3 JSON"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseIperf([]byte(tc.in))
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want one containing %q", err, tc.err)
				}
				return
			}
			if err != nil || got.bytes != tc.bytes || got.seconds != tc.seconds {
				t.Fatalf("got %+v, %v; want %d bytes in %v s", got, err, tc.bytes, tc.seconds)
			}
		})
	}
}

func TestParseProcStat(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   string
		want uint64
		err  bool
	}{
		{"plain", "7717 (cat) R 7674 7674 21410 0 -1 4194304 129 0 0 0 25 17 0 0 20 0 1 0 490272 3133440 380", 42, false},
		{"name with spaces and parens", "12 (a) b) c) S 1 12 12 0 -1 4194560 1 0 0 0 300 200 0 0 20 0 9 0 1 2 3", 500, false},
		{"truncated", "12 (meshd) S 1 12 12 0 -1 4194560 1 0 0 0 300", 0, true},
		{"no name", "12 meshd S 1", 0, true},
		{"not a number", "12 (x) S 1 12 12 0 -1 4194560 1 0 0 0 x 200 0", 0, true},
		{"overflow", "12 (x) S 1 12 12 0 -1 4194560 1 0 0 0 18446744073709551615 1 0", 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseProcStat([]byte(tc.in))
			if (err != nil) != tc.err || got != tc.want {
				t.Fatalf("got %d, %v; want %d (error %v)", got, err, tc.want, tc.err)
			}
		})
	}
}

func TestParseCPULine(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   string
		want uint64
		err  bool
	}{
		// user nice system idle iowait irq softirq steal guest guest_nice
		{"busy excludes idle and iowait", "cpu  600 1 100 9000 50 2 30 7 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n", 740, false},
		{"per-CPU line first", "cpu0 1 2 3 4 5 6 7 8\n", 0, true},
		{"short", "cpu 1 2 3\n", 0, true},
		{"junk", "cpu a b c d e f g h\n", 0, true},
		{"empty", "", 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseCPULine([]byte(tc.in))
			if (err != nil) != tc.err || got != tc.want {
				t.Fatalf("got %d, %v; want %d (error %v)", got, err, tc.want, tc.err)
			}
		})
	}
}

func TestPrintTableRatios(t *testing.T) {
	rs := []result{
		{underlay: 1500, setup: "wireguard-go, MTU 1420", test: tcp1, bytes: 2e9, seconds: 8, cpu: 10},
		{underlay: 1500, setup: "meshd kernel TUN + filter, MTU 1420", test: tcp1, bytes: 3e9, seconds: 8, cpu: 12},
		{underlay: 1500, setup: "meshd kernel TUN -> netstack --forward, MTU 1280", test: udp1280, skipped: "TCP only"},
	}
	var b strings.Builder
	printTable(&b, rs)
	out := b.String()
	// 3 GB vs 2 GB in the same time: 1.5x; 4 vs 5 CPU s/GB: 0.8x.
	for _, want := range []string{"| 2.00 Gbit/s | 5.00 |", "| 3.00 Gbit/s | 4.00 |", "| 1.50x, 0.80x |", "n/a: TCP only"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
}

func FuzzParseIperf(f *testing.F) {
	for _, s := range []string{iperfTCP, iperfUDP, iperfRefused, `{"end":{"sum_received":null}}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := parseIperf(b)
		if err == nil && (r.bytes < 0 || r.seconds < 0) {
			t.Fatalf("accepted negative totals: %+v", r)
		}
	})
}

func FuzzParseProcStat(f *testing.F) {
	f.Add([]byte("7717 (cat) R 7674 7674 21410 0 -1 4194304 129 0 0 0 25 17 0 0 20 0 1 0 490272 3133440 380"))
	f.Add([]byte("12 (a) b) c) S 1 12 12 0 -1 4194560 1 0 0 0 300 200 0 0 20 0 9 0 1 2 3"))
	f.Fuzz(func(t *testing.T, b []byte) {
		parseProcStat(b) // must not panic
	})
}

func FuzzParseCPULine(f *testing.F) {
	f.Add([]byte("cpu  626457 0 121286 216627 1648 0 8999 1877 0 0\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		parseCPULine(b) // must not panic
	})
}

// ssRelay is `ss -Htin state established dst 198.18.1.2:8443` on a relayed
// host: the control stream and the DERP connection (trimmed).
const ssRelay = "0      0      198.18.1.1:40312 198.18.1.2:8443\n" +
	"\t cubic wscale:7,7 rto:204 rtt:0.3/0.1 mss:1448 cwnd:10 bytes_sent:10372 bytes_acked:10372 bytes_received:20931 segs_out:40 bbr:(bw:1bps,mrtt:0.031)\n" +
	"0      0      198.18.1.1:40320 198.18.1.2:8443\n" +
	"\t cubic wscale:7,7 rto:204 rtt:0.2/0.1 mss:1448 cwnd:10 bytes_sent:1205433 bytes_acked:1205001 bytes_received:99012 segs_out:900\n"

func TestParseSSInfo(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   string
		want ssInfo
		err  string
	}{
		{"two connections summed", ssRelay, ssInfo{conns: 2, bytesAcked: 1215373, bytesReceived: 119943}, ""},
		{"none", "", ssInfo{}, ""},
		{"connection that moved nothing", "0 0 198.18.1.1:1 198.18.1.2:8443\n\t cubic rto:204 mss:1448\n", ssInfo{conns: 1}, ""},
		{"info before connection", "\t bytes_acked:5\n", ssInfo{}, "before any connection"},
		{"not a number", "0 0 a b\n\t bytes_acked:x\n", ssInfo{}, "not a byte count"},
		{"negative", "0 0 a b\n\t bytes_received:-1\n", ssInfo{}, "not a byte count"},
		{"overflow", "0 0 a b\n\t bytes_acked:9223372036854775807\n0 0 c d\n\t bytes_acked:1\n", ssInfo{}, "overflows"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseSSInfo(tc.in)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want one containing %q", err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

func TestParseRows(t *testing.T) {
	all, err := parseRows("")
	if err != nil || len(all) != len(rowNames) {
		t.Fatalf("empty -rows: %v, %v; want every row", all, err)
	}
	got, err := parseRows("wireguard-go, meshd-derp")
	if err != nil || len(got) != 2 || !got["wireguard-go"] || !got["meshd-derp"] {
		t.Fatalf("two rows: %v, %v", got, err)
	}
	if _, err := parseRows("meshd-auto,meshd derp"); err == nil || !strings.Contains(err.Error(), `unknown row "meshd derp"`) || !strings.Contains(err.Error(), "meshd-derp") {
		t.Fatalf("unknown row: error %v, want it named with the valid rows listed", err)
	}
}

func FuzzParseSSInfo(f *testing.F) {
	f.Add(ssRelay)
	f.Add("0 0 a b\n\t bytes_acked:9223372036854775807\n0 0 c d\n\t bytes_acked:1\n")
	f.Fuzz(func(t *testing.T, s string) {
		st, err := parseSSInfo(s)
		if err == nil && (st.bytesAcked < 0 || st.bytesReceived < 0 || st.conns < 0) {
			t.Fatalf("accepted negative totals: %+v", st)
		}
	})
}
