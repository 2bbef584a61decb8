package e2e

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http/httptest"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/control"
	"meshd.dev/meshd/derp"
	"meshd.dev/meshd/internal/netlab"
	"meshd.dev/meshd/internal/tlspin"
	"meshd.dev/meshd/nat/stun"
	"meshd.dev/meshd/netmap"
)

// natLab is two sites, each one node behind its own NAT router, and an
// "internet" segment with the coordinator, a DERP relay and a STUN server
// (run in this test process, their sockets inside the internet host's
// namespace).
type natLab struct {
	e      *env
	lab    *netlab.Lab
	relay  *labRelay
	sites  [2]*netlab.Site // sites[1] == sites[0] with sameSite
	hosts  [2]*netlab.Host
	nodes  [2]*node
	status [2]*localapi.Status
}

// natLabOptions shapes a natLab.
type natLabOptions struct {
	nat [2]netlab.NAT
	// sameSite puts both nodes on the first site's LAN, behind one NAT.
	sameSite bool
	// beforeUp runs after the sites exist and before the nodes start.
	beforeUp func(nl *natLab)
}

const (
	inetAddr = "198.18.0.1"
	derpPort = 443
)

func newNATLab(t *testing.T, natA, natB netlab.NAT) *natLab {
	return newNATLabWith(t, natLabOptions{nat: [2]netlab.NAT{natA, natB}})
}

func newNATLabWith(t *testing.T, o natLabOptions) *natLab {
	lab := netlab.New(t)
	e := &env{t: t, bin: buildMeshd(t), dir: t.TempDir()}
	inet := lab.NewSegment("inet", netip.MustParsePrefix("198.18.0.0/24"))
	srv := lab.NewHost("srv")
	if got := srv.Attach(inet); got.String() != inetAddr {
		t.Fatalf("server host got %v, want %s", got, inetAddr)
	}
	relay := startLabRelay(t, srv)
	key := startLabCoordinator(t, e, srv, relay.derpMap())

	nl := &natLab{e: e, lab: lab, relay: relay}
	for i, nat := range o.nat {
		name := fmt.Sprintf("n%d", i+1)
		if o.sameSite && i == 1 {
			nl.sites[1] = nl.sites[0]
			nl.hosts[1] = lab.NewHost(name)
			nl.hosts[1].AttachToSite(nl.sites[1])
			continue
		}
		nl.sites[i] = lab.NewSite("site"+name, inet, netip.MustParsePrefix(fmt.Sprintf("10.%d.0.0/24", i+1)), nat)
		nl.hosts[i] = lab.NewHost(name)
		nl.hosts[i].AttachToSite(nl.sites[i])
	}
	if o.beforeUp != nil {
		o.beforeUp(nl)
	}
	for i := range nl.nodes {
		nl.nodes[i] = e.newNode(fmt.Sprintf("n%d", i+1), nl.hosts[i], "--tun", "meshd0")
		e.startDaemon(nl.nodes[i])
		e.up(nl.nodes[i], key)
	}
	e.waitPeers(nl.nodes[0], "n2")
	e.waitPeers(nl.nodes[1], "n1")
	for i := range nl.nodes {
		nl.status[i] = e.status(nl.nodes[i])
	}
	return nl
}

// labRelay is a DERP relay (TLS, pinned certificate) and a STUN server on
// the internet host.
type labRelay struct {
	t    *testing.T
	h    *netlab.Host
	cert tls.Certificate
	key  netmap.NodePrivate
	ds   *derp.Server
	hs   *httptest.Server
}

func startLabRelay(t *testing.T, h *netlab.Host) *labRelay {
	cert, err := derp.NewSelfSignedCert([]string{inetAddr})
	if err != nil {
		t.Fatal(err)
	}
	r := &labRelay{t: t, h: h, cert: cert, key: netmap.NewNodePrivate()}
	var ss *stun.Server
	if err := h.Do(func() (err error) { ss, err = stun.Listen(inetAddr+":3478", nil); return }); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); ss.Serve(ctx) }()
	r.start()
	t.Cleanup(func() { cancel(); <-done; r.stop() })
	return r
}

