package agent

import (
	"net/netip"
	"strings"
	"testing"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/netmap"
)

func TestPlanSSH(t *testing.T) {
	on, off := true, false
	for _, tc := range []struct {
		name  string
		login *Login
		req   localapi.UpRequest
		want  *bool
		err   string
	}{
		{"first registration with --ssh", nil, localapi.UpRequest{SSH: &on}, &on, ""},
		{"no flag", &Login{SSH: true}, localapi.UpRequest{}, nil, ""},
		{"turn on", &Login{}, localapi.UpRequest{SSH: &on}, &on, ""},
		{"turn off", &Login{SSH: true}, localapi.UpRequest{SSH: &off}, &off, ""},
		{"on again", &Login{SSH: true}, localapi.UpRequest{SSH: &on}, nil, "already runs the SSH server"},
		{"off again", &Login{}, localapi.UpRequest{SSH: &off}, nil, "runs no SSH server"},
		{"on again from MESHD_SSH", &Login{SSH: true}, localapi.UpRequest{SSH: &on, SSHFromEnv: true}, nil, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := planSSH(tc.login, tc.req)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil || (got == nil) != (tc.want == nil) || got != nil && *got != *tc.want {
				t.Fatalf("planSSH = %v, %v; want %v", got, err, tc.want)
			}
		})
	}
}

// TestSSHMayForward: local forwarding reaches only this node's own
// addresses on ports the packet filter admits the caller to.
func TestSSHMayForward(t *testing.T) {
	caller := netip.MustParseAddr("100.64.0.2")
	pf := &packetFilter{compiled: true, src: []netmap.FilterRule{{
		SrcIPs:   []netip.Prefix{netip.MustParsePrefix("100.64.0.2/32")},
		DstPorts: []netmap.NetPortRange{{Net: netip.MustParsePrefix("100.64.0.1/32"), Ports: netmap.PortRange{First: 8080, Last: 8080}}},
		IPProto:  []uint8{netmap.ProtoTCP},
	}}}
	for _, tc := range []struct {
		src  netip.Addr
		dst  string
		want bool
	}{
		{caller, "100.64.0.1:8080", true},
		{caller, "100.64.0.1:22", false},
		{netip.MustParseAddr("100.64.0.3"), "100.64.0.1:8080", false},
	} {
		if got := pf.allowsTCP(tc.src, netip.MustParseAddrPort(tc.dst)); got != tc.want {
			t.Errorf("%v -> %s: %v", tc.src, tc.dst, got)
		}
	}
	if (&packetFilter{}).allowsTCP(caller, netip.MustParseAddrPort("100.64.0.1:8080")) {
		t.Error("a filter with no rules in force allowed forwarding")
	}
}
