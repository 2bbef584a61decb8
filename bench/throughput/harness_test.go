package throughput

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/curve25519"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/agent/magicbind"
	"meshd.dev/meshd/internal/netlab"
)

// helperEnv makes the test binary act as a helper program instead of
// running tests; the lab re-executes itself inside a namespace this way
// (see registerMain), because Go code that opens sockets from goroutines
// cannot be confined to a namespace in-process.
const helperEnv = "MESHD_THROUGHPUT_HELPER"

// bins builds the programs the lab runs, once per test binary.
type binaries struct {
	dir string

	meshdOnce sync.Once
	meshd     string
	meshdErr  error

	wgOnce sync.Once
	wg     string
	wgErr  error
}

// bins is set by TestMain before any test runs and only read afterwards.
var bins *binaries

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) == "register" {
		os.Exit(registerMain(os.Args[1:]))
	}
	dir, err := os.MkdirTemp("", "meshd-throughput-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bins = &binaries{dir: dir}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func goBuild(out, pkg string) error {
	b, err := exec.Command("go", "build", "-o", out, pkg).CombinedOutput()
	if err != nil {
		return fmt.Errorf("go build %s: %w\n%s", pkg, err, b)
	}
	return nil
}

// meshdBinary returns cmd/meshd built from this tree.
func meshdBinary(t testing.TB) string {
	t.Helper()
	bins.meshdOnce.Do(func() {
		bins.meshd = filepath.Join(bins.dir, "meshd")
		bins.meshdErr = goBuild(bins.meshd, "meshd.dev/meshd/cmd/meshd")
	})
	if bins.meshdErr != nil {
		t.Fatal(bins.meshdErr)
	}
	return bins.meshd
}

// wireguardGoBinary returns stock wireguard-go: path if set (the run script
// installs golang.zx2c4.com/wireguard@latest), else built from the version
// in go.mod, the very code meshd embeds, so the comparison isolates what
// meshd adds.
func wireguardGoBinary(t testing.TB, path string) string {
	t.Helper()
	if path != "" {
		return path
	}
	bins.wgOnce.Do(func() {
		bins.wg = filepath.Join(bins.dir, "wireguard-go")
		bins.wgErr = goBuild(bins.wg, "golang.zx2c4.com/wireguard")
	})
	if bins.wgErr != nil {
		t.Fatal(bins.wgErr)
	}
	return bins.wg
}

// requireTools skips t unless the programs the lab runs are installed.
func requireTools(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			pkg := tool
			if tool == "wg" {
				pkg = "wireguard-tools"
			}
			t.Skipf("throughput lab: %s is missing (apt-get install %s)", tool, pkg)
		}
	}
}

// topo is the lab: host a, router r, host b, point-to-point veth links
// a-r and r-b with the same MTU, no NAT.
type topo struct {
	lab          *netlab.Lab
	a, r, b      *netlab.Host
	aAddr, bAddr netip.Addr // underlay addresses of the hosts
	rAddr        netip.Addr // the router on a's link (reachable from both)
	mtu          int
	dir          string
}

func newTopo(t testing.TB, mtu int) *topo {
	t.Helper()
	lab := netlab.New(t)
	tp := &topo{lab: lab, a: lab.NewHost("a"), r: lab.NewHost("r"), b: lab.NewHost("b"), mtu: mtu, dir: t.TempDir()}
	netA, netB := netip.MustParsePrefix("198.18.1.0/24"), netip.MustParsePrefix("198.18.2.0/24")
	var rB netip.Addr
	tp.aAddr, tp.rAddr = lab.Link(tp.a, tp.r, netA, mtu)
	rB, tp.bAddr = lab.Link(tp.r, tp.b, netB, mtu)
	tp.r.EnableForwarding()
	tp.a.AddRoute(netB, tp.rAddr)
	tp.b.AddRoute(netA, rB)
	return tp
}

// tunnel is one way to carry iperf3 from a to b: a row of the table.
type tunnel struct {
	setup string     // row label
	dst   netip.Addr // the address iperf3 on a connects to
	// serverAddr is where iperf3 -s binds on b ("" = every address).
	serverAddr string
	procs      []*netlab.Process // the tunnel's processes, whose CPU counts
	// sockets are the meshd daemons' local API sockets (a, b), for Go
	// CPU profiles; nil for other setups.
	sockets []string
	mtu     int    // the largest IP packet it carries whole
	noUDP   string // why UDP tests do not apply; "" = they do
	stop    func()
	// check verifies after the runs that the tunnel carried the traffic;
	// res are the runs' results.
	check func(t testing.TB, res []result)
}

// raw is the underlay itself.
func (tp *topo) raw() *tunnel {
	return &tunnel{setup: "raw underlay", dst: tp.bAddr, mtu: tp.mtu, stop: func() {}, check: func(testing.TB, []result) {}}
}

