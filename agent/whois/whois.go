// Package whois answers "who is behind this tailnet address?" from the
// network map: the node, its owner (unless it is tagged) and the app
// capabilities the policy's grants give it on this node. Services call it
// per request (serve's identity headers, the Kubernetes proxy, SSH), so a
// lookup is one map read on an immutable index built once per map.
package whois

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"

	"meshd.dev/meshd/netmap"
)

// Node is the node part of an answer.
type Node struct {
	ID       netmap.NodeID `json:"id"`
	Hostname string        `json:"hostname"`
	// DNSName is the MagicDNS name with its trailing dot.
	DNSName string       `json:"dns_name"`
	IPs     []netip.Addr `json:"ips"`
	Tags    []string     `json:"tags"`
	OS      string       `json:"os,omitempty"`
}

// Response is who holds an address, as this node's network map says.
// Responses are shared between callers: treat them as read-only.
type Response struct {
	Node Node `json:"node"`
	// User is the owner's login. It is empty for tagged nodes: a tagged
	// node is a service identity and acts for nobody, whoever enrolled it.
	User string `json:"user,omitempty"`
	// Capabilities are the "app" capabilities the tailnet policy's grants
	// give this node when it calls the node asking, keyed by capability
	// name (e.g. "tailscale.com/cap/kubernetes"), values as the policy
	// wrote them. Empty for the asking node itself.
	Capabilities map[string][]json.RawMessage `json:"capabilities"`
	// Self is true when the address is the asking node's own.
	Self bool `json:"self,omitempty"`
}

// route maps a routed prefix (an approved subnet route) to its node.
type route struct {
	pfx netip.Prefix
	r   *Response
}

// Index is an immutable whois table for one network map.
type Index struct {
	byAddr map[netip.Addr]*Response
	// routes are the AllowedIPs wider than one address, longest first, so
	// the first match is the most specific. There are few of them.
	routes []route
}

// NewIndex builds the table for nm. A node that does not validate, or an
// address two nodes claim, is left out: an ambiguous answer would let one
// node speak for another.
func NewIndex(nm *netmap.NetworkMap) *Index {
	if nm == nil {
		return &Index{}
	}
	x := &Index{byAddr: make(map[netip.Addr]*Response, 2*(len(nm.Peers)+1))}
	clash := make(map[netip.Addr]bool)
	add := func(n *netmap.Node, self bool) {
		r := &Response{
			Node: Node{ID: n.ID, Hostname: n.Hostname, DNSName: n.DNSName, IPs: netmap.AddrsOf(n.Addresses), Tags: nonNil(n.Tags), OS: n.OS},
			Self: self,
		}
		if len(n.Tags) == 0 {
			r.User = n.User
		}
		if !self {
			r.Capabilities = n.Capabilities
		}
		if r.Capabilities == nil {
			r.Capabilities = map[string][]json.RawMessage{}
		}
		for _, p := range n.Addresses {
			a := p.Addr()
			if _, dup := x.byAddr[a]; dup {
				clash[a] = true
				continue
			}
			x.byAddr[a] = r
		}
		for _, p := range n.AllowedIPs {
			if !p.IsSingleIP() {
				x.routes = append(x.routes, route{p.Masked(), r})
			}
		}
	}
	add(&nm.Self, true)
	for _, p := range nm.SortedPeers() {
		add(p, false)
	}
	for a := range clash {
		delete(x.byAddr, a)
	}
	slices.SortStableFunc(x.routes, func(a, b route) int { return b.pfx.Bits() - a.pfx.Bits() })
	// Two nodes routing the same prefix: neither answers for it.
	x.routes = slices.DeleteFunc(x.routes, func(rt route) bool {
		n := 0
		for _, o := range x.routes {
			if o.pfx == rt.pfx {
				n++
			}
		}
		return n > 1
	})
	return x
}

// Lookup returns who holds ip: the node whose tailnet address it is, or
// else the node that routes it (a subnet router answers for the hosts
// behind it, since their packets arrive through it).
func (x *Index) Lookup(ip netip.Addr) (*Response, bool) {
	ip = ip.Unmap()
	if r, ok := x.byAddr[ip]; ok {
		return r, true
	}
	for _, rt := range x.routes {
		if rt.pfx.Contains(ip) {
			return rt.r, true
		}
	}
	return nil, false
}

// Len is the number of addresses indexed.
func (x *Index) Len() int { return len(x.byAddr) }

// Table holds the current Index; Lookup is safe for concurrent use with
// Set.
type Table struct {
	cur atomic.Pointer[Index]
}

// Set replaces the index with one built from nm.
func (t *Table) Set(nm *netmap.NetworkMap) { t.cur.Store(NewIndex(nm)) }

// Lookup answers from the current index; false before the first Set.
func (t *Table) Lookup(ip netip.Addr) (*Response, bool) {
	x := t.cur.Load()
	if x == nil {
		return nil, false
	}
	return x.Lookup(ip)
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

// Peer returns who is behind a connection's remote address (IP:port), if
// it is a peer a service may speak for: a node of the network map other
// than this one. lookup is Table.Lookup or Agent.WhoIs. Connections from
// this node itself are refused: any local user can make them (through a
// proxy or, in kernel mode, the loopback route), and WireGuard
// authenticated none of them.
func Peer(lookup func(netip.Addr) (*Response, bool), remoteAddr string) (*Response, netip.Addr, error) {
	ap, err := netip.ParseAddrPort(remoteAddr)
	if err != nil {
		return nil, netip.Addr{}, fmt.Errorf("remote address %q: %w", remoteAddr, err)
	}
	ip := ap.Addr().Unmap()
	who, ok := lookup(ip)
	switch {
	case !ok:
		return nil, ip, fmt.Errorf("%v is not a node of this node's network map", ip)
	case who.Self:
		return nil, ip, fmt.Errorf("%v is this node itself, not a tailnet peer", ip)
	}
	return who, ip, nil
}

// Name is the node's MagicDNS name without the trailing dot, or its
// hostname when the map has no DNS name.
func (n *Node) Name() string {
	if name := strings.TrimSuffix(n.DNSName, "."); name != "" {
		return name
	}
	return n.Hostname
}
