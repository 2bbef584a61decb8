// Package netlab builds throwaway network topologies out of Linux network
// namespaces for tests: hosts, L2 segments (a bridge in its own namespace),
// routers with optional NAT, and helpers to run programs and open sockets
// inside them. Everything is torn down by t.Cleanup, even after a failed
// test. Only addresses the test assigns inside its namespaces are used;
// nothing is routed to the machine's own network.
//
// Names embed the process id and a random lab id, so parallel test packages
// never collide. A lab needs root and the `ip` tool; New skips the test with
// a clear message otherwise.
package netlab

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"
)

// Underlay is the default address space for lab segments: the RFC 2544
// benchmarking range, which never appears on real networks.
var Underlay = netip.MustParsePrefix("198.18.0.0/15")

// Lab is one test's set of namespaces.
type Lab struct {
	t  testing.TB
	id string // unique per lab: pid + random

	mu    sync.Mutex
	n     int // counter for names
	hosts []*Host
	procs []*Process
}

// New returns a lab torn down when t ends. It skips t when not running as
// root or when `ip` is missing.
func New(t testing.TB) *Lab {
	t.Helper()
	if runtime.GOOS != "linux" {
		t.Skip("netlab: network namespaces need Linux")
	}
	if os.Geteuid() != 0 {
		t.Skip("netlab: needs root to create network namespaces (CI runs as root; run `sudo go test` locally)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("netlab: the `ip` tool (iproute2) is missing; apt-get install iproute2")
	}
	var r [3]byte
	rand.Read(r[:])
	l := &Lab{t: t, id: fmt.Sprintf("%d-%s", os.Getpid(), hex.EncodeToString(r[:]))}
	t.Cleanup(l.teardown)
	return l
}

func (l *Lab) nextName(kind, name string) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.n++
	return fmt.Sprintf("nl%s-%d-%s-%s", l.id, l.n, kind, name)
}

// teardown kills what the lab started and deletes its namespaces (which
// deletes their interfaces). Errors are reported, not fatal: teardown must
// get as far as it can.
func (l *Lab) teardown() {
	l.mu.Lock()
	procs, hosts := l.procs, l.hosts
	l.procs, l.hosts = nil, nil
	l.mu.Unlock()
	for _, p := range procs {
		p.Kill()
	}
	for i := len(hosts) - 1; i >= 0; i-- {
		h := hosts[i]
		h.nsHandle.Close()
		if out, err := exec.Command("ip", "netns", "del", h.ns).CombinedOutput(); err != nil {
			l.t.Logf("netlab: delete namespace %s: %v: %s", h.ns, err, out)
		}
		if err := os.RemoveAll(h.etcDir()); err != nil {
			l.t.Logf("netlab: %v", err)
		}
	}
}

// Host is a network namespace: a machine in the topology.
type Host struct {
	lab      *Lab
	Name     string
	ns       string // namespace name
	nsHandle netns.NsHandle

	mu    sync.Mutex
	nIfs  int
	addrs []netip.Prefix
}

// NewHost creates a namespace with loopback up.
func (l *Lab) NewHost(name string) *Host {
	l.t.Helper()
	h := &Host{lab: l, Name: name, ns: l.nextName("h", name)}
	l.run("ip", "netns", "add", h.ns)
	l.mu.Lock()
	l.hosts = append(l.hosts, h)
	l.mu.Unlock()
	// The namespace's own resolver file, which `ip netns exec` shows its
	// programs as /etc/resolv.conf, so that nothing run in the lab (a
	// daemon configuring DNS) can reach the machine's shared /etc. Before
	// the first `ip netns exec`, which sets up the bind mount.
	if err := os.MkdirAll(h.etcDir(), 0o755); err != nil {
		l.t.Fatalf("netlab: %v", err)
	}
	if err := os.WriteFile(h.ResolvConf(), []byte("# netlab: this namespace's resolver file; the lab has no DNS server\n"), 0o644); err != nil {
		l.t.Fatalf("netlab: %v", err)
	}
	ns, err := netns.GetFromName(h.ns)
	if err != nil {
		l.t.Fatalf("netlab: open namespace %s: %v", h.ns, err)
	}
	h.nsHandle = ns
	h.MustRun("ip", "link", "set", "lo", "up")
	return h
}

// Namespace returns the namespace name (for `ip netns exec`).
func (h *Host) Namespace() string { return h.ns }

// etcDir is the namespace's /etc overlay for `ip netns exec`.
func (h *Host) etcDir() string { return filepath.Join("/etc/netns", h.ns) }

