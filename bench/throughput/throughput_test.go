//go:build throughput

package throughput

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"meshd.dev/meshd/agent/localapi"
)

var (
	flagDuration  = flag.Duration("duration", 10*time.Second, "length of each iperf3 run")
	flagRepeat    = flag.Int("repeat", 3, "rounds over every row; the table shows each test's median round")
	flagUnderlays = flag.String("underlays", "1500,9000", "underlay MTUs to measure")
	flagWGGo      = flag.String("wireguard-go", "", "stock wireguard-go binary (default: built from the version in go.mod)")
	flagMeshd     = flag.String("meshd", "", "meshd binary to measure (default: built from this tree)")
	flagOut       = flag.String("out", "", "also write the table (Markdown) to this file")
	flagPprofDir  = flag.String("pprof-dir", "", "save Go CPU profiles of both meshd daemons during each TCP 1-stream run into this `directory` (merged, they make cmd/meshd/default.pgo)")
	flagPerfDir   = flag.String("perf-dir", "", "record `perf` CPU profiles of both tunnel ends during each TCP 1-stream run into this directory")
	flagRows      = flag.String("rows", "", "comma-separated `rows` to measure (raw, wireguard-go, meshd-1280, meshd-auto, meshd-netstack, meshd-derp); empty: all")
)

// row is a tunnel to set up on a topology.
type row struct {
	name  string // what -rows selects it by
	start func(t testing.TB, tp *topo, m *mesh) *tunnel
}

// rowsFor is what the lab measures on an underlay MTU: the raw link,
// wireguard-go at the standard overlay MTU (underlay - 80), and meshd at
// the old fixed default 1280, with its automatic MTU (the default, which
// must pick underlay - 80), in netstack mode, and relayed through the
// coordinator's DERP relay with direct UDP blocked. Only the rows named in
// want are returned.
func rowsFor(underlay int, wgBin string, want map[string]bool) []row {
	auto := underlay - 80
	rows := []row{
		{"raw", func(t testing.TB, tp *topo, _ *mesh) *tunnel { return tp.raw() }},
		{"wireguard-go", func(t testing.TB, tp *topo, _ *mesh) *tunnel { return tp.wireguardGo(t, wgBin, auto) }},
	}
	if underlay == 1500 {
		rows = append(rows, row{"meshd-1280", func(t testing.TB, _ *topo, m *mesh) *tunnel { return m.meshd(t, meshdOpts{mtu: 1280}) }})
	}
	rows = append(rows, row{"meshd-auto", func(t testing.TB, _ *topo, m *mesh) *tunnel { return m.meshd(t, meshdOpts{}) }})
	if underlay == 1500 {
		rows = append(rows, row{"meshd-netstack", func(t testing.TB, _ *topo, m *mesh) *tunnel { return m.meshd(t, meshdOpts{mtu: 1280, netstack: true}) }})
	}
	rows = append(rows, row{"meshd-derp", func(t testing.TB, _ *topo, m *mesh) *tunnel { return m.meshd(t, meshdOpts{relay: true}) }})
	return slices.DeleteFunc(rows, func(r row) bool { return !want[r.name] })
}

