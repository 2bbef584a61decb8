package osdns

import (
	"bufio"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/godbus/dbus/v5/prop"
)

// startBus runs a private dbus-daemon for t (the real daemon, with a
// config of its own, on a socket in a temp dir) and returns its address.
func startBus(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("dbus-daemon")
	if err != nil {
		t.Fatalf("dbus-daemon is needed for the systemd-resolved tests (apt-get install dbus-daemon): %v", err)
	}
	// Not t.TempDir: subtest names put commas and quotes in its path,
	// which a D-Bus address would need escaped.
	dir, err := os.MkdirTemp("", "meshd-dbus-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	conf := filepath.Join(dir, "bus.conf")
	err = os.WriteFile(conf, []byte(`<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>custom</type>
  <listen>unix:path=`+filepath.Join(dir, "bus")+`</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
`), 0o600)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "--config-file="+conf, "--nofork", "--nopidfile", "--print-address=1")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start dbus-daemon: %v", err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("dbus-daemon stderr:\n%s", stderr.String())
		}
	})
	// The address is printed once the bus listens.
	addr, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("dbus-daemon printed no address: %v", err)
	}
	return strings.TrimSpace(addr)
}

// fakeResolved is systemd-resolved's Manager as far as meshd uses it,
// exported on a real bus: it records each call with its arguments.
type fakeResolved struct {
	mu    sync.Mutex
	calls []string
	links map[int32]bool // links with settings; RevertLink of others fails like resolved
	hang  chan struct{}  // when set, SetLinkDNS blocks until it is closed
}

func (f *fakeResolved) record(format string, args ...any) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, fmt.Sprintf(format, args...))
}

func (f *fakeResolved) takeCalls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.calls
	f.calls = nil
	return c
}

func (f *fakeResolved) SetLinkDNS(ifindex int32, addrs []resolvedAddr) *dbus.Error {
	if f.hang != nil {
		<-f.hang
	}
	var s []string
	for _, a := range addrs {
		ip, _ := netip.AddrFromSlice(a.Address)
		s = append(s, fmt.Sprintf("%d:%v", a.Family, ip))
	}
	f.mu.Lock()
	f.links[ifindex] = true
	f.mu.Unlock()
	f.record("SetLinkDNS %d %s", ifindex, strings.Join(s, ","))
	return nil
}

func (f *fakeResolved) SetLinkDomains(ifindex int32, ds []resolvedDomain) *dbus.Error {
	var s []string
	for _, d := range ds {
		if d.RoutingOnly {
			s = append(s, "~"+d.Domain)
		} else {
			s = append(s, d.Domain)
		}
	}
	f.record("SetLinkDomains %d %s", ifindex, strings.Join(s, ","))
	return nil
}

func (f *fakeResolved) SetLinkDefaultRoute(ifindex int32, on bool) *dbus.Error {
	f.record("SetLinkDefaultRoute %d %v", ifindex, on)
	return nil
}

func (f *fakeResolved) SetLinkLLMNR(ifindex int32, v string) *dbus.Error {
	f.record("SetLinkLLMNR %d %s", ifindex, v)
	return nil
}

func (f *fakeResolved) SetLinkMulticastDNS(ifindex int32, v string) *dbus.Error {
	f.record("SetLinkMulticastDNS %d %s", ifindex, v)
	return nil
}

func (f *fakeResolved) SetLinkDNSSEC(ifindex int32, v string) *dbus.Error {
	f.record("SetLinkDNSSEC %d %s", ifindex, v)
	return nil
}

func (f *fakeResolved) FlushCaches() *dbus.Error {
	f.record("FlushCaches")
	return nil
}

func (f *fakeResolved) RevertLink(ifindex int32) *dbus.Error {
	f.mu.Lock()
	known := f.links[ifindex]
	delete(f.links, ifindex)
	f.mu.Unlock()
	f.record("RevertLink %d", ifindex)
	if !known {
		return dbus.NewError(resolvedNoSuchLink, []any{fmt.Sprintf("Link %d not known", ifindex)})
	}
	return nil
}

