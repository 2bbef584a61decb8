package agent

import (
	"bufio"
	"context"
	"fmt"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/agent/localapi"
)

// TestPolicyPortChangeEnforced: a policy change that moves a grant to
// another port reaches a running daemon as a filter patch (protocol 4), and
// its data path then admits the new port and drops the old one.
func TestPolicyPortChangeEnforced(t *testing.T) {
	m := newTestMesh(t)
	ctx := context.Background()
	setPort := func(port int) {
		t.Helper()
		pol := fmt.Sprintf(`{"tagOwners": {"tag:test": []}, "grants": [{"src": ["tag:test"], "dst": ["tag:test"], "ip": ["tcp:%d"]}]}`, port)
		if _, err := m.srv.ApplyPolicy(ctx, "ports.hujson", []byte(pol)); err != nil {
			t.Fatal(err)
		}
	}
	setPort(7001)
	a, b := m.join("a"), m.join("b")
	waitStatus(t, a, "a to see b", func(st *localapi.Status) bool { return peerNamed(st, "b") != nil })
	for _, port := range []uint16{7001, 7002} {
		serveEcho(t, b, port)
	}
	if err := echoOnce(a, "b", 7001, 15*time.Second); err != nil {
		t.Fatalf("tcp:7001 under the first policy: %v", err)
	}

	before := patchesSent(t, m)
	setPort(7002)
	deadline := time.Now().Add(15 * time.Second)
	for {
		err := echoOnce(a, "b", 7002, time.Second)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("tcp:7002 never admitted after the change: %v", err)
		}
	}
	if err := echoOnce(a, "b", 7001, 2*time.Second); err == nil {
		t.Fatal("tcp:7001 still admitted after the policy moved the grant to 7002")
	}
	if after := patchesSent(t, m); after < before+2 {
		t.Fatalf("filter patches sent: %d before the change, %d after; want both nodes patched", before, after)
	}
}

// serveEcho echoes on to's tailnet port until the test ends.
func serveEcho(t *testing.T, to *Agent, port uint16) {
	t.Helper()
	ln, err := to.Listen("tcp4", port)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go echoAll(ln)
}

// echoOnce dials name:port from from and checks one echo, within timeout.
func echoOnce(from *Agent, name string, port uint16, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c, err := from.Dial(ctx, "tcp", fmt.Sprintf("%s:%d", name, port))
	if err != nil {
		return err
	}
	defer c.Close()
	if d, ok := ctx.Deadline(); ok {
		c.SetDeadline(d)
	}
	if _, err := c.Write([]byte("hi\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if line != "hi\n" {
		return fmt.Errorf("echo %q", line)
	}
	return nil
}

// patchesSent reads the coordinator's meshd_coordinator_filter_patches_total.
func patchesSent(t *testing.T, m *testMesh) int {
	t.Helper()
	rec := httptest.NewRecorder()
	m.srv.MetricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	for _, l := range strings.Split(rec.Body.String(), "\n") {
		if v, ok := strings.CutPrefix(l, "meshd_coordinator_filter_patches_total "); ok {
			n, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatal(err)
			}
			return int(n)
		}
	}
	t.Fatalf("no meshd_coordinator_filter_patches_total in the metrics:\n%s", rec.Body.String())
	return 0
}