// TestThroughput is the issue 7 table. Run it with bench/throughput/run.
func TestThroughput(t *testing.T) {
	requireTools(t, "iperf3", "wg")
	var underlays []int
	for _, s := range strings.Split(*flagUnderlays, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 1280 || n > 65535 {
			t.Fatalf("-underlays %q: want MTUs like 1500,9000", *flagUnderlays)
		}
		underlays = append(underlays, n)
	}
	wantRows, err := parseRows(*flagRows)
	if err != nil {
		t.Fatal(err)
	}
	if *flagRepeat < 1 {
		t.Fatal("-repeat must be at least 1")
	}
	if *flagPerfDir != "" {
		if _, err := exec.LookPath("perf"); err != nil {
			t.Fatalf("-perf-dir: %v", err)
		}
		if err := os.MkdirAll(*flagPerfDir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if *flagPprofDir != "" {
		if err := os.MkdirAll(*flagPprofDir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	bin := *flagMeshd
	if bin == "" {
		bin = meshdBinary(t)
	}
	wgBin := wireguardGoBinary(t, *flagWGGo)
	tests := []test{tcp1, tcp4, udp1280, udp8920}
	host, _ := os.Hostname()
	loadStart := loadAvg()
	t.Logf("machine: %s, %s; meshd %s; wireguard-go %s; %v per run, %d rounds; rows %s", host, cpuModel(), bin, wgBin, *flagDuration, *flagRepeat, *flagRows)

	type topoMesh struct {
		tp *topo
		m  *mesh
	}
	labs := map[int]topoMesh{}
	for _, u := range underlays {
		tp := newTopo(t, u)
		labs[u] = topoMesh{tp, tp.startMesh(t, bin, benchPolicy)}
	}
	var rounds [][]result
	for round := range *flagRepeat {
		var results []result
		for _, u := range underlays {
			l := labs[u]
			rws := rowsFor(u, wgBin, wantRows)
			// Odd rounds run the rows in reverse, so no setup always
			// runs first (or right after the raw link): on a shared
			// machine the load drifts within a round.
			order := make([]int, len(rws))
			for i := range order {
				order[i] = i
			}
			if round%2 == 1 {
				slices.Reverse(order)
			}
			perRow := make([][]result, len(rws))
			for _, i := range order {
				rw := rws[i]
				tn := rw.start(t, l.tp, l.m)
				var around func(test) func()
				if *flagPerfDir != "" && round == 0 && len(tn.procs) > 0 {
					prefix := filepath.Join(*flagPerfDir, fmt.Sprintf("%d-%s", u, rw.name))
					around = func(tc test) func() {
						if tc != tcp1 {
							return func() {}
						}
						return startPerf(t, tn, prefix)
					}
				}
				if *flagPprofDir != "" && round == 0 && len(tn.sockets) > 0 {
					prefix := filepath.Join(*flagPprofDir, fmt.Sprintf("%d-%s", u, rw.name))
					around = func(tc test) func() {
						if tc != tcp1 {
							return func() {}
						}
						return startPprof(t, tn, prefix, *flagDuration)
					}
				}
				res := l.tp.measure(t, tn, tests, *flagDuration, around)
				tn.check(t, res)
				tn.stop()
				perRow[i] = res
			}
			for _, res := range perRow {
				results = append(results, res...)
			}
		}
		var b strings.Builder
		printTable(&b, results)
		t.Logf("round %d:\n%s", round+1, b.String())
		rounds = append(rounds, results)
	}
	final := medians(rounds)
	var b strings.Builder
	fmt.Fprintf(&b, "Machine: %s (%d CPUs), %s. iperf3 runs of %v, median of %d rounds. Load average (1/5/15 min) at the start %s, at the end %s.\n\n",
		cpuModel(), runtime.NumCPU(), kernel(), *flagDuration, len(rounds), loadStart, loadAvg())
	printTable(&b, final)
	b.WriteString("\n")
	printGains(&b, final)
	fmt.Print(b.String())
	if *flagOut != "" {
		if err := os.WriteFile(*flagOut, []byte(b.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, r := range final {
		if r.err != nil {
			t.Errorf("%d %s %s: %v", r.underlay, r.setup, r.test.name, r.err)
		}
	}
}

// medians picks, per measurement, the round with the median throughput
// (its CPU figures travel with it). Failed rounds count only if all failed.
func medians(rounds [][]result) []result {
	out := make([]result, len(rounds[0]))
	for i := range rounds[0] {
		var ok []result
		for _, rs := range rounds {
			if i < len(rs) && rs[i].err == nil {
				ok = append(ok, rs[i])
			}
		}
		if len(ok) == 0 {
			out[i] = rounds[0][i]
			continue
		}
		slices.SortFunc(ok, func(a, b result) int {
			if a.gbps() < b.gbps() {
				return -1
			}
			if a.gbps() > b.gbps() {
				return 1
			}
			return 0
		})
		out[i] = ok[len(ok)/2]
	}
	return out
}

// printGains prints the ratios the targets are about.
func printGains(b *strings.Builder, rs []result) {
	line := func(what string, num, den result, okN, okD bool) {
		if okN && okD && den.gbps() > 0 {
			fmt.Fprintf(b, "- %s: %.2fx (%.2f / %.2f Gbit/s)\n", what, num.gbps()/den.gbps(), num.gbps(), den.gbps())
		}
	}
	for _, tc := range []test{tcp1, tcp4} {
		m9, ok9 := find(rs, 9000, "meshd kernel TUN + filter, MTU 8920", tc)
		m12, ok12 := find(rs, 1500, "meshd kernel TUN + filter, MTU 1280", tc)
		m14, ok14 := find(rs, 1500, "meshd kernel TUN + filter, MTU 1420", tc)
		line("meshd MTU 8920 on the 9000 underlay / meshd MTU 1280 on 1500, "+tc.name, m9, m12, ok9, ok12)
		line("meshd MTU 1420 / MTU 1280 on the 1500 underlay (what automatic MTU gains there), "+tc.name, m14, m12, ok14, ok12)
		for _, u := range []int{1500, 9000} {
			label := fmt.Sprintf("%d (auto)", u-80)
			d, okD := find(rs, u, "meshd kernel TUN + filter, DERP relay (TLS), MTU "+label, tc)
			dir, okDir := find(rs, u, "meshd kernel TUN + filter, MTU "+label, tc)
			wg, okWG := find(rs, u, "wireguard-go", tc)
			line(fmt.Sprintf("meshd relayed / meshd direct on the %d underlay, %s", u, tc.name), d, dir, okD, okDir)
			line(fmt.Sprintf("meshd relayed / wireguard-go direct on the %d underlay, %s", u, tc.name), d, wg, okD, okWG)
		}
	}
}

// startPerf records CPU profiles (software cpu-clock: this VM has no
// hardware counters) of the tunnel's processes until the returned func is
// called, then writes a text report next to each profile.
func startPerf(t testing.TB, tn *tunnel, prefix string) func() {
	t.Helper()
	type rec struct {
		cmd  *exec.Cmd
		data string
	}
	var recs []rec
	for i, p := range tn.procs {
		data := fmt.Sprintf("%s-%d.perf.data", prefix, i)
		os.Remove(data) // else perf keeps the last run as .old
		cmd := exec.Command("perf", "record", "-e", "cpu-clock", "-F", "999", "-g", "-p", strconv.Itoa(p.Cmd.Process.Pid), "-o", data)
		if err := cmd.Start(); err != nil {
			t.Logf("perf record: %v", err)
			continue
		}
		recs = append(recs, rec{cmd, data})
	}
	return func() {
		for _, r := range recs {
			r.cmd.Process.Signal(os.Interrupt)
			r.cmd.Wait()
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			out, err := exec.CommandContext(ctx, "perf", "report", "-i", r.data, "--stdio", "--no-children", "--percent-limit", "0.2", "-g", "none", "--sort", "symbol").CombinedOutput()
			cancel()
			if err != nil {
				t.Logf("perf report %s: %v", r.data, err)
			}
			os.WriteFile(strings.TrimSuffix(r.data, ".data")+".txt", out, 0o644)
		}
	}
}

// startPprof takes a Go CPU profile of each meshd daemon of tn over most of
// a run of d, saved as PREFIX-a.pprof and PREFIX-b.pprof; the returned
// function waits for them.
func startPprof(t testing.TB, tn *tunnel, prefix string, d time.Duration) func() {
	t.Helper()
	secs := max(1, int((d-time.Second)/time.Second))
	var wg sync.WaitGroup
	for i, sock := range tn.sockets {
		path := fmt.Sprintf("%s-%c.pprof", prefix, 'a'+i)
		wg.Go(func() {
			var buf bytes.Buffer
			ctx, cancel := context.WithTimeout(context.Background(), d+30*time.Second)
			defer cancel()
			if err := localapi.NewClient(sock).Profile(ctx, "profile", url.Values{"seconds": {strconv.Itoa(secs)}}, &buf); err != nil {
				t.Logf("CPU profile of %s: %v", sock, err)
				return
			}
			if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
				t.Logf("save CPU profile: %v", err)
			}
		})
	}
	return wg.Wait
}

func cpuModel() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "model name"); ok {
			return strings.TrimSpace(strings.TrimLeft(v, "\t :"))
		}
	}
	return "unknown CPU"
}

func loadAvg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

func kernel() string {
	b, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return "Linux " + strings.TrimSpace(string(b))
}