// ResolvConf is the namespace's resolver file: programs run in h
// (Command, Run, Start) read it as /etc/resolv.conf. A daemon in h that
// configures DNS must be pointed at this path (meshd daemon
// --resolv-conf), never at the machine's /etc/resolv.conf.
func (h *Host) ResolvConf() string { return filepath.Join(h.etcDir(), "resolv.conf") }

// Addrs returns the addresses assigned by Attach, in order.
func (h *Host) Addrs() []netip.Prefix {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]netip.Prefix(nil), h.addrs...)
}

func (l *Lab) run(args ...string) string {
	l.t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		l.t.Fatalf("netlab: %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// Command returns a command that runs inside h's namespace.
func (h *Host) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", h.ns, name}, args...)...)
}

// Run runs a command inside h and returns its combined output.
func (h *Host) Run(name string, args ...string) (string, error) {
	out, err := h.Command(context.Background(), name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s in %s: %w: %s", name, strings.Join(args, " "), h.Name, err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

// MustRun is Run that fails the test on error.
func (h *Host) MustRun(name string, args ...string) string {
	h.lab.t.Helper()
	out, err := h.Run(name, args...)
	if err != nil {
		h.lab.t.Fatalf("netlab: %v", err)
	}
	return out
}

// Do runs fn on an OS thread switched into h's namespace. Sockets fn opens
// belong to h's namespace for their whole life, so a test can listen and
// dial "from" a lab host in plain Go. fn must not start goroutines that
// open sockets (they would run on other threads, in the root namespace).
func (h *Host) Do(fn func() error) error {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("netlab: current namespace: %w", err)
	}
	defer orig.Close()
	if err := netns.Set(h.nsHandle); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("netlab: enter %s: %w", h.Name, err)
	}
	ferr := fn()
	if err := netns.Set(orig); err != nil {
		// Leave the thread locked: the runtime then discards it instead
		// of reusing a thread stuck in the wrong namespace.
		return errors.Join(ferr, fmt.Errorf("netlab: leave %s: %w", h.Name, err))
	}
	runtime.UnlockOSThread()
	return ferr
}

// Segment is an L2 network: a bridge in its own namespace that hosts attach
// to with veth pairs.
type Segment struct {
	Name   string
	Prefix netip.Prefix
	sw     *Host // namespace holding the bridge

	mu   sync.Mutex
	next netip.Addr
	nIfs int
}

// NewSegment creates an L2 segment whose hosts get addresses from prefix.
func (l *Lab) NewSegment(name string, prefix netip.Prefix) *Segment {
	l.t.Helper()
	sw := l.NewHost("sw-" + name)
	sw.MustRun("ip", "link", "add", "br0", "type", "bridge")
	sw.MustRun("ip", "link", "set", "br0", "up")
	return &Segment{Name: name, Prefix: prefix.Masked(), sw: sw, next: prefix.Masked().Addr()}
}

// Attach connects h to seg with a new interface (eth0, eth1, ...) and gives
// it the next free address of the segment, which it returns.
func (h *Host) Attach(seg *Segment) netip.Addr {
	h.lab.t.Helper()
	seg.mu.Lock()
	seg.next = seg.next.Next()
	addr := seg.next
	seg.nIfs++
	port := fmt.Sprintf("p%d", seg.nIfs)
	seg.mu.Unlock()
	if !seg.Prefix.Contains(addr) {
		h.lab.t.Fatalf("netlab: segment %s (%v) is full", seg.Name, seg.Prefix)
	}
	h.mu.Lock()
	ifname := fmt.Sprintf("eth%d", h.nIfs)
	h.nIfs++
	h.mu.Unlock()
	// Both ends are created directly inside their namespaces, so names
	// only need to be unique per namespace and nothing ever appears in the
	// root namespace.
	h.lab.run("ip", "link", "add", ifname, "netns", h.ns, "type", "veth", "peer", "name", port, "netns", seg.sw.ns)
	seg.sw.MustRun("ip", "link", "set", port, "master", "br0", "up")
	p := netip.PrefixFrom(addr, seg.Prefix.Bits())
	h.MustRun("ip", addrAddArgs(p, ifname)...)
	h.MustRun("ip", "link", "set", ifname, "up")
	h.mu.Lock()
	h.addrs = append(h.addrs, p)
	h.mu.Unlock()
	return addr
}

// AddRoute routes dst via gw inside h (use netip.Prefix{} for the default).
func (h *Host) AddRoute(dst netip.Prefix, gw netip.Addr) {
	h.lab.t.Helper()
	d := "default"
	if dst.IsValid() {
		d = dst.String()
	}
	h.MustRun("ip", "route", "add", d, "via", gw.String())
}

// EnableForwarding makes h a router.
func (h *Host) EnableForwarding() {
	h.lab.t.Helper()
	h.MustRun("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
	h.MustRun("sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1")
}

// NAT selects a router's address translation.
type NAT int

const (
	// NoNAT routes without translation.
	NoNAT NAT = iota
	// EasyNAT is MASQUERADE: endpoint-independent mapping, the common home
	// router.
	EasyNAT
	// HardNAT is MASQUERADE --random-fully: a new port per destination, a
	// symmetric NAT that defeats hole punching.
	HardNAT
)

// Masquerade NATs traffic from h's other interfaces out through ifname,
// and drops connections opened from ifname to h itself, as every home and
// cloud NAT's own firewall does. Without that drop, a peer's ping that
// reaches the router before the inside node's first packet out leaves a
// conntrack entry for the router itself, and the node's mapping then gets
// another port: a Linux artefact, not NAT behaviour. Forwarded traffic (a
// port forward's DNAT, replies to the inside) is not affected.
func (h *Host) Masquerade(ifname string, nat NAT) {
	h.lab.t.Helper()
	if nat == NoNAT {
		return
	}
	if _, err := exec.LookPath("iptables"); err != nil {
		h.lab.t.Skip("netlab: iptables is missing; apt-get install iptables")
	}
	args := []string{"-t", "nat", "-A", "POSTROUTING", "-o", ifname, "-j", "MASQUERADE"}
	if nat == HardNAT {
		args = append(args, "--random-fully")
	}
	h.MustRun("iptables", args...)
	h.MustRun("iptables", "-A", "INPUT", "-i", ifname, "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP")
}

// Site is a LAN behind a router on an upstream segment.
type Site struct {
	Router *Host
	LAN    *Segment
	// WANAddr is the router's address on the upstream segment.
	WANAddr netip.Addr
}

// NewSite creates a router attached to upstream (its eth0) and to a new LAN
// segment with prefix lan (its eth1, the LAN's first address), translating
// with nat. Hosts attached to the LAN later get a default route with
// AttachToSite.
func (l *Lab) NewSite(name string, upstream *Segment, lan netip.Prefix, nat NAT) *Site {
	l.t.Helper()
	r := l.NewHost("rt-" + name)
	wan := r.Attach(upstream)
	seg := l.NewSegment(name, lan)
	r.Attach(seg)
	r.EnableForwarding()
	r.Masquerade("eth0", nat)
	return &Site{Router: r, LAN: seg, WANAddr: wan}
}

// AttachToSite connects h to the site's LAN with a default route through
// the router.
func (h *Host) AttachToSite(s *Site) netip.Addr {
	h.lab.t.Helper()
	a := h.Attach(s.LAN)
	h.AddRoute(netip.Prefix{}, s.Router.Addrs()[1].Addr())
	return a
}

// Process is a long-running program inside a host.
type Process struct {
	Cmd  *exec.Cmd
	Name string
	done chan struct{}
	err  error
	out  *lockedBuffer
}

// Start runs a long-lived program inside h; its output is kept for
// Output() and logged if the test fails. It is killed at teardown.
func (h *Host) Start(name string, args ...string) *Process {
	h.lab.t.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", h.ns, name}, args...)...)
	buf := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = buf, buf
	// Own process group, so Kill reaches the program and not just `ip`
	// (which execs it, but be safe).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		h.lab.t.Fatalf("netlab: start %s in %s: %v", name, h.Name, err)
	}
	p := &Process{Cmd: cmd, Name: h.Name + ":" + name, done: make(chan struct{}), out: buf}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	h.lab.mu.Lock()
	h.lab.procs = append(h.lab.procs, p)
	h.lab.mu.Unlock()
	t := h.lab.t
	t.Cleanup(func() {
		p.Kill()
		if t.Failed() {
			t.Logf("--- output of %s %s:\n%s", p.Name, strings.Join(args, " "), p.Output())
		}
	})
	return p
}

// Kill sends SIGKILL and waits for the process to exit.
func (p *Process) Kill() {
	select {
	case <-p.done:
		return
	default:
	}
	syscall.Kill(-p.Cmd.Process.Pid, syscall.SIGKILL)
	<-p.done
}

// Stop sends SIGTERM and waits up to timeout for a clean exit, then kills.
func (p *Process) Stop(timeout time.Duration) error {
	syscall.Kill(-p.Cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-p.done:
		return p.err
	case <-time.After(timeout):
		p.Kill()
		return fmt.Errorf("%s did not stop within %v", p.Name, timeout)
	}
}

// Done is closed when the process has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// Output returns what the process printed so far.
func (p *Process) Output() string { return p.out.String() }

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
