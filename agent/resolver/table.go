package resolver

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"meshd.dev/meshd/netmap"
)

// table is one network map's names, built once per map and never changed
// afterwards, so queries read it without a lock.
type table struct {
	// suffix is the MagicDNS domain, lowercase with the trailing dot
	// ("meshd.internal."); empty when the map has none, and then no name
	// is answered locally.
	suffix string
	// names maps a lowercase FQDN with the trailing dot to its node(s).
	names map[string]*entry
	// ptr maps a tailnet address to the node(s) holding it.
	ptr map[netip.Addr]*entry
	// reverse are the tailnet ranges whose reverse names are answered
	// here and never forwarded (they would only leak addresses upstream).
	reverse []netip.Prefix
	// routes is split DNS, longest domain first.
	routes []route
}

// entry is what a name or an address resolves to.
type entry struct {
	name   string       // FQDN as the map spells it, lowercase
	v4, v6 []netip.Addr // sorted
	// holders counts the nodes that claim the name or address. More than
	// one means a map the coordinator should never send (names are unique
	// in a tailnet): the resolver then answers for none of them rather
	// than let one node answer for another's name.
	holders int
}

// route sends the names under domain to servers.
type route struct {
	domain  string // lowercase, trailing dot
	servers []netip.AddrPort
}

// cgnat is where tailnet IPv4 addresses come from.
var cgnat = netip.MustParsePrefix("100.64.0.0/10")

// newTable builds the table of nm. problems lists what it left out and why
// (names outside the suffix, routes under it), for the caller to log.
func newTable(nm *netmap.NetworkMap) (t *table, problems []string) {
	t = &table{names: map[string]*entry{}, ptr: map[netip.Addr]*entry{}}
	if nm == nil {
		return t, nil
	}
	if s := strings.ToLower(strings.TrimSuffix(nm.DNS.Suffix, ".")); s != "" {
		t.suffix = s + "."
	}
	nodes := make([]*netmap.Node, 0, len(nm.Peers)+1)
	nodes = append(nodes, &nm.Self)
	for _, p := range nm.Peers {
		nodes = append(nodes, p)
	}
	// Peers come from a map: a fixed order keeps holder lists stable.
	slices.SortFunc(nodes[1:], func(a, b *netmap.Node) int { return cmp.Compare(a.ID, b.ID) })
	for _, n := range nodes {
		name := t.nodeName(n)
		if name == "" {
			if n.DNSName != "" {
				problems = append(problems, fmt.Sprintf("node %d: dns name %q is not under the suffix %q; not served", n.ID, n.DNSName, t.suffix))
			}
		} else {
			e := t.names[name]
			if e == nil {
				e = &entry{name: name}
				t.names[name] = e
			}
			e.add(n)
		}
		for _, p := range n.Addresses {
			a := p.Addr().Unmap()
			e := t.ptr[a]
			if e == nil {
				e = &entry{name: name}
				t.ptr[a] = e
			}
			e.holders++
		}
	}
	for _, p := range nm.Self.Addresses {
		switch a := p.Addr(); {
		case a.Is4() && cgnat.Contains(a):
			t.reverse = append(t.reverse, cgnat)
		case a.Is6():
			r, _ := a.Prefix(48)
			t.reverse = append(t.reverse, r)
		}
	}
	for d, servers := range nm.DNS.Routes {
		d = strings.ToLower(strings.TrimSuffix(d, ".")) + "."
		if t.suffix != "" && under(d, t.suffix) {
			problems = append(problems, fmt.Sprintf("dns route %q is under the MagicDNS suffix %q, which this node answers itself; ignored", d, t.suffix))
			continue
		}
		t.routes = append(t.routes, route{domain: d, servers: slices.Clone(servers)})
	}
	slices.SortFunc(t.routes, func(a, b route) int {
		if c := cmp.Compare(len(b.domain), len(a.domain)); c != 0 {
			return c
		}
		return strings.Compare(a.domain, b.domain)
	})
	slices.SortFunc(problems, strings.Compare)
	return t, problems
}