// start serves the relay (again, after stop: same key and certificate, as
// a relay restarted with its state dir).
func (r *labRelay) start() {
	ds, err := derp.NewServer(derp.ServerOptions{PrivateKey: r.key, KeepAlive: 5 * time.Second})
	if err != nil {
		r.t.Fatal(err)
	}
	var ln net.Listener
	if err := r.h.Do(func() (err error) { ln, err = net.Listen("tcp", fmt.Sprintf("%s:%d", inetAddr, derpPort)); return }); err != nil {
		r.t.Fatal(err)
	}
	hs := httptest.NewUnstartedServer(ds)
	hs.Listener.Close()
	hs.Listener = ln
	hs.Config.ErrorLog = log.New(io.Discard, "", 0)
	hs.TLS = &tls.Config{Certificates: []tls.Certificate{r.cert}, NextProtos: []string{"http/1.1"}}
	hs.StartTLS()
	r.ds, r.hs = ds, hs
}

func (r *labRelay) stop() {
	if r.ds != nil {
		r.ds.Close()
		r.hs.Close()
		r.ds, r.hs = nil, nil
	}
}

func (r *labRelay) derpMap() *netmap.DERPMap {
	return &netmap.DERPMap{Regions: []netmap.DERPRegion{{ID: 1, Code: "lab", Nodes: []netmap.DERPNode{{
		Name: "1a", Host: inetAddr, DERPPort: derpPort, STUNPort: 3478, CertFingerprint: tlspin.Fingerprint(r.cert.Leaf),
	}}}}}
}

// startLabCoordinator runs the coordinator on the internet host with the
// DERP map and returns a reusable auth key.
func startLabCoordinator(t *testing.T, e *env, h *netlab.Host, dm *netmap.DERPMap) string {
	ctx := context.Background()
	srv, err := control.NewServer(ctx, control.ServerOptions{
		StateDir: filepath.Join(e.dir, "coordinator"), Logger: slog.New(slog.DiscardHandler), DERPMap: dm,
	})
	if err != nil {
		t.Fatal(err)
	}
	var ln net.Listener
	if err := h.Do(func() (err error) { ln, err = net.Listen("tcp", inetAddr+":8443"); return }); err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { ln.Close(); srv.Close() })
	e.coordURL = "https://" + inetAddr + ":8443"
	key, _, err := srv.CreateAuthKey(ctx, control.AuthKeyOptions{Reusable: true, Preauthorized: true, Tags: []string{"tag:e2e"}})
	if err != nil {
		t.Fatal(err)
	}
	return key
}

// peerOf returns the status entry of n's only peer.
func (nl *natLab) peerOf(i int) localapi.Peer {
	st := nl.e.status(nl.nodes[i])
	if len(st.Peers) != 1 {
		nl.e.t.Fatalf("%s has %d peers, want 1", nl.nodes[i].name, len(st.Peers))
	}
	return st.Peers[0]
}

// waitPath waits until node i reports path for its peer (activity keeps
// the path probed: a ping through the tunnel every round).
func (nl *natLab) waitPath(i int, path string, within time.Duration) localapi.Peer {
	nl.e.t.Helper()
	var p localapi.Peer
	peerIP := ipv4Of(nl.status[1-i])
	waitFor(nl.e.t, within, fmt.Sprintf("%s path %s", nl.nodes[i].name, path), func() (bool, string) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		nl.hosts[i].Ping(ctx, peerIP)
		cancel()
		p = nl.peerOf(i)
		return p.Path == path, fmt.Sprintf("path %q endpoint %q", p.Path, p.Endpoint)
	})
	return p
}

// serveSHAOn starts a SHA server on node i's tailnet address.
func (nl *natLab) serveSHAOn(i int) netip.AddrPort {
	nl.e.t.Helper()
	ap := netip.AddrPortFrom(ipv4Of(nl.status[i]), 5201)
	var ln net.Listener
	if err := nl.hosts[i].Do(func() (err error) { ln, err = net.Listen("tcp", ap.String()); return }); err != nil {
		nl.e.t.Fatal(err)
	}
	nl.e.t.Cleanup(func() { ln.Close() })
	go serveSHA(ln)
	return ap
}

// dialFrom opens a TCP connection from node i through the tunnel.
func (nl *natLab) dialFrom(i int, to netip.AddrPort) net.Conn {
	nl.e.t.Helper()
	var c net.Conn
	if err := nl.hosts[i].Do(func() (err error) {
		// Generous: when both sides' first handshakes cross, wireguard-go
		// may need a rekey (about 15 s) before the session works.
		d := net.Dialer{Timeout: 45 * time.Second}
		c, err = d.Dial("tcp", to.String())
		return
	}); err != nil {
		nl.e.t.Fatalf("dial %v from %s: %v", to, nl.nodes[i].name, err)
	}
	return c
}

