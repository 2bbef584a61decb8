package control

import (
	"bytes"
	"cmp"
	"context"
	"fmt"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
	"meshd.dev/meshd/policy"
)

// PolicyCut is access between two nodes connected to the coordinator that
// the policy in force allows and a proposed one does not: connections the
// change would cut if they are open, and new ones it would refuse.
type PolicyCut struct {
	Src     string        `json:"src"` // hostname
	SrcID   netmap.NodeID `json:"src_id"`
	SrcAddr netip.Addr    `json:"src_addr"`
	Dst     string        `json:"dst"`
	DstID   netmap.NodeID `json:"dst_id"`
	DstAddr netip.Addr    `json:"dst_addr"`
	Proto   string        `json:"proto"`
	Ports   string        `json:"ports"` // "22,8000-8999", "*"
	// Rule is the rule in force (file:line) that allows what is cut.
	Rule string `json:"rule"`
}

func (c PolicyCut) String() string {
	return fmt.Sprintf("%s (%s) -> %s (%s) %s:%s  [%s]", c.Src, c.SrcAddr, c.Dst, c.DstAddr, c.Proto, c.Ports, c.Rule)
}

// PolicyCutReport answers `meshd policy diff --live`.
type PolicyCutReport struct {
	// From is the policy in force (its file name, or "bootstrap"), To the
	// proposed one.
	From string `json:"from"`
	To   string `json:"to"`
	// Connected is how many nodes had a map stream open when the report
	// was computed: only pairs of them are compared.
	Connected int `json:"connected"`
	// Total is how many cuts there are; Cuts lists the first
	// maxListedCuts, by destination, protocol and source.
	Total int         `json:"total"`
	Cuts  []PolicyCut `json:"cuts"`
}

// maxListedCuts bounds the cuts listed: a change that cuts more is read
// from its policy diff, not pair by pair, and listing a million pairs
// would cost the coordinator gigabytes.
const maxListedCuts = 1000

// maxCutNodes bounds the pairwise comparison (each destination's rules are
// indexed once, then every source is a map lookup): beyond it the report
// would be too long to read and too slow to compute on an admin's request.
const maxCutNodes = 2000

// PolicyCuts compares the policy in force with the proposed one (file,
// data), which must validate, for every ordered pair of nodes connected
// right now: what the destination's packet filter lets the source open
// today and would not under the proposal. It changes nothing.
//
// The coordinator does not see connections, only who may open them: a cut
// is access in use-able now, not a connection known to be open. Nodes
// that are not connected are left out (they have no live flows), and a
// subnet router's routes are compared only for its own addresses.
func (s *Server) PolicyCuts(ctx context.Context, file string, data []byte) (PolicyCutReport, error) {
	file = policyFileName(file)
	next, err := parsePolicy(file, data)
	if err != nil {
		return PolicyCutReport{}, err
	}
	info := s.CurrentPolicy()
	cur := policy.Bootstrap()
	rep := PolicyCutReport{From: "bootstrap", To: file, Cuts: []PolicyCut{}}
	if !info.Bootstrap {
		if cur, err = policy.Parse(info.File, []byte(info.Text)); err != nil {
			return rep, fmt.Errorf("the policy in force no longer parses: %w", err)
		}
		rep.From = info.File
	}
	infos, err := s.Nodes(ctx)
	if err != nil {
		return rep, err
	}
	all := make([]*netmap.Node, 0, len(infos))
	var online []*netmap.Node
	for i := range infos {
		n := &infos[i].Node
		all = append(all, n)
		if infos[i].Online && infos[i].Authorized && !infos[i].Expired {
			online = append(online, n)
		}
	}
	rep.Connected = len(online)
	if len(online) > maxCutNodes {
		return rep, fmt.Errorf("%w: %d nodes are connected; the live comparison stops at %d (compare the files with meshd policy diff OLD NEW)",
			controlclient.ErrBadRequest, len(online), maxCutNodes)
	}
	if rep.Cuts, rep.Total, err = computeCuts(ctx, cur, next, all, online, maxListedCuts); err != nil {
		return rep, err
	}
	return rep, nil
}

