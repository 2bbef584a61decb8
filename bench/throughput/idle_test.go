//go:build throughput

package throughput

import (
	"context"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/internal/netlab"
)

var (
	flagPeers   = flag.String("peers", "10,1000,10000", "peer counts for the idle daemon (ascending)")
	flagIdle    = flag.Duration("idle", 30*time.Second, "idle window over which CPU and wake-ups are measured")
	flagSettle  = flag.Duration("settle", 10*time.Second, "time after the daemon has its map before the idle window starts")
	flagIdleOut = flag.String("idle-out", "", "also write the idle table (Markdown) to this file")
	flagIdlePro = flag.String("idle-profile", "", "also save each idle daemon's heap and goroutine profiles (meshd debug pprof) in this directory")
)

// TestIdle measures an idle daemon (kernel TUN, filter on) with N peers in
// its map: RSS, CPU and context switches over the idle window. The peers
// are real registrations of machines that never connect (no endpoints), so
// the daemon holds them in its map and WireGuard device but exchanges no
// traffic with them.
func TestIdle(t *testing.T) {
	var counts []int
	for _, s := range strings.Split(*flagPeers, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 1 || (len(counts) > 0 && n <= counts[len(counts)-1]) {
			t.Fatalf("-peers %q: want ascending counts like 10,1000,10000", *flagPeers)
		}
		counts = append(counts, n)
	}
	lab := netlab.New(t)
	coord, node := lab.NewHost("coord"), lab.NewHost("node")
	_, coordAddr := lab.Link(node, coord, netip.MustParsePrefix("198.18.3.0/24"), 1500)
	tp := &topo{lab: lab, a: node, r: coord, rAddr: coordAddr, mtu: 1500, dir: t.TempDir()}
	bin := *flagMeshd
	if bin == "" {
		bin = meshdBinary(t)
	}
	m := tp.startMesh(t, bin, benchPolicy)

	type row struct {
		peers    int
		register time.Duration
		rss, hwm int64
		cpu      float64
		switches uint64
		window   time.Duration
	}
	var rows []row
	have := 0
	var daemon *netlab.Process
	for _, n := range counts {
		start := time.Now()
		k := n - have
		if k > 0 {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
			cmd := coord.Command(ctx, os.Args[0], "-coordinator", m.url, "-authkey", m.authKey, "-n", strconv.Itoa(k), "-prefix", fmt.Sprintf("fake%d", n))
			cmd.Env = append(os.Environ(), helperEnv+"=register")
			out, err := cmd.CombinedOutput()
			cancel()
			if err != nil {
				t.Fatalf("register %d machines: %v\n%s", k, err, out)
			}
			have = n
		}
		reg := time.Since(start)
		t.Logf("%d machines registered (%d in %v)", n, k, reg.Round(time.Millisecond))
		if daemon != nil {
			daemon.Stop(10 * time.Second)
		}
		// A fresh daemon each time: the figure is a daemon that started
		// with n peers, not one that grew to them.
		daemon = m.daemon(t, node, "--tun", "tpm0")
		waitFor(t, 5*time.Minute, fmt.Sprintf("the daemon to have %d peers", n), func() (bool, string) {
			st := m.status(t, node)
			return len(st.Peers) >= n, fmt.Sprintf("%s, %d peers", st.BackendState, len(st.Peers))
		})
		time.Sleep(*flagSettle) // a measurement window, not synchronisation
		pid := daemon.Cmd.Process.Pid
		cpu0, err := procsCPU([]*netlab.Process{daemon})
		if err != nil {
			t.Fatal(err)
		}
		sw0, err := contextSwitches(pid)
		if err != nil {
			t.Fatal(err)
		}
		t0 := time.Now()
		time.Sleep(*flagIdle)
		window := time.Since(t0)
		cpu1, err := procsCPU([]*netlab.Process{daemon})
		if err != nil {
			t.Fatal(err)
		}
		sw1, err := contextSwitches(pid)
		if err != nil {
			t.Fatal(err)
		}
		rss, err := procRSS(pid)
		if err != nil {
			t.Fatal(err)
		}
		hwm, err := procStatusKB(pid, "VmHWM:")
		if err != nil {
			t.Fatal(err)
		}
		if *flagIdlePro != "" {
			for _, prof := range []string{"heap", "goroutine"} {
				out := filepath.Join(*flagIdlePro, fmt.Sprintf("idle-%d-%s.pb.gz", n, prof))
				cmd := exec.Command(bin, "debug", "pprof", "--socket", m.nodes[node].socket, "-o", out, prof)
				if b, err := cmd.CombinedOutput(); err != nil {
					t.Fatalf("%s profile of the idle daemon: %v\n%s", prof, err, b)
				}
			}
		}
		rows = append(rows, row{peers: n, register: reg, rss: rss, hwm: hwm, cpu: cpu1 - cpu0, switches: sw1 - sw0, window: window})
	}
	var b strings.Builder
	fmt.Fprintf(&b, "Idle daemon (kernel TUN, filter on, default automatic MTU), %v window after %v settling; machine: %s; load average at the end %s.\n\n", *flagIdle, *flagSettle, cpuModel(), loadAvg())
	fmt.Fprintln(&b, "| peers in map | VmRSS | VmHWM (peak) | idle CPU | context switches/s | registering the peers took |")
	fmt.Fprintln(&b, "|---:|---:|---:|---:|---:|---:|")
	for _, r := range rows {
		fmt.Fprintf(&b, "| %d | %.1f MB | %.1f MB | %.3f s (%.2f%% of a core) | %.1f | %v |\n", r.peers, float64(r.rss)/1e6, float64(r.hwm)/1e6,
			r.cpu, 100*r.cpu/r.window.Seconds(), float64(r.switches)/r.window.Seconds(), r.register.Round(100*time.Millisecond))
	}
	fmt.Print(b.String())
	if *flagIdleOut != "" {
		if err := os.WriteFile(*flagIdleOut, []byte(b.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