// TestNATBothEasy: both sites behind MASQUERADE (endpoint-independent
// mapping, address-and-port filtering): disco with call-me-maybe through
// the relay opens both NATs and the path becomes direct between the
// routers' public addresses.
func TestNATBothEasy(t *testing.T) {
	t.Parallel()
	nl := newNATLab(t, netlab.EasyNAT, netlab.EasyNAT)
	srv := nl.serveSHAOn(1)
	if err := transfer(nl.dialFrom(0, srv)); err != nil {
		t.Fatalf("transfer n1 -> n2: %v", err)
	}
	for i := range nl.nodes {
		p := nl.waitPath(i, "direct", 30*time.Second)
		wan := nl.sites[1-i].WANAddr
		if ap, err := netip.ParseAddrPort(p.Endpoint); err != nil || ap.Addr() != wan {
			t.Errorf("%s: direct endpoint %q, want the peer router's public %v", nl.nodes[i].name, p.Endpoint, wan)
		}
	}
	if err := transfer(nl.dialFrom(0, srv)); err != nil {
		t.Fatalf("transfer over the direct path: %v", err)
	}
	out, err := nl.e.cli(nl.nodes[0], "ping", "n2")
	if err != nil || !strings.Contains(out, "pong from n2 ("+ipv4Of(nl.status[1]).String()+") via "+nl.sites[1].WANAddr.String()+":") {
		t.Errorf("meshd ping n2: %v\n%s", err, out)
	}
}

// TestNATBothHard: both sites behind --random-fully (a symmetric NAT: the
// port changes per destination), so no direct path exists; traffic flows
// through the relay and status says so.
func TestNATBothHard(t *testing.T) {
	t.Parallel()
	nl := newNATLab(t, netlab.HardNAT, netlab.HardNAT)
	srv := nl.serveSHAOn(1)
	if err := transfer(nl.dialFrom(0, srv)); err != nil {
		t.Fatalf("transfer n1 -> n2 through the relay: %v", err)
	}
	for i := range nl.nodes {
		p := nl.waitPath(i, "derp", 10*time.Second)
		if p.Endpoint != "derp:lab" || p.TxBytes == 0 {
			t.Errorf("%s: peer %+v, want relayed through derp:lab with traffic", nl.nodes[i].name, p)
		}
	}
	// Through a few rounds of probing (every 5 s while relayed), the path
	// stays relayed: a pong that cannot happen never makes it direct.
	for end := time.Now().Add(6 * time.Second); time.Now().Before(end); time.Sleep(500 * time.Millisecond) {
		if p := nl.peerOf(0); p.Path != "derp" {
			t.Fatalf("n1 path %q while probing, want derp", p.Path)
		}
	}
	out, err := nl.e.cli(nl.nodes[0], "ping", "-c", "2", "n2")
	if err == nil || !strings.Contains(out, "via DERP(lab)") || !strings.Contains(out, "direct connection not established") {
		t.Errorf("meshd ping n2 through symmetric NATs: err %v\n%s", err, out)
	}
}

// TestNATDirectPathCut: a transfer starts on the direct path; the path is
// cut (iptables DROP of UDP at one router, TCP to the relay still open) in
// the middle; traffic falls back to DERP and the same TCP connection
// completes.
func TestNATDirectPathCut(t *testing.T) {
	t.Parallel()
	nl := newNATLab(t, netlab.EasyNAT, netlab.EasyNAT)
	srv := nl.serveSHAOn(1)
	nl.waitPath(0, "direct", 30*time.Second)

	c := nl.dialFrom(0, srv)
	defer c.Close()
	c.SetDeadline(time.Now().Add(90 * time.Second))
	data := make([]byte, 16<<20)
	for i := range data {
		data[i] = byte(i*7 + i>>13)
	}
	if _, err := c.Write(data[:1<<20]); err != nil {
		t.Fatalf("write before the cut: %v", err)
	}
	nl.sites[0].Router.MustRun("iptables", "-I", "FORWARD", "-p", "udp", "-j", "DROP")
	cut := time.Now()
	if _, err := c.Write(data[1<<20:]); err != nil {
		t.Fatalf("write after the cut: %v", err)
	}
	c.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read digest after the cut: %v", err)
	}
	if want := sha256.Sum256(data); string(got) != string(want[:]) {
		t.Fatalf("digest mismatch after the cut")
	}
	t.Logf("transfer completed %v after the cut", time.Since(cut).Round(time.Millisecond))
	for i := range nl.nodes {
		if p := nl.peerOf(i); p.Path != "derp" {
			t.Errorf("%s: path %q after the cut, want derp", nl.nodes[i].name, p.Path)
		}
	}
}

