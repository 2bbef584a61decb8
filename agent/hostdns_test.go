package agent

import (
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"meshd.dev/meshd/agent/osdns"
	"meshd.dev/meshd/netmap"
)

// TestWantOSDNS: when the agent configures the host's DNS, and with what.
func TestWantOSDNS(t *testing.T) {
	v4 := netip.MustParsePrefix("100.64.0.5/32")
	v6 := netip.MustParsePrefix("fd5e:5a1e:d::6440:5/128")
	dns := netmap.DNSConfig{
		Suffix:        "meshd.internal",
		SearchDomains: []string{"meshd.internal", "lab.example"},
		Routes: map[string][]netip.AddrPort{
			"z.example":      {netip.MustParseAddrPort("10.0.0.53:53")},
			"a.example":      {netip.MustParseAddrPort("10.0.0.53:53")},
			"meshd.internal": {netip.MustParseAddrPort("10.0.0.53:53")}, // the suffix is matched once
		},
	}
	tests := []struct {
		name   string
		tun    string
		engine bool
		addrs  []netip.Prefix
		login  *Login
		dns    netmap.DNSConfig
		want   *osdns.Config // nil: leave the host alone
	}{
		{"kernel TUN, dual stack", "meshd0", true, []netip.Prefix{v4, v6}, &Login{}, dns, &osdns.Config{
			Nameservers:   []netip.Addr{netmap.ResolverIPv4, netmap.ResolverIPv6},
			SearchDomains: []string{"meshd.internal", "lab.example"},
			MatchDomains:  []string{"meshd.internal", "a.example", "z.example"},
		}},
		{"IPv4 only: no route to the IPv6 resolver", "meshd0", true, []netip.Prefix{v4}, &Login{}, netmap.DNSConfig{Suffix: "ts.internal"}, &osdns.Config{
			Nameservers:  []netip.Addr{netmap.ResolverIPv4},
			MatchDomains: []string{"ts.internal"},
		}},
		{"netstack never touches the host", TUNUserspace, true, []netip.Prefix{v4}, &Login{}, dns, nil},
		{"--accept-dns=false", "meshd0", true, []netip.Prefix{v4}, &Login{NoAcceptDNS: true}, dns, nil},
		{"map without DNS (older coordinator)", "meshd0", true, []netip.Prefix{v4}, &Login{}, netmap.DNSConfig{}, nil},
		{"data plane down", "meshd0", false, nil, &Login{}, dns, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := &Agent{opts: Options{TUN: tt.tun}, login: tt.login}
			if tt.engine {
				a.eng = &engine{cfg: engineConfig{addrs: tt.addrs}}
				if tt.tun != TUNUserspace {
					a.eng.link = &kernelLink{}
				}
			}
			got, ok := a.wantOSDNSLocked(&netmap.NetworkMap{DNS: tt.dns})
			if tt.want == nil {
				if ok {
					t.Fatalf("configures the host with %+v, want it left alone", got)
				}
				return
			}
			if !ok || !reflect.DeepEqual(got, *tt.want) {
				t.Fatalf("got %+v (%v), want %+v", got, ok, *tt.want)
			}
			if err := got.Validate(); err != nil {
				t.Fatalf("the agent's config does not validate: %v", err)
			}
		})
	}
}

// TestDNSUpstreamsWithoutConfigurator: while meshd leaves the host's DNS
// alone, the resolver forwards to what the host's file names, never to
// meshd's own resolver.
func TestDNSUpstreamsWithoutConfigurator(t *testing.T) {
	path := filepath.Join(t.TempDir(), "resolv.conf")
	if err := os.WriteFile(path, []byte("nameserver 100.100.100.100\nnameserver 192.0.2.53\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	a := &Agent{opts: Options{ResolvConf: path}, log: slog.New(slog.DiscardHandler)}
	want := []netip.AddrPort{netip.MustParseAddrPort("192.0.2.53:53")}
	if got := a.DNSUpstreams(); !reflect.DeepEqual(got, want) {
		t.Fatalf("DNSUpstreams = %v, want %v", got, want)
	}
}
