package main

import (
	"bytes"
	"context"
	"net/netip"
	"regexp"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/agent/localapi"
)

// TestDemo runs `meshd demo` in-process, as a newcomer would, and checks it
// made every connection it promises.
func TestDemo(t *testing.T) {
	var out, errb bytes.Buffer
	code := run(context.Background(), []string{"demo"}, &out, &errb)
	if code != 0 {
		t.Fatalf("demo exit %d\nstdout:\n%s\nstderr:\n%s", code, out.String(), errb.String())
	}
	for _, want := range []string{
		"derp: embedded relay on https://127.0.0.1:",
		"inference-1 joined with a tag:inference-server key",
		"training-1 joined with a tag:training-cluster key",
		"alice-laptop joined with a alice@example.com key",
		"gpu-spot-1 joined with a tag:inference-server key",
		"policy in force (demo-policy.hujson)",
		"+ group:ml-engineers -> tag:training-cluster:9000 (tcp)  [demo-policy.hujson:13]",
		"training-1's filter allows the dropped flow now (rule demo-policy.hujson:13)",
		"all 6 flows behaved as expected",
		"==> try next",
		"meshd policy explain DIR/demo-policy.hujson --src alice@example.com --dst tag:training-cluster:9000",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("demo output lacks %q:\n%s", want, out.String())
		}
	}
	// Each flow's line is followed by the path its packets took, read from
	// the sending node's status.
	const loopEP = `(127\.0\.0\.1|\[::1\]):\d+`
	// Relayed first or not, ending direct; a flow may also move between
	// the peer's direct addresses (IPv4 to IPv6 on loopback, one CI run).
	const direct = `(via DERP\(coord\), then )?direct ` + loopEP + `(, then direct ` + loopEP + `)*`
	for _, tc := range []struct{ flow, path string }{
		{`alice-laptop -> inference-1:8000`, direct},
		{`training-1 -> inference-1:8000`, direct},
		{`inference-1 -> training-1:9000`, direct},
		// Denied by the policy: the reason is training-1's filter's.
		{`alice-laptop -> training-1:9000 \(engineer pulls a checkpoint: the policy gives engineers SSH only\): denied`,
			`(via DERP\(coord\)|direct ` + loopEP + `)\n\s+denied by training-1's packet filter: no_rule, tcp 100\.64\.\d+\.\d+:\d+ -> 100\.64\.\d+\.\d+:9000 \([1-9]\d* packets dropped\)`},
		// The same flow after the live policy change.
		{`alice-laptop -> training-1:9000 \(the same checkpoint pull, after the change \(64 KiB echo\)\): connected`, direct},
		// The late joiner: its path history, ending direct (relayed first
		// when the status polls caught it before hole punching finished).
		{`(inference-1|training-1|alice-laptop) -> gpu-spot-1:9100`, `(via DERP\(coord\) from \+\S+, then )?direct ` + loopEP + ` from \+\S+`},
	} {
		re := regexp.MustCompile(`\[ok\] ` + tc.flow + `.*\n\s+path: ` + tc.path + `(\s|$)`)
		if !re.MatchString(out.String()) {
			t.Errorf("demo output lacks flow %s with path %s:\n%s", tc.flow, tc.path, out.String())
		}
	}
	if strings.Contains(out.String(), "UNEXPECTED") {
		t.Errorf("demo reported an unexpected flow:\n%s", out.String())
	}
}

func TestWriteStatus(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	recent := now.Add(-10 * time.Second)
	st := &localapi.Status{
		BackendState: localapi.StateRunning,
		Self:         &localapi.Node{ID: 1, Hostname: "alice-laptop", User: "alice@example.com", IPs: []netip.Addr{netip.MustParseAddr("fd5e:5a1e:d::1"), netip.MustParseAddr("100.64.0.3")}, Online: true},
		Peers: []localapi.Peer{
			{Node: localapi.Node{ID: 2, Hostname: "inference-1", Tags: []string{"tag:inference-server"}, IPs: []netip.Addr{netip.MustParseAddr("100.64.0.1")}, Online: true},
				Endpoint: "198.18.0.2:41641", Path: "direct", RxBytes: 10, TxBytes: 20, LastHandshake: &recent, Active: true},
			{Node: localapi.Node{ID: 3, Hostname: "training-1", Tags: []string{"tag:training-cluster"}, IPs: []netip.Addr{netip.MustParseAddr("100.64.0.2")}}, Path: "none"},
		},
	}
	var b bytes.Buffer
	writeStatus(&b, st)
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	if len(lines) != 3 {
		t.Fatalf("want 3 lines:\n%s", b.String())
	}
	for i, want := range [][]string{
		{"100.64.0.3", "alice-laptop", "alice@example.com"},
		{"100.64.0.1", "inference-1", "tag:inference-server", "active; direct 198.18.0.2:41641", "tx 20 rx 10"},
		{"100.64.0.2", "training-1", "tag:training-cluster", "offline"},
	} {
		for _, w := range want {
			if !strings.Contains(lines[i], w) {
				t.Errorf("line %d %q lacks %q", i, lines[i], w)
			}
		}
	}
	b.Reset()
	writeStatus(&b, &localapi.Status{BackendState: localapi.StateNeedsLogin})
	if !strings.Contains(b.String(), "meshd up --authkey") {
		t.Errorf("logged-out status does not say what to do: %q", b.String())
	}
}

func TestFindNode(t *testing.T) {
	st := &localapi.Status{
		Self: &localapi.Node{ID: 1, Hostname: "me", IPs: []netip.Addr{netip.MustParseAddr("100.64.0.1")}},
		Peers: []localapi.Peer{
			{Node: localapi.Node{ID: 7, Hostname: "Inference-1", IPs: []netip.Addr{netip.MustParseAddr("100.64.0.7"), netip.MustParseAddr("fd5e:5a1e:d::7")}}},
			// Two nodes named gpu (a coordinator that does not keep names
			// unique): the name names neither.
			{Node: localapi.Node{ID: 8, Hostname: "gpu", IPs: []netip.Addr{netip.MustParseAddr("100.64.0.8")}}},
			{Node: localapi.Node{ID: 9, Hostname: "GPU", IPs: []netip.Addr{netip.MustParseAddr("100.64.0.9")}}},
		},
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, "me"},
		{[]string{"inference-1"}, "Inference-1"},
		{[]string{"7"}, "Inference-1"},
		{[]string{"fd5e:5a1e:d::7"}, "Inference-1"},
		{[]string{"100.64.0.1"}, "me"},
		{[]string{"nobody"}, ""},
		{[]string{"gpu"}, ""},
		{[]string{"9"}, "GPU"},
		{[]string{"100.64.0.8"}, "gpu"},
	} {
		n, err := findNode(st, tc.args)
		if tc.want == "" {
			if err == nil {
				t.Errorf("findNode(%v) = %v, want error", tc.args, n.Hostname)
			} else if tc.args[0] == "gpu" && !strings.Contains(err.Error(), "gpu (node 8), GPU (node 9)") {
				t.Errorf("ambiguous name: %v, want both candidates named", err)
			}
			continue
		}
		if err != nil || n.Hostname != tc.want {
			t.Errorf("findNode(%v) = %v, %v; want %s", tc.args, n, err, tc.want)
		}
	}
}