// computeCuts is PolicyCuts on a node list: for every ordered pair of
// online nodes, what cur lets the source open to the destination and next
// does not, by destination, protocol and source (hostnames); the first
// limit of them, and how many there are.
func computeCuts(ctx context.Context, cur, next *policy.Policy, all, online []*netmap.Node, limit int) ([]PolicyCut, int, error) {
	cuts, total := []PolicyCut{}, 0
	var hadBuf, hasBuf []netmap.PortRange
	online = slices.Clone(online)
	slices.SortFunc(online, func(a, b *netmap.Node) int {
		return cmp.Or(cmp.Compare(a.Hostname, b.Hostname), cmp.Compare(a.ID, b.ID))
	})
	oldE, newE := policy.NewEngine(cur), policy.NewEngine(next)
	oldE.SetNodes(all)
	newE.SetNodes(all)
	for _, dst := range online {
		dstAddr, ok := firstAddr(dst)
		if !ok {
			continue
		}
		oldRules := oldE.FilterFor(dst, nil)
		newRules := newE.FilterFor(dst, nil)
		for _, proto := range rulesProtos(oldRules) {
			if err := ctx.Err(); err != nil {
				return nil, 0, err
			}
			before := indexRules(oldRules, dstAddr, proto)
			if before.empty() {
				continue
			}
			after := indexRules(newRules, dstAddr, proto)
			for _, src := range online {
				srcAddr, ok := firstAddr(src)
				if src == dst || !ok {
					continue
				}
				had, rule := before.ports(srcAddr, hadBuf)
				hadBuf = had
				if len(had) == 0 {
					continue
				}
				has, _ := after.ports(srcAddr, hasBuf)
				hasBuf = has
				if netmap.PortRangesCover(has, had) {
					continue
				}
				if total++; total > limit {
					continue // counted, not listed: spare the allocation
				}
				lost := minusPorts(had, has)
				cuts = append(cuts, PolicyCut{
					Src: src.Hostname, SrcID: src.ID, SrcAddr: srcAddr,
					Dst: dst.Hostname, DstID: dst.ID, DstAddr: dstAddr,
					Proto: protoString(proto), Ports: portsString(lost, proto), Rule: rule,
				})
			}
		}
	}
	return cuts, total, nil
}

// firstAddr is the node's IPv4 address (its IPv6 one if it has none): both
// families are filtered alike, so one stands for the pair.
func firstAddr(n *netmap.Node) (netip.Addr, bool) {
	var v6 netip.Addr
	for _, p := range n.Addresses {
		if p.Addr().Is4() {
			return p.Addr(), true
		}
		if !v6.IsValid() {
			v6 = p.Addr()
		}
	}
	return v6, v6.IsValid()
}

// defaultRuleProtos is what a rule without IPProto matches.
var defaultRuleProtos = []uint8{netmap.ProtoTCP, netmap.ProtoUDP, netmap.ProtoICMPv4, netmap.ProtoICMPv6}

func ruleProtos(r *netmap.FilterRule) []uint8 {
	if len(r.IPProto) == 0 {
		return defaultRuleProtos
	}
	return r.IPProto
}

// rulesProtos is every protocol the rules allow, in a stable order.
func rulesProtos(rules []netmap.FilterRule) []uint8 {
	var out []uint8
	for i := range rules {
		if len(rules[i].DstPorts) == 0 {
			continue // capability grants match no packets
		}
		for _, p := range ruleProtos(&rules[i]) {
			if !slices.Contains(out, p) {
				out = append(out, p)
			}
		}
	}
	slices.Sort(out)
	return out
}

// ruleIndex is what one destination's rules let sources open to one of
// its addresses over one protocol. A compiled rule's sources are usually
// one address per peer, sorted: those are binary-searched, so a pair
// costs a few comparisons per rule rather than a walk of every source.
type ruleIndex struct {
	rules []indexedRule
}

type indexedRule struct {
	src    []netip.Prefix
	sorted bool // every prefix one address, ascending: binary search
	ports  []netmap.PortRange
	origin string
}

func (x *ruleIndex) empty() bool { return len(x.rules) == 0 }

