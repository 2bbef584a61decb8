package e2e

import (
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/internal/netlab"
)

// TestMTUMultiNIC: a GPU server g has a 9000-byte data fabric to peer f, a
// 1500-byte management NIC to m (the coordinator's host and a peer), and
// another tunnel of 1420 with a global address. Its overlay MTU must be
// 8920, decided by the fabric, because that is where the peers are; not
// 1420 from the management NIC or 1340 from the other tunnel. g starts
// first, when only the coordinator (behind the management NIC) is known,
// and its kernel TUN follows to 8920 once the fabric peer appears. Both
// the jumbo path and the smaller one carry traffic.
//
//	f --9000 fabric-- g --1500 mgmt-- m (coordinator)
func TestMTUMultiNIC(t *testing.T) {
	t.Parallel()
	lab := netlab.New(t)
	e := &env{t: t, bin: buildMeshd(t), dir: t.TempDir()}
	g, f, m := lab.NewHost("g"), lab.NewHost("f"), lab.NewHost("m")
	netFabric, netMgmt := netip.MustParsePrefix("198.18.10.0/24"), netip.MustParsePrefix("198.18.20.0/24")
	gF, _ := lab.Link(g, f, netFabric, 9000) // g eth0, f eth0
	gM, mG := lab.Link(g, m, netMgmt, 1500)  // g eth1, m eth0
	// f and m reach each other through g, which routes between its NICs.
	g.EnableForwarding()
	f.AddRoute(netip.Prefix{}, gF)
	m.AddRoute(netFabric, gM)
	// Another tunnel on g (say a site VPN) with a global address and a
	// smaller MTU: it carries none of meshd's traffic.
	g.MustRun("ip", "tuntap", "add", "dev", "vpn0", "mode", "tun")
	g.MustRun("ip", "link", "set", "vpn0", "mtu", "1420", "up")
	g.MustRun("ip", "addr", "add", "10.200.0.1/24", "dev", "vpn0")

	key := startPMTUCoordinator(t, e, m, mG)
	nodes := map[string]*node{}
	for _, h := range []*netlab.Host{g, f, m} {
		n := e.newNode(h.Name, h, "--tun", "meshd0")
		nodes[h.Name] = n
		e.startDaemon(n)
		e.up(n, key)
		if h == g {
			// Only the coordinator is known: its route is the management NIC.
			if st := e.status(n); st.MTU == nil || st.MTU.MTU != 1420 || st.MTU.Interface != "eth1" {
				t.Fatalf("g alone: mtu %+v, want 1420 from eth1 (the route to the coordinator)", st.MTU)
			}
		}
	}
	e.waitPeers(nodes["g"], "f", "m")
	e.waitPeers(nodes["f"], "g", "m")
	e.waitPeers(nodes["m"], "g", "f")
	want := map[string]struct {
		mtu   int
		iface string
	}{"g": {8920, "eth0"}, "f": {8920, "eth0"}, "m": {1420, "eth0"}}
	for name, w := range want {
		h := nodes[name].host
		waitFor(t, 30*time.Second, name+"'s overlay MTU", func() (bool, string) {
			st := e.status(nodes[name])
			tunMTU, err := h.MTU("meshd0")
			if st.MTU == nil {
				return false, "no mtu in status"
			}
			return st.MTU.MTU == w.mtu && st.MTU.Interface == w.iface && tunMTU == w.mtu && st.MTU.Auto,
				fmt.Sprintf("status %+v, meshd0 mtu %d (%v)", *st.MTU, tunMTU, err)
		})
	}
	// The text status says which interface decided.
	out, err := e.cli(nodes["g"], "status")
	if err != nil || !strings.Contains(out, "mtu 8920 from eth0 (mtu 9000)") {
		t.Fatalf("status of g: %v\n%s\nwant the line naming eth0", err, out)
	}

	ips := map[string]netip.Addr{}
	for name, n := range nodes {
		ips[name] = ipv4Of(e.status(n))
	}
	// Jumbo frames cross the fabric whole: an 8,800-byte echo with DF.
	if !echoes(t, g, ips["f"], 8800, 20) {
		t.Fatalf("no 8800-byte echo g -> f over the fabric")
	}
	// The management path carries both directions of a bulk TCP transfer
	// (m's 1420 MTU sets the MSS), and so does the fabric.
	for _, c := range []struct{ from, to *netlab.Host }{{g, m}, {m, g}, {g, f}, {f, g}} {
		ap := netip.AddrPortFrom(ips[c.to.Name], 5201)
		var ln net.Listener
		if err := c.to.Do(func() (err error) { ln, err = net.Listen("tcp", ap.String()); return }); err != nil {
			t.Fatal(err)
		}
		go serveSHA(ln)
		var conn net.Conn
		if err := c.from.Do(func() (err error) {
			conn, err = (&net.Dialer{Timeout: 30 * time.Second}).Dial("tcp", ap.String())
			return
		}); err != nil {
			t.Fatalf("dial %s -> %s: %v", c.from.Name, c.to.Name, err)
		}
		if err := transfer(conn); err != nil {
			t.Fatalf("transfer %s -> %s: %v", c.from.Name, c.to.Name, err)
		}
		ln.Close()
	}
}