// TestNATHardToForwarded: one side symmetric (--random-fully), the other a
// MASQUERADE router forwarding the node's WireGuard port (iptables DNAT, a
// full-cone NAT for that port): the symmetric side's pings get through,
// the forwarded side learns its mapping from them, and both go direct.
func TestNATHardToForwarded(t *testing.T) {
	t.Parallel()
	nl := newNATLabWith(t, natLabOptions{nat: [2]netlab.NAT{netlab.HardNAT, netlab.EasyNAT}, beforeUp: func(nl *natLab) {
		nl.sites[1].Router.MustRun("iptables", "-t", "nat", "-A", "PREROUTING", "-i", "eth0", "-p", "udp", "--dport", "41641",
			"-j", "DNAT", "--to-destination", nl.hosts[1].Addrs()[0].Addr().String()+":41641")
	}})
	srv := nl.serveSHAOn(1)
	if err := transfer(nl.dialFrom(0, srv)); err != nil {
		t.Fatalf("transfer: %v", err)
	}
	p := nl.waitPath(0, "direct", 30*time.Second)
	if want := netip.AddrPortFrom(nl.sites[1].WANAddr, 41641).String(); p.Endpoint != want {
		t.Errorf("n1 direct endpoint %q, want the forwarded port %s", p.Endpoint, want)
	}
	p = nl.waitPath(1, "direct", 30*time.Second)
	if ap, err := netip.ParseAddrPort(p.Endpoint); err != nil || ap.Addr() != nl.sites[0].WANAddr {
		t.Errorf("n2 direct endpoint %q, want n1's router %v", p.Endpoint, nl.sites[0].WANAddr)
	}
	if err := transfer(nl.dialFrom(0, srv)); err != nil {
		t.Fatalf("transfer over the direct path: %v", err)
	}
}

// TestNATUDPBlocked: one site lets no UDP out at all (only TCP): STUN
// fails there, the node still gets a home relay, and traffic flows over
// DERP on TCP.
func TestNATUDPBlocked(t *testing.T) {
	t.Parallel()
	nl := newNATLabWith(t, natLabOptions{nat: [2]netlab.NAT{netlab.EasyNAT, netlab.EasyNAT}, beforeUp: func(nl *natLab) {
		nl.sites[0].Router.MustRun("iptables", "-I", "FORWARD", "-p", "udp", "-j", "DROP")
	}})
	srv := nl.serveSHAOn(1)
	if err := transfer(nl.dialFrom(0, srv)); err != nil {
		t.Fatalf("transfer with UDP blocked: %v", err)
	}
	for i := range nl.nodes {
		if p := nl.waitPath(i, "derp", 10*time.Second); p.Endpoint != "derp:lab" {
			t.Errorf("%s: endpoint %q, want derp:lab", nl.nodes[i].name, p.Endpoint)
		}
	}
}

// TestNATSameSite: two nodes behind one NAT talk directly over their LAN
// addresses, not through the router.
func TestNATSameSite(t *testing.T) {
	t.Parallel()
	nl := newNATLabWith(t, natLabOptions{nat: [2]netlab.NAT{netlab.HardNAT, netlab.HardNAT}, sameSite: true})
	srv := nl.serveSHAOn(1)
	if err := transfer(nl.dialFrom(0, srv)); err != nil {
		t.Fatalf("transfer: %v", err)
	}
	for i := range nl.nodes {
		p := nl.waitPath(i, "direct", 30*time.Second)
		want := netip.AddrPortFrom(nl.hosts[1-i].Addrs()[0].Addr(), 41641).String()
		if p.Endpoint != want {
			t.Errorf("%s: direct endpoint %q, want the peer's LAN address %s", nl.nodes[i].name, p.Endpoint, want)
		}
	}
}

// TestNATRelayRestart: with both sides symmetric the relay is the only
// path; it restarts, and the nodes reconnect and traffic flows again.
func TestNATRelayRestart(t *testing.T) {
	t.Parallel()
	nl := newNATLab(t, netlab.HardNAT, netlab.HardNAT)
	srv := nl.serveSHAOn(1)
	if err := transfer(nl.dialFrom(0, srv)); err != nil {
		t.Fatalf("transfer before the restart: %v", err)
	}
	nl.relay.stop()
	waitFor(t, 20*time.Second, "nodes to notice the relay is gone", func() (bool, string) {
		p := nl.peerOf(0)
		return p.Path == "none", p.Path
	})
	nl.relay.start()
	for i := range nl.nodes {
		nl.waitPath(i, "derp", 30*time.Second)
	}
	if err := transfer(nl.dialFrom(0, srv)); err != nil {
		t.Fatalf("transfer after the restart: %v", err)
	}
}