// indexRules indexes the rules that let anyone open proto flows to dst.
func indexRules(rules []netmap.FilterRule, dst netip.Addr, proto uint8) *ruleIndex {
	x := &ruleIndex{}
	for i := range rules {
		r := &rules[i]
		if !slices.Contains(ruleProtos(r), proto) {
			continue
		}
		var ports []netmap.PortRange
		for _, d := range r.DstPorts {
			if d.Net.Contains(dst) {
				ports = append(ports, d.Ports)
			}
		}
		if len(ports) == 0 {
			continue
		}
		sorted := true
		for j, p := range r.SrcIPs {
			if !p.IsSingleIP() || j > 0 && r.SrcIPs[j-1].Addr().Compare(p.Addr()) >= 0 {
				sorted = false
				break
			}
		}
		x.rules = append(x.rules, indexedRule{src: r.SrcIPs, sorted: sorted, ports: ports, origin: r.Origin})
	}
	return x
}

func (r *indexedRule) admits(src netip.Addr) bool {
	if r.sorted {
		_, found := slices.BinarySearchFunc(r.src, src, func(p netip.Prefix, a netip.Addr) int { return p.Addr().Compare(a) })
		return found
	}
	return slices.ContainsFunc(r.src, func(p netip.Prefix) bool { return p.Contains(src) })
}

// ports is the (sorted, merged) ports src may open, appended to buf[:0]
// (a pair of nodes then costs no allocation), and the origin of the first
// rule allowing any of them.
func (x *ruleIndex) ports(src netip.Addr, buf []netmap.PortRange) ([]netmap.PortRange, string) {
	out := buf[:0]
	origin := ""
	for i := range x.rules {
		r := &x.rules[i]
		if !r.admits(src) {
			continue
		}
		out = append(out, r.ports...)
		if origin == "" {
			origin = r.origin
		}
	}
	return netmap.MergePortRanges(out), origin
}

// minusPorts is the ports of a (merged) not in b (merged).
func minusPorts(a, b []netmap.PortRange) []netmap.PortRange {
	out := slices.Clone(a)
	for _, cut := range b {
		var next []netmap.PortRange
		for _, r := range out {
			if cut.Last < r.First || cut.First > r.Last {
				next = append(next, r)
				continue
			}
			if cut.First > r.First {
				next = append(next, netmap.PortRange{First: r.First, Last: cut.First - 1})
			}
			if cut.Last < r.Last {
				next = append(next, netmap.PortRange{First: cut.Last + 1, Last: r.Last})
			}
		}
		out = next
	}
	return out
}

func protoString(p uint8) string {
	switch p {
	case netmap.ProtoTCP:
		return "tcp"
	case netmap.ProtoUDP:
		return "udp"
	case netmap.ProtoICMPv4:
		return "icmp"
	case netmap.ProtoICMPv6:
		return "icmpv6"
	case netmap.ProtoSCTP:
		return "sctp"
	}
	return strconv.Itoa(int(p))
}

func portsString(rs []netmap.PortRange, proto uint8) string {
	if len(rs) == 1 && rs[0] == netmap.AllPorts || proto != netmap.ProtoTCP && proto != netmap.ProtoUDP && proto != netmap.ProtoSCTP {
		return "*"
	}
	parts := make([]string, len(rs))
	for i, r := range rs {
		parts[i] = strconv.Itoa(int(r.First))
		if r.Last != r.First {
			parts[i] += "-" + strconv.Itoa(int(r.Last))
		}
	}
	return strings.Join(parts, ",")
}

// PolicyCuts asks the coordinator what the proposed policy (file, data)
// would cut between the nodes connected now; it changes nothing. A policy
// that does not validate is an error wrapping controlclient.ErrPolicyInvalid.
func (a *AdminClient) PolicyCuts(ctx context.Context, file string, data []byte) (PolicyCutReport, error) {
	u := a.base.JoinPath("/admin/v1/policy/cuts")
	u.RawQuery = url.Values{"file": {policyFileName(file)}}.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u.String(), bytes.NewReader(data))
	if err != nil {
		return PolicyCutReport{}, err
	}
	req.Header.Set("Content-Type", "application/hujson")
	req.Header.Set("Authorization", "Bearer "+a.token)
	resp, err := a.hc.Do(req)
	if err != nil {
		return PolicyCutReport{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return PolicyCutReport{}, controlclient.ReadAPIError(resp)
	}
	var out PolicyCutReport
	if err := netmap.DecodeJSON(resp.Body, netmap.MaxMessageSize, &out); err != nil {
		return PolicyCutReport{}, fmt.Errorf("coordinator response: %w", err)
	}
	return out, nil
}
