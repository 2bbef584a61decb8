package main

import (
	"bytes"
	"net/netip"
	"testing"

	"meshd.dev/meshd/agent/localapi"
)

func TestWritePong(t *testing.T) {
	ip := netip.MustParseAddr("100.64.0.2")
	tests := []struct {
		name string
		res  localapi.PingResult
		want string
	}{
		{"relayed", localapi.PingResult{Peer: "gpu-2", IP: ip, Path: "derp", DERPRegion: 1, DERPCode: "lab", LatencyMS: 12.3},
			"pong from gpu-2 (100.64.0.2) via DERP(lab) in 12ms\n"},
		{"direct", localapi.PingResult{Peer: "gpu-2", IP: ip, Path: "direct", Endpoint: "198.18.1.2:41641", LatencyMS: 0.42},
			"pong from gpu-2 (100.64.0.2) via 198.18.1.2:41641 in 0.42ms\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var b bytes.Buffer
			writePong(&b, &tt.res, false)
			if b.String() != tt.want {
				t.Errorf("got %q, want %q", b.String(), tt.want)
			}
		})
	}
}

func TestPingUsage(t *testing.T) {
	var out, errb bytes.Buffer
	if code := run(t.Context(), []string{"ping"}, &out, &errb); code == 0 {
		t.Errorf("ping without a peer exited 0")
	}
	if code := run(t.Context(), []string{"ping", "--socket", t.TempDir() + "/none.sock", "peer"}, &out, &errb); code == 0 {
		t.Errorf("ping with no daemon exited 0")
	}
	if !bytes.Contains(errb.Bytes(), []byte("daemon")) {
		t.Errorf("no-daemon error does not say so: %q", errb.String())
	}
}

func TestPeerStateRelay(t *testing.T) {
	for _, tc := range []struct {
		p    localapi.Peer
		want string
	}{
		{localapi.Peer{Node: localapi.Node{Online: true}, Path: "derp", Endpoint: "derp:lab", TxBytes: 3, RxBytes: 4, Active: true}, `active; relay "lab", tx 3 rx 4`},
		// Never talked to (not in WireGuard): its relay is only where it
		// would go.
		{localapi.Peer{Node: localapi.Node{Online: true}, Path: "derp", Endpoint: "derp:lab"}, `idle; relay "lab"`},
		{localapi.Peer{Node: localapi.Node{Online: true}, Path: "direct", Endpoint: "198.18.0.2:41641"}, `idle; direct 198.18.0.2:41641`},
		{localapi.Peer{Node: localapi.Node{Online: false}, Path: "derp", Endpoint: "derp:lab", Active: true}, `offline`},
	} {
		if got := peerState(&tc.p); got != tc.want {
			t.Errorf("peerState(%+v) = %q, want %q", tc.p, got, tc.want)
		}
	}
}
