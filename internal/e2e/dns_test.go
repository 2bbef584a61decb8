package e2e

import (
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/net/proxy"

	"meshd.dev/meshd/internal/netlab"
)

// dnsServer serves A records from answers on addr inside host's
// namespace, UDP and TCP, until the test ends.
func dnsServer(t *testing.T, host *netlab.Host, addr netip.AddrPort, answers map[string]string) {
	t.Helper()
	h := dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		m := new(dns.Msg).SetReply(q)
		qq := q.Question[0]
		if ip := answers[strings.ToLower(qq.Name)]; ip != "" && qq.Qtype == dns.TypeA {
			m.Answer = []dns.RR{&dns.A{Hdr: dns.RR_Header{Name: qq.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.ParseIP(ip)}}
		} else {
			m.Rcode = dns.RcodeNameError
		}
		w.WriteMsg(m)
	})
	var pc net.PacketConn
	var ln net.Listener
	if err := host.Do(func() (err error) {
		if pc, err = net.ListenPacket("udp", addr.String()); err != nil {
			return err
		}
		ln, err = net.Listen("tcp", addr.String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	us, ts := &dns.Server{PacketConn: pc, Handler: h}, &dns.Server{Listener: ln, Handler: h}
	go us.ActivateAndServe()
	go ts.ActivateAndServe()
	t.Cleanup(func() { us.Shutdown(); ts.Shutdown() })
}

var (
	digStatus = regexp.MustCompile(`status: ([A-Z]+)`)
	digAnswer = regexp.MustCompile(`(?m)^\S+\s+\d+\s+IN\s+(?:A|AAAA|PTR)\s+(\S+)$`)
)

// dig runs the real dig in host's namespace and returns the status
// ("NOERROR", "NXDOMAIN", ...; "" when no answer came) and the answers.
func dig(t *testing.T, host *netlab.Host, args ...string) (string, []string) {
	t.Helper()
	out, _ := host.Run("dig", append([]string{"+tries=1", "+time=3"}, args...)...)
	m := digStatus.FindStringSubmatch(out)
	if m == nil {
		return "", nil
	}
	var answers []string
	for _, a := range digAnswer.FindAllStringSubmatch(out, -1) {
		answers = append(answers, a[1])
	}
	return m[1], answers
}

// TestMagicDNS: in the namespace lab with kernel TUNs, the real dig asks
// 100.100.100.100 and [fd5e:5a1e:d::53] on node a, over UDP and TCP: peer
// and self names resolve (A, AAAA, PTR), a node the policy hides from a
// does not, until a policy change shows it (and hides the other); a name
// outside the tailnet is forwarded to the upstream of a's resolv.conf (a
// DNS server in a lab namespace); a name under a split DNS route goes to
// the route's server. A LAN neighbour that routes 100.100.100.100 to a
// gets no answer. status --json shows every dns_name.
func TestMagicDNS(t *testing.T) {
	t.Parallel()
	if _, err := os.Stat("/usr/bin/dig"); err != nil {
		t.Fatal("dig is not installed (Debian package bind9-dnsutils)")
	}
	lab := netlab.New(t)
	e := &env{t: t, bin: buildMeshd(t), dir: t.TempDir()}
	hosts := lanHosts(lab, "coord", "a", "b", "c", "ext")
	lanIP := func(name string) netip.Addr { return hosts[name].Addrs()[0].Addr() }

	// The outside world of this test: an upstream resolver and a corporate
	// one for split DNS, both on host ext.
	dnsServer(t, hosts["ext"], netip.AddrPortFrom(lanIP("ext"), 53), map[string]string{
		"www.example.test.": "198.18.0.80", "www.corp.example.": "198.18.0.99",
	})
	dnsServer(t, hosts["ext"], netip.AddrPortFrom(lanIP("ext"), 5353), map[string]string{"www.corp.example.": "198.18.0.81"})
	// a's resolv.conf names the upstream: `ip netns exec` mounts
	// /etc/netns/NS/resolv.conf over /etc/resolv.conf for the daemon.
	etc := filepath.Join("/etc/netns", hosts["a"].Namespace())
	if err := os.MkdirAll(etc, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(etc) })
	if err := os.WriteFile(filepath.Join(etc, "resolv.conf"), []byte(fmt.Sprintf("nameserver %v\n", lanIP("ext"))), 0o644); err != nil {
		t.Fatal(err)
	}

	ab, ac := writeTemp(t, "policy-ab.hujson", policyAB), writeTemp(t, "policy-ac.hujson", policyAC)
	e.runCoordinator(hosts["coord"], netip.AddrPortFrom(lanIP("coord"), 8443).String(), "",
		"--policy", ab, "--dns-route", fmt.Sprintf("corp.example=%v:5353", lanIP("ext")))
	admin := func(args ...string) (int, string) { return e.admin(hosts["coord"], args...) }
	nodes := map[string]*node{}
	for _, name := range []string{"a", "b", "c"} {
		n := e.newNode(name, hosts[name], "--tun", "meshd0")
		nodes[name] = n
		e.startDaemon(n)
		e.up(n, e.key("--tags", "tag:"+name))
	}
	a := nodes["a"]
	e.waitPeers(a, "b")
	ips := map[string][]netip.Addr{}
	for name, n := range nodes {
		ips[name] = e.status(n).Self.IPs
	}
	v4 := func(name string) string { return ips[name][slices.IndexFunc(ips[name], netip.Addr.Is4)].String() }
	v6 := func(name string) string { return ips[name][slices.IndexFunc(ips[name], netip.Addr.Is6)].String() }

	// status --json: dns_name for self and every peer.
	st := e.status(a)
	if st.Self.DNSName != "a.meshd.internal." || len(st.Peers) != 1 || st.Peers[0].DNSName != "b.meshd.internal." {
		t.Fatalf("status dns names: self %q, peers %+v", st.Self.DNSName, st.Peers)
	}

	ha := hosts["a"]
	waitFor(t, 20*time.Second, "MagicDNS on a", func() (bool, string) {
		status, ans := dig(t, ha, "@100.100.100.100", "b.meshd.internal")
		return status == "NOERROR" && slices.Equal(ans, []string{v4("b")}), fmt.Sprint(status, ans)
	})
	for _, server := range []string{"@100.100.100.100", "@fd5e:5a1e:d::53"} {
		for _, proto := range []string{"+notcp", "+tcp"} {
			for _, tc := range []struct {
				args   []string
				status string
				answer []string
			}{
				{[]string{"b.meshd.internal"}, "NOERROR", []string{v4("b")}},
				{[]string{"B.MeshD.Internal.", "AAAA"}, "NOERROR", []string{v6("b")}},
				{[]string{"a.meshd.internal"}, "NOERROR", []string{v4("a")}},
				{[]string{"-x", v4("b")}, "NOERROR", []string{"b.meshd.internal."}},
				{[]string{"c.meshd.internal"}, "NXDOMAIN", nil}, // hidden from a by the policy
				{[]string{"-x", v4("c")}, "NXDOMAIN", nil},
				{[]string{"nobody.meshd.internal"}, "NXDOMAIN", nil},
				{[]string{"www.example.test"}, "NOERROR", []string{"198.18.0.80"}}, // forwarded upstream
				{[]string{"www.corp.example"}, "NOERROR", []string{"198.18.0.81"}}, // split DNS route
				{[]string{"nothere.example.test"}, "NXDOMAIN", nil},
			} {
				args := append([]string{server, proto}, tc.args...)
				status, ans := dig(t, ha, args...)
				if status != tc.status || !slices.Equal(ans, tc.answer) {
					t.Fatalf("dig %v on a: %s %v; want %s %v", args, status, ans, tc.status, tc.answer)
				}
			}
		}
	}

	// The C library of a's namespace resolves through meshd: the daemon
	// pointed the namespace's resolv.conf (mounted over /etc/resolv.conf
	// by `ip netns exec`) at 100.100.100.100 with the tailnet as search
	// domain, and forwards the rest to the upstream it replaced.
	conf, err := os.ReadFile(ha.ResolvConf())
	if err != nil || !strings.Contains(string(conf), "nameserver 100.100.100.100") || !strings.Contains(string(conf), "search meshd.internal") {
		t.Fatalf("a's resolv.conf while up: %v\n%s", err, conf)
	}
	for _, tc := range []struct{ db, name, want string }{
		{"ahostsv4", "b.meshd.internal", v4("b")},
		{"ahostsv6", "b.meshd.internal", v6("b")},
		{"ahostsv4", "b", v4("b")}, // the search domain
		{"hosts", "a.meshd.internal", ""},
		{"ahostsv4", "www.example.test", "198.18.0.80"},
		{"ahostsv4", "www.corp.example", "198.18.0.81"},
	} {
		out, err := ha.Run("getent", tc.db, tc.name)
		want := tc.want
		if want == "" {
			want = v4("a") + "|" + v6("a")
		}
		first, _, _ := strings.Cut(strings.TrimSpace(out), " ")
		if err != nil || !slices.Contains(strings.Split(want, "|"), first) {
			t.Fatalf("getent %s %s on a: %v: %q; want %s", tc.db, tc.name, err, out, want)
		}
	}
	if out, err := ha.Run("getent", "ahostsv4", "c.meshd.internal"); err == nil {
		t.Fatalf("getent resolves c, which the policy hides from a: %q", out)
	}

	// A LAN neighbour that routes the resolver address to a: no answer
	// over UDP, no answer over TCP.
	ext := hosts["ext"]
	ext.MustRun("ip", "route", "add", "100.100.100.100/32", "via", lanIP("a").String())
	for _, proto := range []string{"+notcp", "+tcp"} {
		if status, ans := dig(t, ext, "@100.100.100.100", proto, "b.meshd.internal"); status != "" {
			t.Fatalf("LAN neighbour dig %s: %s %v; want no answer", proto, status, ans)
		}
	}
	// Control: the neighbour's packets do reach a (a TCP connection to
	// a's resolver address is accepted by the kernel, then closed by the
	// resolver), so the silence above is the resolver's doing.
	if err := ext.Do(func() error {
		c, err := net.DialTimeout("tcp", "100.100.100.100:53", 3*time.Second)
		if err != nil {
			return err
		}
		return c.Close()
	}); err != nil {
		t.Fatalf("LAN neighbour to a's 100.100.100.100:53: %v (the check above proves nothing)", err)
	}

	// The policy changes: a now sees c and no longer b; names follow.
	if code, out := admin("policy", "set", ac); code != 0 {
		t.Fatalf("policy set: exit %d: %s", code, out)
	}
	waitFor(t, 10*time.Second, "names to follow the policy", func() (bool, string) {
		sc, ansC := dig(t, ha, "@100.100.100.100", "c.meshd.internal")
		sb, _ := dig(t, ha, "@100.100.100.100", "b.meshd.internal")
		return sc == "NOERROR" && slices.Equal(ansC, []string{v4("c")}) && sb == "NXDOMAIN", fmt.Sprintf("c: %s %v, b: %s", sc, ansC, sb)
	})
}

// TestMagicDNSNetstack: in userspace mode the SOCKS5 proxy takes MagicDNS
// names (curl --socks5-hostname with the name in every spelling), and the
// resolver answers inside the netstack: DNS over TCP through the proxy to
// 100.100.100.100 and [fd5e:5a1e:d::53] resolves the peer.
func TestMagicDNSNetstack(t *testing.T) {
	t.Parallel()
	e := &env{t: t, bin: buildMeshd(t), dir: t.TempDir()}
	e.startCoordinator(nil, fmt.Sprintf("127.0.0.1:%d", freePort(t, "tcp")))
	key := e.authKey(nil)

	web, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "hello from n2") })}
	go srv.Serve(web)
	defer srv.Close()

	socks := fmt.Sprintf("127.0.0.1:%d", freePort(t, "tcp"))
	common := []string{"--tun", "userspace", "--loopback-only"}
	n1 := e.newNode("n1", nil, append(common, "--port", fmt.Sprint(freePort(t, "udp")), "--socks5-server", socks)...)
	n2 := e.newNode("n2", nil, append(common, "--port", fmt.Sprint(freePort(t, "udp")), "--forward", "8080="+web.Addr().String())...)
	for _, n := range []*node{n1, n2} {
		e.startDaemon(n)
		e.up(n, key)
	}
	e.waitPeers(n1, "n2")
	ip2 := ipv4Of(e.status(n2))

	for _, host := range []string{"n2.meshd.internal", "N2.meshd.internal.", "n2"} {
		var out []byte
		waitFor(t, 20*time.Second, "curl through SOCKS5 to "+host, func() (bool, string) {
			out, err = exec.Command("curl", "-sS", "--max-time", "5", "--socks5-hostname", socks, "http://"+host+":8080/").CombinedOutput()
			return err == nil && string(out) == "hello from n2", fmt.Sprintf("%v: %s", err, out)
		})
	}
	if out, err := exec.Command("curl", "-sS", "--max-time", "5", "--socks5-hostname", socks, "http://www.example.com:8080/").CombinedOutput(); err == nil {
		t.Fatalf("SOCKS5 reached a name outside the tailnet: %s", out)
	}

	d, err := proxy.SOCKS5("tcp", socks, nil, &net.Dialer{Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	for _, resolver := range []string{"100.100.100.100:53", "[fd5e:5a1e:d::53]:53"} {
		c, err := d.Dial("tcp", resolver)
		if err != nil {
			t.Fatalf("SOCKS5 to %s: %v", resolver, err)
		}
		dc := &dns.Conn{Conn: c}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if err := dc.WriteMsg(new(dns.Msg).SetQuestion("n2.meshd.internal.", dns.TypeA)); err != nil {
			t.Fatal(err)
		}
		m, err := dc.ReadMsg()
		c.Close()
		if err != nil || len(m.Answer) != 1 || m.Answer[0].(*dns.A).A.String() != ip2.String() {
			t.Fatalf("DNS over TCP through SOCKS5 to %s: %v %v; want %v", resolver, m, err, ip2)
		}
	}
}
