package e2e

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/flowlog"
	"meshd.dev/meshd/internal/netlab"
	"meshd.dev/meshd/internal/promtest"
)

// policyFlowLog lets alice reach the GPU server's iperf3 port and nothing
// else.
const policyFlowLog = `// flow log: alice -> gpu on 5201
{
	"tagOwners": {"tag:gpu": ["alice@example.com"]},
	"grants": [{"src": ["alice@example.com"], "dst": ["tag:gpu"], "ip": ["tcp:5201"]}],
}
`

// TestFlowLogIperf3: in the namespace lab with kernel TUNs, the flow logs
// of both ends of an iperf3 run (real iperf3, its JSON report) count the
// bytes iperf3 moved to within a few percent (the log counts whole IP
// packets, iperf3 payload), with the nodes' identities and the policy rule
// that let the flow in; a connection the policy denies appears on the
// receiver with verdict drop and reason no_rule.
func TestFlowLogIperf3(t *testing.T) {
	if _, err := exec.LookPath("iperf3"); err != nil {
		t.Fatalf("iperf3 not installed (apt-get install iperf3): %v", err)
	}
	t.Parallel()
	lab := netlab.New(t)
	e := &env{t: t, bin: buildMeshd(t), dir: t.TempDir()}
	hosts := lanHosts(lab, "coord", "alice", "gpu")
	e.runCoordinator(hosts["coord"], "198.18.0.1:8443", "alice -> gpu", "--policy", writeTemp(t, "policy.hujson", policyFlowLog))
	logs := map[string]string{}
	nodes := map[string]*node{}
	for name, k := range map[string]string{
		"alice": e.key("--user", "alice@example.com"),
		"gpu":   e.key("--tags", "tag:gpu"),
	} {
		logs[name] = filepath.Join(e.dir, name+"-flows.jsonl")
		n := e.newNode(name, hosts[name], "--tun", "meshd0", "--flow-log", logs[name], "--flow-log-interval", "2s")
		nodes[name] = n
		e.startDaemon(n)
		e.up(n, k)
	}
	e.waitPeers(nodes["alice"], "gpu")
	e.waitPeers(nodes["gpu"], "alice")
	aliceIP, gpuIP := ipv4Of(e.status(nodes["alice"])), ipv4Of(e.status(nodes["gpu"]))

	srv := hosts["gpu"].Start("iperf3", "-s", "-B", gpuIP.String(), "-p", "5201")
	defer srv.Kill()
	var report struct {
		End struct {
			SumSent     struct{ Bytes uint64 } `json:"sum_sent"`
			SumReceived struct{ Bytes uint64 } `json:"sum_received"`
		} `json:"end"`
		Error string `json:"error"`
	}
	waitFor(t, 30*time.Second, "iperf3 run", func() (bool, string) {
		out, err := hosts["alice"].Run("iperf3", "-J", "-c", gpuIP.String(), "-p", "5201", "-t", "3", "--connect-timeout", "3000")
		report.Error = ""
		if jerr := json.Unmarshal([]byte(out), &report); jerr != nil {
			return false, fmt.Sprintf("%v: %v: %.300s", err, jerr, out)
		}
		return err == nil && report.Error == "" && report.End.SumReceived.Bytes > 0, report.Error
	})
	sent, received := report.End.SumSent.Bytes, report.End.SumReceived.Bytes
	t.Logf("iperf3: %d bytes sent, %d received", sent, received)

	// A connection the policy does not allow: the gpu node opening one to
	// alice (nothing grants tag:gpu anything).
	var aliceLn net.Listener
	if err := hosts["alice"].Do(func() (err error) {
		aliceLn, err = net.Listen("tcp", netip.AddrPortFrom(aliceIP, 2222).String())
		return
	}); err != nil {
		t.Fatal(err)
	}
	defer aliceLn.Close()
	if err := hosts["gpu"].Do(func() error {
		c, err := net.DialTimeout("tcp", netip.AddrPortFrom(aliceIP, 2222).String(), time.Second)
		if err == nil {
			c.Close()
			return errors.New("connected")
		}
		return nil
	}); err != nil {
		t.Fatalf("gpu -> alice:2222 was allowed: %v", err)
	}

	// sumIperf adds up what the log at path recorded for connections from
	// alice to gpu:5201 (data and iperf3's control connection).
	type sums struct {
		tx, rx  uint64
		records []flowlog.Record
	}
	sumIperf := func(path, direction string) sums {
		var s sums
		for _, r := range readFlowLog(t, path) {
			if r.Dst == netip.AddrPortFrom(gpuIP, 5201).String() && strings.HasPrefix(r.Src, aliceIP.String()+":") && r.Direction == direction && r.Verdict == "accept" {
				s.tx += r.TxBytes
				s.rx += r.RxBytes
				s.records = append(s.records, r)
			}
		}
		return s
	}
	within := func(logged uint64) bool {
		return logged >= received && float64(logged) <= float64(received)*1.06
	}
	var gpuSums, aliceSums sums
	waitFor(t, 20*time.Second, "flow logs to count the iperf3 bytes", func() (bool, string) {
		gpuSums, aliceSums = sumIperf(logs["gpu"], "in"), sumIperf(logs["alice"], "out")
		return within(gpuSums.tx) && within(aliceSums.tx), fmt.Sprintf("gpu logged %d bytes in, alice %d out; iperf3 received %d", gpuSums.tx, aliceSums.tx, received)
	})
	t.Logf("flow log bytes alice->gpu: gpu %d (%.2f%% over iperf3's payload), alice %d", gpuSums.tx,
		100*(float64(gpuSums.tx)/float64(received)-1), aliceSums.tx)
	r := gpuSums.records[0]
	if r.SrcNode == nil || r.SrcNode.Hostname != "alice" || r.SrcNode.User != "alice@example.com" ||
		r.DstNode == nil || r.DstNode.Hostname != "gpu" || len(r.DstNode.Tags) != 1 || r.DstNode.Tags[0] != "tag:gpu" {
		t.Errorf("gpu's record lacks the identities: %+v src %+v dst %+v", r, r.SrcNode, r.DstNode)
	}
	if !strings.Contains(r.Rule, "policy.hujson:") || r.Proto != "tcp" || r.Start.IsZero() || r.End.Before(r.Start) {
		t.Errorf("gpu's record: %+v", r)
	}

	// The denied connection, on alice (the receiver).
	waitFor(t, 10*time.Second, "the denied connection in alice's flow log", func() (bool, string) {
		for _, r := range readFlowLog(t, logs["alice"]) {
			if r.Dst == netip.AddrPortFrom(aliceIP, 2222).String() && r.Verdict == "drop" {
				ok := r.Reason == "no_rule" && r.Direction == "in" && r.TxPackets >= 1 && r.SrcNode != nil && r.SrcNode.Hostname == "gpu"
				return ok, fmt.Sprintf("%+v", r)
			}
		}
		return false, "no record"
	})

	// The flow log's own counters are in the node's metrics.
	out, err := e.cli(nodes["gpu"], "metrics")
	if err != nil {
		t.Fatalf("meshd metrics: %v\n%s", err, out)
	}
	fams, err := promtest.Parse(strings.NewReader(out))
	if err != nil {
		t.Fatal(err)
	}
	if v, ok := fams.Value("meshd_flowlog_records_written_total"); !ok || v < float64(len(readFlowLog(t, logs["gpu"]))) {
		t.Errorf("meshd_flowlog_records_written_total = %v (%v), want at least the %d records in the log", v, ok, len(readFlowLog(t, logs["gpu"])))
	}
	if _, ok := fams.Value("meshd_flowlog_records_dropped_total"); !ok {
		t.Error("meshd_flowlog_records_dropped_total missing")
	}
}

// readFlowLog parses every line of the flow log at path (missing: none).
func readFlowLog(t *testing.T, path string) []flowlog.Record {
	t.Helper()
	f, err := os.Open(path)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []flowlog.Record
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var r flowlog.Record
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("flow log line %q: %v", sc.Text(), err)
		}
		out = append(out, r)
	}
	return out
}