// nodeName is n's MagicDNS name as served: its DNSName, lowercase, if it
// lies under the suffix; for a coordinator that sends no DNSName, the
// hostname under the suffix when that is a valid name. "" when n has no
// name here: a map must never make this node answer for a name outside
// the tailnet's own domain (a public name, say).
func (t *table) nodeName(n *netmap.Node) string {
	if t.suffix == "" {
		return ""
	}
	name := strings.ToLower(n.DNSName)
	if name == "" {
		h := strings.ToLower(n.Hostname)
		if h == "" || strings.Contains(h, ".") || netmap.CheckDomain(h) != nil {
			return ""
		}
		name = h + "." + t.suffix
	}
	if !strings.HasSuffix(name, ".") {
		name += "."
	}
	if name == t.suffix || !under(name, t.suffix) {
		return ""
	}
	return name
}

func (e *entry) add(n *netmap.Node) {
	e.holders++
	for _, p := range n.Addresses {
		if a := p.Addr().Unmap(); a.Is4() {
			e.v4 = append(e.v4, a)
		} else {
			e.v6 = append(e.v6, a)
		}
	}
	slices.SortFunc(e.v4, netip.Addr.Compare)
	slices.SortFunc(e.v6, netip.Addr.Compare)
}

// under reports whether name (lowercase FQDN) is domain or below it.
func under(name, domain string) bool {
	if domain == "." {
		return true
	}
	return name == domain || len(name) > len(domain) && strings.HasSuffix(name, domain) && name[len(name)-len(domain)-1] == '.'
}

// lookup returns the entry of a lowercase FQDN.
func (t *table) lookup(name string) *entry { return t.names[name] }

// route returns the split DNS servers for a lowercase FQDN, if a route
// covers it.
func (t *table) route(name string) []netip.AddrPort {
	for i := range t.routes {
		if under(name, t.routes[i].domain) {
			return t.routes[i].servers
		}
	}
	return nil
}

// inReverse reports whether a is in a tailnet range this node answers
// reverse lookups for.
func (t *table) inReverse(a netip.Addr) bool {
	for _, p := range t.reverse {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// lowerName writes the lowercase form of an ASCII name into buf and
// returns it; names longer than buf are not DNS names and yield nil.
// Lowercasing into a caller's array keeps a lookup free of allocations.
func lowerName(buf []byte, name string) []byte {
	if len(name) > len(buf) {
		return nil
	}
	b := buf[:len(name)]
	for i := 0; i < len(name); i++ {
		c := name[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		b[i] = c
	}
	return b
}

// parseReverse parses a full reverse-lookup name (lowercase FQDN) into
// the address it names: d.c.b.a.in-addr.arpa. or 32 nibbles under
// ip6.arpa. Anything else (a partial zone, a malformed label) is not an
// address.
func parseReverse(name string) (netip.Addr, bool) {
	if rest, ok := strings.CutSuffix(name, ".in-addr.arpa."); ok {
		var b [4]byte
		labels := strings.Split(rest, ".")
		if len(labels) != 4 {
			return netip.Addr{}, false
		}
		for i, l := range labels {
			if l == "" || len(l) > 3 || (len(l) > 1 && l[0] == '0') {
				return netip.Addr{}, false
			}
			v := 0
			for j := 0; j < len(l); j++ {
				if l[j] < '0' || l[j] > '9' {
					return netip.Addr{}, false
				}
				v = v*10 + int(l[j]-'0')
			}
			if v > 255 {
				return netip.Addr{}, false
			}
			b[3-i] = byte(v)
		}
		return netip.AddrFrom4(b), true
	}
	if rest, ok := strings.CutSuffix(name, ".ip6.arpa."); ok {
		if len(rest) != 63 {
			return netip.Addr{}, false
		}
		var b [16]byte
		for i := 0; i < 32; i++ {
			c := rest[2*i]
			if i < 31 && rest[2*i+1] != '.' {
				return netip.Addr{}, false
			}
			var v byte
			switch {
			case '0' <= c && c <= '9':
				v = c - '0'
			case 'a' <= c && c <= 'f':
				v = c - 'a' + 10
			default:
				return netip.Addr{}, false
			}
			// The first label is the lowest nibble.
			pos := 31 - i
			if pos%2 == 0 {
				b[pos/2] |= v << 4
			} else {
				b[pos/2] |= v
			}
		}
		return netip.AddrFrom16(b), true
	}
	return netip.Addr{}, false
}
