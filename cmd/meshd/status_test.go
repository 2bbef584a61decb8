package main

import (
	"bytes"
	"net/netip"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/agent/localapi"
)

// TestWriteStatusMTUProblem: a peer whose direct path drops full-size
// packets gets a warning line that names it, the size that gets through,
// the overlay MTU and the fixes; peers without a problem get none.
func TestWriteStatusMTUProblem(t *testing.T) {
	now := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	hs := now.Add(-10 * time.Second)
	peer := func(name, ip string, pathMTU int, problem bool) localapi.Peer {
		return localapi.Peer{
			Node: localapi.Node{Hostname: name, IPs: []netip.Addr{netip.MustParseAddr(ip)}, Tags: []string{"tag:gpu"}, Online: true},
			Path: "direct", Endpoint: "198.18.2.2:41641", LastHandshake: &hs,
			PathMTU: pathMTU, MTUProblem: problem, OverlayMTU: 8920,
		}
	}
	for _, tt := range []struct {
		name  string
		peers []localapi.Peer
		want  []string
	}{
		{"blackhole", []localapi.Peer{peer("gpu-1", "100.64.0.2", 8920, false), peer("gpu-2", "100.64.0.3", 1420, true)},
			[]string{"# warning: peer gpu-2: direct path drops packets over 1420 bytes (overlay MTU 8920; TCP to it is clamped, larger packets are answered with ICMP packet-too-big): run `meshd daemon --mtu 1420`, or allow ICMP fragmentation-needed on the path"}},
		{"nothing gets through", []localapi.Peer{peer("gpu-3", "100.64.0.4", 0, true)},
			[]string{"# warning: peer gpu-3: direct path drops even 1280-byte packets (overlay MTU 8920)"}},
		{"clean", []localapi.Peer{peer("gpu-1", "100.64.0.2", 8920, false)}, nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			st := &localapi.Status{
				BackendState: localapi.StateRunning,
				Self:         &localapi.Node{Hostname: "gpu-0", IPs: []netip.Addr{netip.MustParseAddr("100.64.0.1")}, Online: true},
				Peers:        tt.peers,
			}
			var b bytes.Buffer
			writeStatus(&b, st)
			var warnings []string
			for _, l := range strings.Split(b.String(), "\n") {
				if strings.HasPrefix(l, "# warning:") {
					warnings = append(warnings, l)
				}
			}
			if len(warnings) != len(tt.want) {
				t.Fatalf("warnings %q, want %d:\n%s", warnings, len(tt.want), b.String())
			}
			for i, w := range tt.want {
				if !strings.HasPrefix(warnings[i], w) {
					t.Errorf("warning %q, want it to start %q", warnings[i], w)
				}
			}
		})
	}
}

// TestWriteStatusVerdicts: a node the coordinator expired, deleted or has
// not approved yet says so, never "coordinator unreachable".
func TestWriteStatusVerdicts(t *testing.T) {
	self := &localapi.Node{ID: 7, Hostname: "gpu-7", IPs: []netip.Addr{netip.MustParseAddr("100.64.0.7")}}
	for _, tt := range []struct {
		name  string
		st    localapi.Status
		want  []string
		never string
	}{
		{"expired", localapi.Status{BackendState: localapi.StateExpired, Self: self,
			Message: "expired: the coordinator expired this node's key; run `meshd up --authkey KEY` to enrol it again (it keeps its addresses)"},
			[]string{"gpu-7", "expired (re-enrol: meshd up --authkey KEY)", "# expired: the coordinator expired"}, "unreachable"},
		{"waiting for approval", localapi.Status{BackendState: localapi.StateNeedsApproval, Self: self,
			Message: "waiting for approval by an admin: meshd admin nodes approve 7"},
			[]string{"Waiting for approval by an admin: meshd admin nodes approve 7", "waiting for approval"}, "unreachable"},
		{"deleted", localapi.Status{BackendState: localapi.StateNeedsLogin, Self: self,
			Message: "the coordinator deleted this node: run `meshd up --authkey KEY` to enrol it again"},
			[]string{"Logged out: the coordinator deleted this node"}, "unreachable"},
		{"never registered", localapi.Status{BackendState: localapi.StateNeedsLogin, Message: "not registered"},
			[]string{"Logged out: run meshd up --authkey KEY --coordinator URL"}, "unreachable"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var b bytes.Buffer
			writeStatus(&b, &tt.st)
			for _, w := range tt.want {
				if !strings.Contains(b.String(), w) {
					t.Errorf("status lacks %q:\n%s", w, b.String())
				}
			}
			if strings.Contains(b.String(), tt.never) {
				t.Errorf("status says %q:\n%s", tt.never, b.String())
			}
		})
	}
}

// TestWriteStatusNotices: the coordinator's notices about this node (tags
// a policy removed) are shown, with control characters dropped so that
// they cannot drive the terminal.
func TestWriteStatusNotices(t *testing.T) {
	st := &localapi.Status{
		BackendState: localapi.StateRunning,
		Self: &localapi.Node{Hostname: "laptop", IPs: []netip.Addr{netip.MustParseAddr("100.64.0.1")}, Online: true,
			Notices: []string{"tag:x removed by policy p.hujson set 2026-01-01T00:00:00Z: user alice\x1b[2J does not own tag \"tag:x\""}},
	}
	var b bytes.Buffer
	writeStatus(&b, st)
	want := "# coordinator: tag:x removed by policy p.hujson set 2026-01-01T00:00:00Z: user alice[2J does not own tag \"tag:x\"\n"
	if !strings.Contains(b.String(), want) {
		t.Fatalf("status lacks %q:\n%s", want, b.String())
	}
}