// wireguardGo starts stock wireguard-go in the foreground on a and b,
// configured with wg(8) over its UAPI socket. Interface names embed our pid:
// the UAPI socket path /var/run/wireguard/NAME.sock is shared by every
// namespace.
func (tp *topo) wireguardGo(t testing.TB, bin string, mtu int) *tunnel {
	t.Helper()
	type end struct {
		h        *netlab.Host
		ifname   string
		keyFile  string
		pub      string
		tunAddr  netip.Addr
		underlay netip.Addr
		proc     *netlab.Process
	}
	pid := os.Getpid() % 100000
	ends := []*end{
		{h: tp.a, ifname: fmt.Sprintf("tpwg%da", pid), tunAddr: netip.MustParseAddr("10.201.0.1"), underlay: tp.aAddr},
		{h: tp.b, ifname: fmt.Sprintf("tpwg%db", pid), tunAddr: netip.MustParseAddr("10.201.0.2"), underlay: tp.bAddr},
	}
	for _, e := range ends {
		var priv [32]byte
		rand.Read(priv[:])
		priv[0] &= 248
		priv[31] = priv[31]&127 | 64
		pub, err := curve25519.X25519(priv[:], curve25519.Basepoint)
		if err != nil {
			t.Fatal(err)
		}
		e.pub = base64.StdEncoding.EncodeToString(pub)
		e.keyFile = filepath.Join(tp.dir, e.ifname+".key")
		if err := os.WriteFile(e.keyFile, []byte(base64.StdEncoding.EncodeToString(priv[:])+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		sock := "/var/run/wireguard/" + e.ifname + ".sock"
		os.Remove(sock) // left over by a killed run with a recycled pid
		t.Cleanup(func() { os.Remove(sock) })
		e.proc = e.h.Start(bin, "-f", e.ifname)
		waitFor(t, 15*time.Second, "wireguard-go UAPI socket "+sock, func() (bool, string) {
			if exited(e.proc) {
				t.Fatalf("wireguard-go exited:\n%s", e.proc.Output())
			}
			_, err := os.Stat(sock)
			return err == nil, fmt.Sprint(err)
		})
	}
	for i, e := range ends {
		peer := ends[1-i]
		e.h.MustRun("wg", "set", e.ifname, "listen-port", "51820", "private-key", e.keyFile,
			"peer", peer.pub, "endpoint", netip.AddrPortFrom(peer.underlay, 51820).String(), "allowed-ips", peer.tunAddr.String()+"/32")
		e.h.MustRun("ip", "addr", "add", e.tunAddr.String()+"/24", "dev", e.ifname)
		e.h.MustRun("ip", "link", "set", e.ifname, "mtu", strconv.Itoa(mtu), "up")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := tp.a.Ping(ctx, ends[1].tunAddr); err != nil {
		t.Fatalf("wireguard-go tunnel: %v", err)
	}
	return &tunnel{
		setup: fmt.Sprintf("wireguard-go, MTU %d", mtu),
		dst:   ends[1].tunAddr,
		mtu:   mtu,
		procs: []*netlab.Process{ends[0].proc, ends[1].proc},
		stop: func() {
			for _, e := range ends {
				e.proc.Stop(5 * time.Second)
			}
		},
		check: func(t testing.TB, _ []result) {
			out := tp.a.MustRun("wg", "show", ends[0].ifname, "transfer")
			if f := strings.Fields(out); len(f) != 3 || f[2] == "0" {
				t.Errorf("wireguard-go sent nothing: wg show transfer: %q", out)
			}
		},
	}
}

// benchPolicy turns the packet filter on with a real rule: bench nodes may
// reach each other on iperf3's port (TCP and UDP; ICMP is always allowed
// with a port rule), nothing else.
const benchPolicy = `// throughput lab: iperf3 only
{
	"tagOwners": {"tag:bench": []},
	"grants": [{"src": ["tag:bench"], "dst": ["tag:bench"], "ip": ["5201"]}],
}
`

// mesh is a coordinator in the router and one node identity per host; the
// nodes keep their state directories across rows so the map never fills
// with stale peers.
type mesh struct {
	tp        *topo
	coord     *netlab.Process // the coordinator, also the relay
	bin       string
	url       string
	tokenFile string
	authKey   string
	nodes     map[*netlab.Host]*meshNode
}

type meshNode struct {
	name     string
	stateDir string
	socket   string
	upDone   bool
}

func (tp *topo) startMesh(t testing.TB, bin string, policy string) *mesh {
	t.Helper()
	dir := filepath.Join(tp.dir, "coordinator")
	args := []string{"coordinator", "--listen", netip.AddrPortFrom(tp.rAddr, 8443).String(), "--state-dir", dir}
	if policy != "" {
		pf := filepath.Join(tp.dir, "policy.hujson")
		if err := os.WriteFile(pf, []byte(policy), 0o600); err != nil {
			t.Fatal(err)
		}
		args = append(args, "--policy", pf)
	}
	coord := tp.r.Start(bin, args...)
	m := &mesh{tp: tp, coord: coord, bin: bin, url: "https://" + netip.AddrPortFrom(tp.rAddr, 8443).String(), tokenFile: filepath.Join(dir, "admin.token"), nodes: map[*netlab.Host]*meshNode{}}
	var out string
	waitFor(t, 30*time.Second, "coordinator admin API", func() (bool, string) {
		if exited(coord) {
			t.Fatalf("coordinator exited:\n%s", coord.Output())
		}
		var err error
		out, err = tp.r.Run(bin, "admin", "keys", "create", "--coordinator", m.url, "--token-file", m.tokenFile, "--reusable", "--tags", "tag:bench", "--json")
		return err == nil, fmt.Sprint(err)
	})
	var k struct {
		Key string `json:"key"`
	}
	if err := json.Unmarshal([]byte(out), &k); err != nil || k.Key == "" {
		t.Fatalf("admin keys create printed %q: %v", out, err)
	}
	m.authKey = k.Key
	for name, h := range map[string]*netlab.Host{"a": tp.a, "b": tp.b} {
		if h != nil {
			m.nodes[h] = &meshNode{name: name, stateDir: filepath.Join(tp.dir, "node-"+name), socket: filepath.Join(tp.dir, name+".sock")}
		}
	}
	return m
}

// daemon starts meshd's daemon on h with extra flags, enrols it the first
// time and waits until it runs with a map.
func (m *mesh) daemon(t testing.TB, h *netlab.Host, flags ...string) *netlab.Process {
	t.Helper()
	n := m.nodes[h]
	// --resolv-conf: DNS configuration stays in the namespace, never
	// the machine's /etc/resolv.conf.
	args := append([]string{"daemon", "--state-dir", n.stateDir, "--socket", n.socket, "--resolv-conf", h.ResolvConf()}, flags...)
	p := h.Start(m.bin, args...)
	lc := localapi.NewClient(n.socket)
	waitFor(t, 20*time.Second, n.name+" daemon socket", func() (bool, string) {
		if exited(p) {
			t.Fatalf("%s daemon exited:\n%s", n.name, p.Output())
		}
		_, err := lc.Status(context.Background())
		return err == nil, fmt.Sprint(err)
	})
	if !n.upDone {
		out, err := exec.Command(m.bin, "up", "--socket", n.socket, "--authkey", m.authKey, "--coordinator", m.url, "--hostname", n.name).CombinedOutput()
		if err != nil {
			t.Fatalf("meshd up %s: %v\n%s", n.name, err, out)
		}
		n.upDone = true
	}
	return p
}

// status returns h's daemon status.
func (m *mesh) status(t testing.TB, h *netlab.Host) *localapi.Status {
	t.Helper()
	st, err := localapi.NewClient(m.nodes[h].socket).Status(context.Background())
	if err != nil {
		t.Fatalf("status of %s: %v", m.nodes[h].name, err)
	}
	return st
}

// peerPath is the path status reports for the peer with address ip.
func peerPath(st *localapi.Status, ip netip.Addr) string {
	for _, p := range st.Peers {
		if len(p.IPs) > 0 && p.IPs[0] == ip {
			return p.Path
		}
	}
	return "no such peer"
}

func ipv4Of(n *localapi.Node) netip.Addr {
	if n != nil {
		for _, ip := range n.IPs {
			if ip.Is4() {
				return ip
			}
		}
	}
	return netip.Addr{}
}

// meshdOpts selects a meshd row.
type meshdOpts struct {
	// mtu is the overlay MTU both daemons get; 0 is the daemon's automatic
	// MTU, which must come out as the underlay's minus WireGuard's 80 bytes.
	mtu int
	// netstack puts b on the netstack with a --forward to its local iperf3
	// instead of a kernel TUN.
	netstack bool
	// relay blocks direct UDP between a and b in the router, so WireGuard
	// goes through the coordinator's embedded DERP relay (TLS on the
	// coordinator's port, as deployed) while both still reach the
	// coordinator.
	relay bool
}

// meshd starts both daemons (a always on a kernel TUN; b on a kernel TUN or
// the netstack) and waits until a reaches b through the tunnel on the path
// the row measures: direct, or the relay when o.relay is set.
func (m *mesh) meshd(t testing.TB, o meshdOpts) *tunnel {
	t.Helper()
	tp := m.tp
	unblock := func() {}
	if o.relay {
		// Before the daemons start, so they never find a direct path.
		unblock = tp.blockDirectUDP(t)
	}
	mtu := o.mtu
	pa := m.daemon(t, tp.a, "--tun", "tpm0", "--mtu", strconv.Itoa(mtu))
	bFlags := []string{"--tun", "tpm0", "--mtu", strconv.Itoa(mtu)}
	label := strconv.Itoa(mtu)
	if mtu == 0 {
		var err error
		waitFor(t, 10*time.Second, "a's TUN", func() (bool, string) {
			mtu, err = tp.a.MTU("tpm0")
			return err == nil, fmt.Sprint(err)
		})
		if want := tp.mtu - 80; mtu != want {
			t.Errorf("automatic MTU on a %d-byte underlay: %d, want %d", tp.mtu, mtu, want)
		}
		label = fmt.Sprintf("%d (auto)", mtu)
	}
	setup := fmt.Sprintf("meshd kernel TUN + filter, MTU %s", label)
	if o.relay {
		setup = fmt.Sprintf("meshd kernel TUN + filter, DERP relay (TLS), MTU %s", label)
	}
	tn := &tunnel{}
	if o.netstack {
		bFlags = []string{"--tun", "userspace", "--mtu", strconv.Itoa(mtu), "--forward", "5201=127.0.0.1:5201"}
		setup = fmt.Sprintf("meshd kernel TUN -> netstack --forward, MTU %d", mtu)
		tn.serverAddr = "127.0.0.1"
		tn.noUDP = "--forward carries TCP only"
	}
	pb := m.daemon(t, tp.b, bFlags...)
	var dst netip.Addr
	waitFor(t, 30*time.Second, "a and b to see each other", func() (bool, string) {
		sa, sb := m.status(t, tp.a), m.status(t, tp.b)
		dst = ipv4Of(sb.Self)
		ok := sa.BackendState == localapi.StateRunning && sb.BackendState == localapi.StateRunning && dst.IsValid()
		found := false
		for _, p := range sa.Peers {
			found = found || (len(p.IPs) > 0 && p.IPs[0] == dst)
		}
		return ok && found, fmt.Sprintf("a %s %d peers, b %s", sa.BackendState, len(sa.Peers), sb.BackendState)
	})
	// The path works once a TCP dial to iperf3's port is answered: refused
	// (nothing listens yet on a kernel TUN) or accepted (netstack forward).
	waitFor(t, 30*time.Second, "a to reach b through meshd", func() (bool, string) {
		var c net.Conn
		err := tp.a.Do(func() (err error) {
			c, err = net.DialTimeout("tcp", netip.AddrPortFrom(dst, 5201).String(), time.Second)
			return err
		})
		if c != nil {
			c.Close()
		}
		return err == nil || errors.Is(err, syscall.ECONNREFUSED), fmt.Sprint(err)
	})
	// The magic bind starts a peer on the coordinator's embedded DERP relay
	// and moves it to the direct path when disco pings are answered. A
	// direct row starts once both ends are direct; a relay row once both
	// report the relay (with UDP between them blocked they cannot leave it).
	want := magicbind.PathDirect
	if o.relay {
		want = magicbind.PathDERP
	}
	aIP := ipv4Of(m.status(t, tp.a).Self)
	waitFor(t, 30*time.Second, "a "+want+" path both ways", func() (bool, string) {
		pa, pb := peerPath(m.status(t, tp.a), dst), peerPath(m.status(t, tp.b), aIP)
		return pa == want && pb == want, fmt.Sprintf("a->b %q, b->a %q", pa, pb)
	})
	tn.setup, tn.dst, tn.procs, tn.mtu = setup, dst, []*netlab.Process{pa, pb}, mtu
	tn.sockets = []string{m.nodes[tp.a].socket, m.nodes[tp.b].socket}
	if o.relay {
		// The relay is part of this tunnel: its CPU counts (the coordinator's
		// control work during a run is a map keepalive now and then).
		tn.procs = append(tn.procs, m.coord)
	}
	tn.stop = func() {
		pa.Stop(10 * time.Second)
		pb.Stop(10 * time.Second)
		unblock()
	}
	tn.check = func(t testing.TB, res []result) {
		for _, h := range []*netlab.Host{tp.a, tp.b} {
			if f := m.status(t, h).Filter; f != nil {
				t.Logf("%s: filter on %s: %d rules, drops in %v, out %v", setup, m.nodes[h].name, f.Rules, f.DropsIn, f.DropsOut)
			}
		}
		st := m.status(t, tp.a)
		if st.Filter == nil || st.Filter.Bootstrap || st.Filter.Rules == 0 {
			t.Errorf("meshd ran without the bench policy's filter: %+v", st.Filter)
		}
		for _, p := range st.Peers {
			if len(p.IPs) > 0 && p.IPs[0] == dst && (p.Path != want || p.TxBytes == 0) {
				t.Errorf("%s: peer b after the runs: path %q (want %q), %d bytes sent", setup, p.Path, want, p.TxBytes)
			}
		}
		if p := peerPath(m.status(t, tp.b), aIP); p != want {
			t.Errorf("%s: b's path to a after the runs: %q, want %q", setup, p, want)
		}
		if o.relay {
			tp.checkRelayCarried(t, setup, res)
		}
	}
	return tn
}

// blockDirectUDP drops UDP between a's and b's underlay addresses in the
// router, both ways, and returns a func that lifts the block. TCP and UDP
// to the router itself (the coordinator, its relay and STUN) stay open, as
// on a network that lets hosts out through a proxy-friendly firewall only.
func (tp *topo) blockDirectUDP(t testing.TB) (unblock func()) {
	t.Helper()
	rules := [][]string{
		{"FORWARD", "-p", "udp", "-s", tp.aAddr.String(), "-d", tp.bAddr.String(), "-j", "DROP"},
		{"FORWARD", "-p", "udp", "-s", tp.bAddr.String(), "-d", tp.aAddr.String(), "-j", "DROP"},
	}
	for _, r := range rules {
		tp.r.MustRun("iptables", append([]string{"-I"}, r...)...)
	}
	return func() {
		for _, r := range rules {
			if out, err := tp.r.Run("iptables", append([]string{"-D"}, r...)...); err != nil {
				t.Errorf("lifting the UDP block in the router: %v\n%s", err, out)
			}
		}
	}
}

// checkRelayCarried verifies that what iperf3 delivered in res went through
// the relay: a's TCP connections to the coordinator's port (the relay and
// the control stream) must have had at least that many bytes acknowledged,
// and b's must have received at least that many. Both are cumulative over
// the connections' lives, so a relay connection that was replaced during
// the runs fails the check too (its bytes are gone with it), which is
// worth knowing about a relayed figure.
func (tp *topo) checkRelayCarried(t testing.TB, setup string, res []result) {
	t.Helper()
	var delivered int64
	for _, r := range res {
		delivered += r.bytes
	}
	if delivered == 0 {
		t.Errorf("%s: iperf3 delivered nothing", setup)
		return
	}
	relay := netip.AddrPortFrom(tp.rAddr, 8443)
	for _, side := range []struct {
		name string
		h    *netlab.Host
		sent bool
	}{{"a", tp.a, true}, {"b", tp.b, false}} {
		out, err := side.h.Run("ss", "-Htin", "state", "established", "dst", relay.String())
		if err != nil {
			t.Errorf("%s: ss on %s: %v\n%s", setup, side.name, err, out)
			continue
		}
		st, err := parseSSInfo(out)
		if err != nil {
			t.Errorf("%s: ss on %s: %v", setup, side.name, err)
			continue
		}
		got, what := st.bytesReceived, "received from"
		if side.sent {
			got, what = st.bytesAcked, "sent (acknowledged) to"
		}
		t.Logf("%s: %s's %d TCP connections to %s: %d bytes %s it, iperf3 delivered %d", setup, side.name, st.conns, relay, got, what, delivered)
		if got < delivered {
			t.Errorf("%s: %s %s the relay %s only %d bytes over TCP, but iperf3 delivered %d through the tunnel: the traffic did not go through the relay (or its connection was replaced mid-run)",
				setup, side.name, what, relay, got, delivered)
		}
	}
}

// ssInfo is what the lab takes from `ss -tin`: totals over the listed
// connections.
type ssInfo struct {
	conns                     int
	bytesAcked, bytesReceived int64
}

// parseSSInfo sums bytes_acked and bytes_received over the connections
// `ss -Htin` lists. Each connection is one line with its addresses and,
// with -i, one indented line of "key:value" pairs; a connection that has
// not sent or received anything lacks the field, which counts as 0.
func parseSSInfo(out string) (ssInfo, error) {
	var st ssInfo
	for line := range strings.Lines(out) {
		if strings.TrimSpace(line) == "" {
			continue
		}
		if line[0] != ' ' && line[0] != '\t' {
			st.conns++
			continue
		}
		if st.conns == 0 {
			return ssInfo{}, fmt.Errorf("ss: info line %q before any connection line", strings.TrimSpace(line))
		}
		for _, f := range strings.Fields(line) {
			k, v, ok := strings.Cut(f, ":")
			if !ok || (k != "bytes_acked" && k != "bytes_received") {
				continue
			}
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil || n < 0 {
				return ssInfo{}, fmt.Errorf("ss: %s %q is not a byte count", k, v)
			}
			sum := &st.bytesAcked
			if k == "bytes_received" {
				sum = &st.bytesReceived
			}
			if *sum+n < *sum {
				return ssInfo{}, fmt.Errorf("ss: %s total overflows", k)
			}
			*sum += n
		}
	}
	return st, nil
}

// rowNames are the rows in the order they run; -rows picks a subset.
var rowNames = []string{"raw", "wireguard-go", "meshd-1280", "meshd-auto", "meshd-netstack", "meshd-derp"}

// parseRows turns -rows into the set of row names, every row when s is
// empty.
func parseRows(s string) (map[string]bool, error) {
	want := map[string]bool{}
	if strings.TrimSpace(s) == "" {
		for _, n := range rowNames {
			want[n] = true
		}
		return want, nil
	}
	for _, n := range strings.Split(s, ",") {
		n = strings.TrimSpace(n)
		if !slices.Contains(rowNames, n) {
			return nil, fmt.Errorf("-rows: unknown row %q; rows are %s", n, strings.Join(rowNames, ","))
		}
		want[n] = true
	}
	return want, nil
}

// test is one iperf3 measurement: a column of the table.
type test struct {
	name     string
	parallel int // TCP streams; 0 for UDP
	// udpSize is the size of the IP packets of a UDP test (the payload
	// is 28 bytes less: IPv4 and UDP headers); 0 for TCP.
	udpSize int
}

// udpHeaders is what IPv4 and UDP add to an iperf3 -l payload.
const udpHeaders = 28

var (
	tcp1    = test{name: "TCP 1 stream", parallel: 1}
	tcp4    = test{name: "TCP 4 streams", parallel: 4}
	udp1280 = test{name: "UDP 1,280 B packets", udpSize: 1280}
	udp8920 = test{name: "UDP 8,920 B packets", udpSize: 8920}
)

// result is one measurement.
type result struct {
	underlay int
	setup    string
	test     test
	bytes    int64   // received by the iperf3 server
	seconds  float64 // receiver's interval
	cpu      float64 // CPU seconds of the tunnel's processes, both ends
	hostCPU  float64 // busy CPU seconds of the whole machine
	skipped  string  // why the test does not apply
	err      error
}

func (r result) gbps() float64 {
	if r.seconds <= 0 {
		return 0
	}
	return float64(r.bytes) * 8 / r.seconds / 1e9
}

func (r result) pps() float64 {
	if r.seconds <= 0 || r.test.udpSize == 0 {
		return 0
	}
	return float64(r.bytes) / float64(r.test.udpSize-udpHeaders) / r.seconds
}

// cpuPerGB is CPU seconds per 10^9 bytes delivered; 0 when unknown.
func cpuPerGB(cpu float64, bytes int64) float64 {
	if bytes <= 0 {
		return 0
	}
	return cpu / (float64(bytes) / 1e9)
}

// measure runs every test over tn, one after another, with an iperf3
// server on b, and returns one result per test. around, if not nil, is
// called before each test and the func it returns after it (profiling).
func (tp *topo) measure(t testing.TB, tn *tunnel, tests []test, d time.Duration, around func(test) func()) []result {
	t.Helper()
	srv := []string{"-s", "-p", "5201"}
	if tn.serverAddr != "" {
		srv = append(srv, "-B", tn.serverAddr)
	}
	server := tp.b.Start("iperf3", srv...)
	defer server.Kill()
	waitFor(t, 10*time.Second, "iperf3 server to listen", func() (bool, string) {
		if exited(server) {
			t.Fatalf("iperf3 -s exited:\n%s", server.Output())
		}
		out, err := tp.b.Run("ss", "-Hltn", "sport = :5201")
		return err == nil && strings.Contains(out, "LISTEN"), fmt.Sprintf("ss: %q %v", out, err)
	})
	var out []result
	for _, tc := range tests {
		r := result{underlay: tp.mtu, setup: tn.setup, test: tc}
		if tc.udpSize > 0 && tn.noUDP != "" {
			r.skipped = tn.noUDP
			out = append(out, r)
			continue
		}
		if tc.udpSize > tn.mtu {
			// It would measure IP fragmentation and reassembly, which
			// under a -b 0 flood stalls (see bench/throughput.md).
			r.skipped = fmt.Sprintf("packets larger than the MTU (%d)", tn.mtu)
			out = append(out, r)
			continue
		}
		after := func() {}
		if around != nil {
			after = around(tc)
		}
		r.bytes, r.seconds, r.cpu, r.hostCPU, r.err = tp.runIperf(tn, tc, d)
		after()
		if r.err != nil {
			t.Logf("%s, %s: %v\niperf3 server:\n%s", tn.setup, tc.name, r.err, server.Output())
		}
		out = append(out, r)
	}
	return out
}

// runIperf runs one iperf3 client on a and returns what the server
// received and the CPU seconds the tunnel and the machine used meanwhile.
func (tp *topo) runIperf(tn *tunnel, tc test, d time.Duration) (received int64, seconds, cpu, hostCPU float64, err error) {
	secs := max(1, int(d.Round(time.Second)/time.Second))
	args := []string{"-c", tn.dst.String(), "-p", "5201", "-J", "-t", strconv.Itoa(secs), "--connect-timeout", "5000"}
	if tc.udpSize > 0 {
		args = append(args, "-u", "-b", "0", "-l", strconv.Itoa(tc.udpSize-udpHeaders))
	} else {
		args = append(args, "-P", strconv.Itoa(tc.parallel))
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(secs)*time.Second+30*time.Second)
	defer cancel()
	cpu0, err := procsCPU(tn.procs)
	if err != nil {
		return 0, 0, 0, 0, err
	}
	host0, err := hostBusy()
	if err != nil {
		return 0, 0, 0, 0, err
	}
	var stdout, stderr bytes.Buffer
	cmd := tp.a.Command(ctx, "iperf3", args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	runErr := cmd.Run()
	cpu1, err := procsCPU(tn.procs)
	if err != nil {
		return 0, 0, 0, 0, err
	}
	host1, err := hostBusy()
	if err != nil {
		return 0, 0, 0, 0, err
	}
	rep, perr := parseIperf(stdout.Bytes())
	if perr != nil {
		return 0, 0, 0, 0, fmt.Errorf("iperf3 %s: %w (exit: %v; stderr: %s)", strings.Join(args, " "), perr, runErr, bytes.TrimSpace(stderr.Bytes()))
	}
	return rep.bytes, rep.seconds, cpu1 - cpu0, host1 - host0, nil
}

// iperfReport is what the lab takes from iperf3's JSON: the receiver's
// totals.
type iperfReport struct {
	bytes   int64
	seconds float64
}

// parseIperf reads iperf3 -J output (TCP or UDP). An iperf3 error is
// returned as an error.
func parseIperf(b []byte) (iperfReport, error) {
	var v struct {
		Error string `json:"error"`
		End   struct {
			SumReceived *struct {
				Bytes   float64 `json:"bytes"`
				Seconds float64 `json:"seconds"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal(b, &v); err != nil {
		return iperfReport{}, fmt.Errorf("iperf3 JSON: %w", err)
	}
	if v.Error != "" {
		return iperfReport{}, fmt.Errorf("iperf3: %s", v.Error)
	}
	s := v.End.SumReceived
	if s == nil {
		return iperfReport{}, errors.New("iperf3 JSON has no end.sum_received (iperf3 older than 3.1?)")
	}
	if s.Bytes < 0 || s.Bytes > 1<<62 || s.Seconds < 0 || s.Seconds > 1e6 || s.Seconds != s.Seconds {
		return iperfReport{}, fmt.Errorf("iperf3 JSON: implausible receiver totals: %v bytes in %v s", s.Bytes, s.Seconds)
	}
	return iperfReport{bytes: int64(s.Bytes), seconds: s.Seconds}, nil
}

// clockTicks is USER_HZ, the unit of /proc CPU times: 100 on every Linux
// architecture Go supports (the kernel fixes it for the ABI).
const clockTicks = 100

// procsCPU sums utime+stime of the processes, in seconds.
func procsCPU(procs []*netlab.Process) (float64, error) {
	var sum float64
	for _, p := range procs {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.Cmd.Process.Pid))
		if err != nil {
			return 0, fmt.Errorf("CPU time of %s: %w", p.Name, err)
		}
		ticks, err := parseProcStat(b)
		if err != nil {
			return 0, fmt.Errorf("CPU time of %s: %w", p.Name, err)
		}
		sum += float64(ticks) / clockTicks
	}
	return sum, nil
}

// parseProcStat returns utime+stime (fields 14 and 15, in clock ticks)
// from /proc/PID/stat. The command name (field 2) may hold spaces and
// parentheses, so fields are counted from its last ')'.
func parseProcStat(b []byte) (uint64, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("/proc/PID/stat: no ')' after the command name")
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state); utime is field 14, stime 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/PID/stat: %d fields after the command name, want at least 13", len(f))
	}
	u, err := strconv.ParseUint(f[11], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("/proc/PID/stat utime: %w", err)
	}
	s, err := strconv.ParseUint(f[12], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("/proc/PID/stat stime: %w", err)
	}
	if u+s < u {
		return 0, errors.New("/proc/PID/stat: utime+stime overflows")
	}
	return u + s, nil
}

// hostBusy returns the machine's busy CPU seconds so far (every CPU, all
// but idle and iowait), from /proc/stat. It includes iperf3, the kernel's
// packet processing, and anything else running.
func hostBusy() (float64, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	ticks, err := parseCPULine(b)
	if err != nil {
		return 0, err
	}
	return float64(ticks) / clockTicks, nil
}

// parseCPULine returns the busy ticks of /proc/stat's aggregate "cpu" line:
// user+nice+system+irq+softirq+steal (guest time is already in user).
func parseCPULine(b []byte) (uint64, error) {
	line, _, _ := bytes.Cut(b, []byte("\n"))
	f := strings.Fields(string(line))
	if len(f) < 9 || f[0] != "cpu" {
		return 0, fmt.Errorf("/proc/stat: first line %q is not the aggregate cpu line", line)
	}
	var busy uint64
	for i, v := range f[1:9] {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/stat cpu field %d: %w", i+1, err)
		}
		if i == 3 || i == 4 { // idle, iowait
			continue
		}
		if busy+n < busy {
			return 0, errors.New("/proc/stat: busy ticks overflow")
		}
		busy += n
	}
	return busy, nil
}

// procRSS returns VmRSS of pid in bytes.
func procRSS(pid int) (int64, error) { return procStatusKB(pid, "VmRSS:") }

// procStatusKB returns a "kB" field of /proc/PID/status (VmRSS:, VmHWM:)
// in bytes.
func procStatusKB(pid int, field string) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, field); ok {
			f := strings.Fields(v)
			if len(f) != 2 || f[1] != "kB" {
				return 0, fmt.Errorf("/proc/%d/status: line %q", pid, line)
			}
			kb, err := strconv.ParseInt(f[0], 10, 64)
			if err != nil {
				return 0, fmt.Errorf("/proc/%d/status %s %w", pid, field, err)
			}
			return kb * 1024, nil
		}
	}
	return 0, fmt.Errorf("/proc/%d/status has no %s", pid, field)
}

// contextSwitches sums voluntary and involuntary context switches over
// every thread of pid: how often the process woke up.
func contextSwitches(pid int) (uint64, error) {
	dirs, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/status", pid))
	if err != nil || len(dirs) == 0 {
		return 0, fmt.Errorf("threads of %d: %v", pid, err)
	}
	var sum uint64
	for _, d := range dirs {
		b, err := os.ReadFile(d)
		if err != nil {
			continue // the thread exited
		}
		for line := range strings.Lines(string(b)) {
			if v, ok := strings.CutPrefix(line, "voluntary_ctxt_switches:"); ok {
				n, _ := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
				sum += n
			} else if v, ok := strings.CutPrefix(line, "nonvoluntary_ctxt_switches:"); ok {
				n, _ := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
				sum += n
			}
		}
	}
	return sum, nil
}

// printTable writes the results as a Markdown table with, on meshd rows,
// the ratio to wireguard-go's same test on the same underlay.
func printTable(w io.Writer, results []result) {
	fmt.Fprintln(w, "| underlay MTU | setup | test | throughput | tunnel CPU s/GB | machine CPU s/GB | meshd / wireguard-go: throughput, CPU per GB |")
	fmt.Fprintln(w, "|---:|---|---|---:|---:|---:|---|")
	for _, r := range results {
		thr, cpu, host, ratio := "", "", "", ""
		switch {
		case r.skipped != "":
			thr = "n/a: " + r.skipped
		case r.err != nil:
			thr = "failed: " + strings.ReplaceAll(firstLine(r.err.Error()), "|", "/")
		default:
			thr = fmt.Sprintf("%.2f Gbit/s", r.gbps())
			if r.test.udpSize > 0 {
				thr = fmt.Sprintf("%.1f kpps (%.2f Gbit/s)", r.pps()/1e3, r.gbps())
			}
			if c := cpuPerGB(r.cpu, r.bytes); c > 0 {
				cpu = fmt.Sprintf("%.2f", c)
			}
			host = fmt.Sprintf("%.2f", cpuPerGB(r.hostCPU, r.bytes))
			if strings.HasPrefix(r.setup, "meshd") {
				if wg, ok := find(results, r.underlay, "wireguard-go", r.test); ok && wg.gbps() > 0 {
					ratio = fmt.Sprintf("%.2fx", r.gbps()/wg.gbps())
					if a, b := cpuPerGB(r.cpu, r.bytes), cpuPerGB(wg.cpu, wg.bytes); a > 0 && b > 0 {
						ratio += fmt.Sprintf(", %.2fx", a/b)
					}
				}
			}
		}
		fmt.Fprintf(w, "| %d | %s | %s | %s | %s | %s | %s |\n", r.underlay, r.setup, r.test.name, thr, cpu, host, ratio)
	}
}

// find returns the successful result on underlay whose setup starts with
// prefix, for test tc.
func find(results []result, underlay int, prefix string, tc test) (result, bool) {
	for _, r := range results {
		if r.underlay == underlay && strings.HasPrefix(r.setup, prefix) && r.test == tc && r.err == nil && r.skipped == "" {
			return r, true
		}
	}
	return result{}, false
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(s, "\n")
	return l
}

func exited(p *netlab.Process) bool {
	select {
	case <-p.Done():
		return true
	default:
		return false
	}
}

func waitFor(t testing.TB, d time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		ok, detail := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s: %s", d, what, detail)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