// fakeOptions vary the fake.
type fakeOptions struct {
	servers []resolvedServer
	// without are Manager methods the fake lacks (an older resolved).
	without []string
	hang    bool // SetLinkDNS never answers (until the test ends)
}

// serveFakeResolved exports a fakeResolved on the bus at addr under
// resolved's name.
func serveFakeResolved(t *testing.T, addr string, fo fakeOptions) *fakeResolved {
	t.Helper()
	conn, err := dbus.Connect(addr)
	if err != nil {
		t.Fatalf("connect the fake to the bus: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	f := &fakeResolved{links: map[int32]bool{}}
	if fo.hang {
		f.hang = make(chan struct{})
		t.Cleanup(func() { close(f.hang) })
	}
	methods := map[string]any{
		"SetLinkDNS": f.SetLinkDNS, "SetLinkDomains": f.SetLinkDomains, "SetLinkDefaultRoute": f.SetLinkDefaultRoute,
		"SetLinkLLMNR": f.SetLinkLLMNR, "SetLinkMulticastDNS": f.SetLinkMulticastDNS, "SetLinkDNSSEC": f.SetLinkDNSSEC,
		"FlushCaches": f.FlushCaches, "RevertLink": f.RevertLink,
	}
	for _, m := range fo.without {
		delete(methods, m)
	}
	if err := conn.ExportMethodTable(methods, resolvedPath, resolvedManager); err != nil {
		t.Fatal(err)
	}
	servers := fo.servers
	if servers == nil {
		servers = []resolvedServer{}
	}
	if _, err := prop.Export(conn, resolvedPath, prop.Map{resolvedManager: {
		"DNS": {Value: servers, Emit: prop.EmitFalse},
	}}); err != nil {
		t.Fatal(err)
	}
	reply, err := conn.RequestName(resolvedName, dbus.NameFlagDoNotQueue)
	if err != nil || reply != dbus.RequestNameReplyPrimaryOwner {
		t.Fatalf("RequestName: %v, %v", reply, err)
	}
	return f
}

func resolvedOpts(bus string, ifindex int) Options {
	return Options{Mode: ModeResolved, BusAddress: bus, IfIndex: ifindex, BackupFile: "/nonexistent/never-written", Timeout: 10 * time.Second}
}

// TestResolvedSet: the calls and their arguments on a real bus, for
// configs the agent produces.
func TestResolvedSet(t *testing.T) {
	v4 := func(s string) []byte { return netip.MustParseAddr(s).AsSlice() }
	servers := []resolvedServer{
		{IfIndex: 0, Family: 2, Address: v4("192.0.2.1")},                               // global
		{IfIndex: 2, Family: 10, Address: netip.MustParseAddr("2001:db8::1").AsSlice()}, // eth0
		{IfIndex: 7, Family: 2, Address: v4("100.100.100.100")},                         // ours: never an upstream
		{IfIndex: 3, Family: 2, Address: v4("100.100.100.100")},                         // ours, even on another link
		{IfIndex: 2, Family: 2, Address: v4("192.0.2.1")},                               // a duplicate
	}
	wantUpstreams := []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:53"), netip.MustParseAddrPort("[2001:db8::1]:53")}
	tests := []struct {
		name      string
		cfg       Config
		wantCalls []string
	}{
		{
			name: "suffix is search and match, a route is match only",
			cfg:  meshCfg,
			wantCalls: []string{
				"SetLinkDNS 7 2:100.100.100.100,10:fd5e:5a1e:d::53",
				"SetLinkDomains 7 meshd.internal,~corp.example",
				"SetLinkDefaultRoute 7 false",
				"SetLinkLLMNR 7 no", "SetLinkMulticastDNS 7 no", "SetLinkDNSSEC 7 no",
				"FlushCaches",
			},
		},
		{
			name: "IPv4 only, search domains beyond the suffix, trailing dots",
			cfg: Config{
				Nameservers:   addrs("100.100.100.100"),
				SearchDomains: []string{"meshd.internal", "lab.example."},
				MatchDomains:  []string{"meshd.internal.", "a.example", "b.example"},
			},
			wantCalls: []string{
				"SetLinkDNS 7 2:100.100.100.100",
				"SetLinkDomains 7 meshd.internal,lab.example,~a.example,~b.example",
				"SetLinkDefaultRoute 7 false",
				"SetLinkLLMNR 7 no", "SetLinkMulticastDNS 7 no", "SetLinkDNSSEC 7 no",
				"FlushCaches",
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bus := startBus(t)
			f := serveFakeResolved(t, bus, fakeOptions{servers: servers})
			c, err := New(resolvedOpts(bus, 7))
			if err != nil {
				t.Fatalf("New: %v", err)
			}
			if c.String() != "systemd-resolved (link 7)" {
				t.Errorf("String() = %q", c.String())
			}
			if got := c.Upstreams(); !reflect.DeepEqual(got, wantUpstreams) {
				t.Errorf("Upstreams before Set = %v, want %v", got, wantUpstreams)
			}
			if calls := f.takeCalls(); len(calls) != 0 {
				t.Fatalf("New changed resolved: %v", calls)
			}
			if err := c.Set(tt.cfg); err != nil {
				t.Fatalf("Set: %v", err)
			}
			if got := f.takeCalls(); !reflect.DeepEqual(got, tt.wantCalls) {
				t.Errorf("calls\n got %q\nwant %q", got, tt.wantCalls)
			}
			// Every network map sets again: the same config costs no call.
			if err := c.Set(tt.cfg); err != nil {
				t.Fatal(err)
			}
			if got := f.takeCalls(); len(got) != 0 {
				t.Errorf("the same config again made calls %q", got)
			}
			if got := c.Upstreams(); !reflect.DeepEqual(got, wantUpstreams) {
				t.Errorf("Upstreams = %v, want %v", got, wantUpstreams)
			}
			if err := c.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			if got := f.takeCalls(); !reflect.DeepEqual(got, []string{"RevertLink 7"}) {
				t.Errorf("Close calls %q, want RevertLink 7", got)
			}
			if err := c.Set(tt.cfg); err == nil {
				t.Error("Set after Close succeeded")
			}
		})
	}
}

// TestResolvedEdges: what an older resolved, a vanished link and bad
// input do.
func TestResolvedEdges(t *testing.T) {
	t.Run("bad config makes no call", func(t *testing.T) {
		bus := startBus(t)
		f := serveFakeResolved(t, bus, fakeOptions{})
		c, err := New(resolvedOpts(bus, 7))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		bad := meshCfg
		bad.MatchDomains = []string{"evil domain"}
		if err := c.Set(bad); err == nil {
			t.Fatal("Set accepted a bad domain")
		}
		if calls := f.takeCalls(); len(calls) != 0 {
			t.Fatalf("calls after a refused config: %v", calls)
		}
	})
	t.Run("resolved without SetLinkDefaultRoute (systemd < 240)", func(t *testing.T) {
		bus := startBus(t)
		f := serveFakeResolved(t, bus, fakeOptions{without: []string{"SetLinkDefaultRoute", "SetLinkDNSSEC"}})
		c, err := New(resolvedOpts(bus, 7))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.Set(meshCfg); err != nil {
			t.Fatalf("Set: %v", err)
		}
		if got := f.takeCalls(); len(got) != 5 || got[0] != "SetLinkDNS 7 2:100.100.100.100,10:fd5e:5a1e:d::53" {
			t.Fatalf("calls %q", got)
		}
	})
	t.Run("a failing required call is an error", func(t *testing.T) {
		bus := startBus(t)
		serveFakeResolved(t, bus, fakeOptions{without: []string{"SetLinkDomains"}})
		c, err := New(resolvedOpts(bus, 7))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.Set(meshCfg); err == nil || !strings.Contains(err.Error(), "SetLinkDomains") {
			t.Fatalf("Set = %v, want a SetLinkDomains error", err)
		}
	})
	t.Run("a hung resolved costs one timeout", func(t *testing.T) {
		bus := startBus(t)
		f := serveFakeResolved(t, bus, fakeOptions{hang: true})
		o := resolvedOpts(bus, 7)
		o.Timeout = 200 * time.Millisecond
		c, err := New(o)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		err = c.Set(meshCfg)
		if err == nil || !strings.Contains(err.Error(), "SetLinkDNS") {
			t.Fatalf("Set = %v, want SetLinkDNS to fail on the deadline", err)
		}
		if got := f.takeCalls(); len(got) != 0 {
			t.Fatalf("calls after the hung one: %q", got)
		}
	})
	t.Run("Close after the link vanished", func(t *testing.T) {
		bus := startBus(t)
		f := serveFakeResolved(t, bus, fakeOptions{})
		c, err := New(resolvedOpts(bus, 9))
		if err != nil {
			t.Fatal(err)
		}
		// Never Set: resolved does not know link 9, as after the TUN
		// went away.
		if err := c.Close(); err != nil {
			t.Fatalf("Close: %v (NoSuchLink means nothing is left to revert)", err)
		}
		if got := f.takeCalls(); !reflect.DeepEqual(got, []string{"RevertLink 9"}) {
			t.Fatalf("calls %q", got)
		}
	})
	t.Run("no link index", func(t *testing.T) {
		bus := startBus(t)
		serveFakeResolved(t, bus, fakeOptions{})
		if _, err := New(resolvedOpts(bus, 0)); err == nil {
			t.Fatal("New without a link index succeeded")
		}
	})
}

// TestDetectResolved: which method New picks, from the resolver file and
// whether resolved holds its name on the bus.
func TestDetectResolved(t *testing.T) {
	const stub = "# This is /run/systemd/resolve/stub-resolv.conf managed by man:systemd-resolved(8).\n# Do not edit.\nnameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n"
	tests := []struct {
		name     string
		file     func(dir, path string) // makes the resolver file
		running  bool
		mode     Mode
		wantKind string // "resolved", "file", or "error: TEXT"
	}{
		{"stub file, resolved running", writeAt(stub), true, ModeAuto, "resolved"},
		{"symlink to resolved's stub, resolved running", symlinkAt("/run/systemd/resolve/stub-resolv.conf"), true, ModeAuto, "resolved"},
		{"relative symlink to resolved's file", symlinkAt("../run/systemd/resolve/resolv.conf"), true, ModeAuto, "file"},
		{"plain file, resolved running", writeAt(hostConf), true, ModeAuto, "file"},
		{"stub file, resolved not running", writeAt(stub), false, ModeAuto, "file"},
		{"resolved forced, not running", writeAt(hostConf), false, ModeResolved, "error: not running"},
		{"file forced, resolved running", writeAt(stub), true, ModeFile, "file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bus := startBus(t)
			if tt.running {
				serveFakeResolved(t, bus, fakeOptions{})
			}
			dir := t.TempDir()
			path := filepath.Join(dir, "resolv.conf")
			tt.file(dir, path)
			o := resolvedOpts(bus, 7)
			o.Mode, o.ResolvConf, o.BackupFile = tt.mode, path, filepath.Join(dir, "backup.json")
			c, err := New(o)
			if want, ok := strings.CutPrefix(tt.wantKind, "error: "); ok {
				if err == nil || !strings.Contains(err.Error(), want) {
					t.Fatalf("New = %v, want an error containing %q", err, want)
				}
				return
			}
			if err != nil {
				t.Fatalf("New: %v", err)
			}
			defer c.Close()
			got := "file"
			if _, ok := c.(*resolvedConfigurator); ok {
				got = "resolved"
			}
			if got != tt.wantKind {
				t.Fatalf("New chose %s (%v), want %s", got, c, tt.wantKind)
			}
		})
	}
}

func writeAt(content string) func(dir, path string) {
	return func(_, path string) { os.WriteFile(path, []byte(content), 0o644) }
}

func symlinkAt(target string) func(dir, path string) {
	return func(_, path string) { os.Symlink(target, path) }
}
