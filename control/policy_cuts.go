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
	Connected int         `json:"connected"`
	Cuts      []PolicyCut `json:"cuts"`
}

// maxCutNodes bounds the pairwise comparison: beyond it the report would
// be too long to read and too slow to compute on the admin's request.
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
	oldE, newE := policy.NewEngine(cur), policy.NewEngine(next)
	oldE.SetNodes(all)
	newE.SetNodes(all)
	for _, dst := range online {
		dstAddr, ok := firstAddr(dst)
		if !ok {
			continue
		}
		oldRules, newRules := oldE.FilterFor(dst, nil), newE.FilterFor(dst, nil)
		for _, src := range online {
			srcAddr, ok := firstAddr(src)
			if src == dst || !ok {
				continue
			}
			for _, proto := range rulesProtos(oldRules) {
				before, rule := allowedPorts(oldRules, srcAddr, dstAddr, proto)
				if len(before) == 0 {
					continue
				}
				after, _ := allowedPorts(newRules, srcAddr, dstAddr, proto)
				lost := minusPorts(before, after)
				if len(lost) == 0 {
					continue
				}
				rep.Cuts = append(rep.Cuts, PolicyCut{
					Src: src.Hostname, SrcID: src.ID, SrcAddr: srcAddr,
					Dst: dst.Hostname, DstID: dst.ID, DstAddr: dstAddr,
					Proto: protoString(proto), Ports: portsString(lost, proto), Rule: rule,
				})
			}
		}
	}
	slices.SortFunc(rep.Cuts, func(a, b PolicyCut) int {
		return cmp.Or(cmp.Compare(a.Src, b.Src), cmp.Compare(a.Dst, b.Dst), cmp.Compare(a.Proto, b.Proto))
	})
	return rep, nil
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

// allowedPorts is the (sorted, merged) ports the rules let src open to dst
// over proto, and the origin of the first rule allowing any of them.
func allowedPorts(rules []netmap.FilterRule, src, dst netip.Addr, proto uint8) ([]netmap.PortRange, string) {
	var out []netmap.PortRange
	origin := ""
	for i := range rules {
		r := &rules[i]
		if !slices.Contains(ruleProtos(r), proto) || !slices.ContainsFunc(r.SrcIPs, func(p netip.Prefix) bool { return p.Contains(src) }) {
			continue
		}
		for _, d := range r.DstPorts {
			if d.Net.Contains(dst) {
				out = append(out, d.Ports)
				if origin == "" {
					origin = r.Origin
				}
			}
		}
	}
	return mergePorts(out), origin
}

func mergePorts(rs []netmap.PortRange) []netmap.PortRange {
	if len(rs) < 2 {
		return rs
	}
	slices.SortFunc(rs, func(a, b netmap.PortRange) int { return cmp.Compare(a.First, b.First) })
	out := rs[:1]
	for _, r := range rs[1:] {
		last := &out[len(out)-1]
		if uint32(r.First) <= uint32(last.Last)+1 {
			last.Last = max(last.Last, r.Last)
			continue
		}
		out = append(out, r)
	}
	return out
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
