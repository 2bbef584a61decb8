package policy

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"meshd.dev/meshd/netmap"
)

// subject is a device as the policy's tests and `policy explain` imagine it,
// without a real node list: one untagged device of a user, a device that
// carries only some tags, or a bare address.
type subject struct {
	user string   // owner of an untagged device
	tags []string // tags of a tagged device
	addr netip.Addr
}

func (s subject) String() string {
	switch {
	case s.user != "":
		return s.user
	case len(s.tags) > 0:
		return strings.Join(s.tags, ",")
	}
	return s.addr.String()
}

// matchSubject reports whether sel matches d. src is the other end of the
// flow, used by autogroup:self.
func (p *Policy) matchSubject(sel selector, d, src subject) bool {
	switch sel.kind {
	case selAny:
		return true
	case selUser:
		return d.user != "" && d.user == sel.name
	case selGroup:
		return d.user != "" && slices.Contains(p.groups[sel.name], d.user)
	case selTag:
		return slices.Contains(d.tags, sel.name)
	case selMember:
		return d.user != ""
	case selTagged:
		return len(d.tags) > 0
	case selSelf:
		return d.user != "" && d.user == src.user
	case selPrefix:
		return d.addr.IsValid() && sel.prefix.Contains(d.addr)
	case selInternet:
		return d.addr.IsValid() && inInternet(d.addr)
	}
	return false
}

// decide returns the first rule (in file order) that lets src open a flow
// to dst on proto/port, or nil: deny by default.
func (p *Policy) decide(src, dst subject, proto uint8, port uint16) *rule {
	for i := range p.rules {
		r := &p.rules[i]
		srcOK := slices.ContainsFunc(r.src, func(s selector) bool { return p.matchSubject(s, src, subject{}) })
		if !srcOK {
			continue
		}
		for _, t := range r.targets {
			if !slices.Contains(effectiveProtos(t.protos), proto) {
				continue
			}
			if hasPorts([]uint8{proto}) && !portsContain(t.ports, port) {
				continue
			}
			if p.matchSubject(t.dst, dst, src) {
				return r
			}
		}
	}
	return nil
}

// subjectsFor expands a test or explain source or destination into the
// devices it stands for: a user's one untagged device, a device carrying
// only the tag, each member of a group, or an address.
func (p *Policy) subjectsFor(sel selector) []subject {
	switch sel.kind {
	case selUser:
		return []subject{{user: sel.name}}
	case selTag:
		return []subject{{tags: []string{sel.name}}}
	case selGroup:
		var out []subject
		for _, u := range p.groups[sel.name] {
			out = append(out, subject{user: u})
		}
		return out
	case selPrefix:
		return []subject{{addr: sel.prefix.Addr()}}
	}
	return nil
}

func (p *Policy) runTests() []Problem {
	var probs []Problem
	for _, t := range p.tests {
		srcs := p.subjectsFor(t.src)
		if len(srcs) == 0 {
			probs = append(probs, Problem{Pos: t.src.pos, Msg: fmt.Sprintf("test src %s has no members, so the test checks nothing", t.src.raw)})
			continue
		}
		if selfDst := slices.IndexFunc(append(slices.Clip(t.accept), t.deny...), func(d testDst) bool { return d.host.kind == selSelf }); selfDst >= 0 && srcs[0].user == "" {
			d := append(slices.Clip(t.accept), t.deny...)[selfDst]
			probs = append(probs, Problem{Pos: d.pos, Msg: fmt.Sprintf(
				"test %s: autogroup:self is the source user's own devices, and test src %s is not a user or group", d.raw, t.src.raw)})
			continue
		}
		check := func(d testDst, wantAccept bool) {
			for _, src := range srcs {
				dst := p.dstSubject(d.host, src)
				for _, proto := range t.protos {
					r := p.decide(src, dst, proto, d.port)
					switch {
					case wantAccept && r == nil:
						probs = append(probs, Problem{Pos: d.pos, Msg: fmt.Sprintf(
							"test failed: %s -> %s (%s) is denied, the test expects accept", describeSrc(t.src, src), d.raw, protoName(proto))})
						return
					case !wantAccept && r != nil:
						probs = append(probs, Problem{Pos: d.pos, Msg: fmt.Sprintf(
							"test failed: %s -> %s (%s) is allowed by the rule at %s, the test expects deny", describeSrc(t.src, src), d.raw, protoName(proto), r.origin())})
						return
					}
				}
			}
		}
		for _, d := range t.accept {
			check(d, true)
		}
		for _, d := range t.deny {
			check(d, false)
		}
	}
	return probs
}

// dstSubject is the device a test or explain destination stands for when
// src opens the flow: autogroup:self is another device of src's user.
func (p *Policy) dstSubject(sel selector, src subject) subject {
	if sel.kind == selSelf {
		return subject{user: src.user}
	}
	return p.subjectsFor(sel)[0]
}

func describeSrc(sel selector, s subject) string {
	if sel.kind == selGroup {
		return fmt.Sprintf("%s (member %s)", sel.raw, s.user)
	}
	return sel.raw
}

// Verdict is the decision for one source device in Explain.
type Verdict struct {
	Src     string `json:"src"` // the device the source stands for (a group is one per member)
	Allowed bool   `json:"allowed"`
	// Rule is the file:line of the first rule allowing the flow; empty when
	// denied (nothing allows it: deny by default).
	Rule string `json:"rule,omitempty"`
}

// Explanation answers `meshd policy explain`.
type Explanation struct {
	Src   string `json:"src"`
	Dst   string `json:"dst"`
	Proto string `json:"proto"`
	// Allowed is true when every device the source stands for is allowed.
	Allowed  bool      `json:"allowed"`
	Verdicts []Verdict `json:"verdicts"`
	// Routed is set when the destination is outside the tailnet: it is
	// reached through a router, and this says which routes and
	// autoApprovers concern it.
	Routed *RoutedPath `json:"routed,omitempty"`
}

// RoutedPath is how a destination outside the tailnet is reached: through
// the primary subnet router approved for a prefix containing it, else an
// exit node the source chose. The policy does not know which routers
// advertise what (`meshd admin routes list` does); it says which of its
// autoApprovers entries would approve a route to it.
type RoutedPath struct {
	// AutoApprovers are the "autoApprovers" entries that approve routes
	// covering the destination, as "PREFIX by SELECTORS at FILE:LINE:COL";
	// ExitNode those approving exit nodes.
	AutoApprovers []string `json:"auto_approvers,omitempty"`
	ExitNode      []string `json:"exit_node_approvers,omitempty"`
	// Internet is set when the destination is in autogroup:internet: an
	// exit node forwards it only to sources granted autogroup:internet
	// (or the address by CIDR).
	Internet bool `json:"internet,omitempty"`
	// Via are the "via" routers of the rules that allow the flow, as
	// "RULE: TAGS": only those routers forward it.
	Via []string `json:"via,omitempty"`
}

// Explain says whether src may open a flow to dst ("HOST:PORT") over proto
// ("" means TCP), and which rule decides it. src and dst are read as in the
// policy's tests: a user is one of their untagged devices, a tag a device
// carrying only that tag, a group every member.
func (p *Policy) Explain(src, dst, proto string) (Explanation, error) {
	ex := Explanation{Src: src, Dst: dst, Proto: proto}
	if proto == "" {
		ex.Proto = "tcp"
	}
	protos, err := parseProto(ex.Proto)
	if err != nil {
		return ex, err
	}
	ssel, err := p.resolveSelector(src, Pos{}, ctxTestSrc)
	if err != nil {
		return ex, fmt.Errorf("--src: %w", err)
	}
	host, portStr, err := splitHostPorts(dst)
	if err != nil {
		return ex, fmt.Errorf("--dst: %w", err)
	}
	port, err := parsePort(portStr)
	if err != nil {
		return ex, fmt.Errorf("--dst %q: name one port: %w", dst, err)
	}
	dsel, err := p.resolveSelector(host, Pos{}, ctxTestDst)
	if err != nil {
		return ex, fmt.Errorf("--dst: %w", err)
	}
	for _, sel := range []selector{ssel, dsel} {
		if sel.kind == selPrefix && sel.prefix.Bits() != sel.prefix.Addr().BitLen() {
			return ex, fmt.Errorf("%s is a CIDR: name one address", sel.raw)
		}
	}
	srcs := p.subjectsFor(ssel)
	if len(srcs) == 0 {
		return ex, fmt.Errorf("--src %s has no members", src)
	}
	if dsel.kind == selSelf && srcs[0].user == "" {
		return ex, fmt.Errorf("--dst autogroup:self is the source user's own devices, and --src %s is not a user or group", src)
	}
	ex.Allowed = true
	var via []string
	for _, s := range srcs {
		v := Verdict{Src: s.String(), Allowed: true}
		dsub := p.dstSubject(dsel, s)
		for _, pr := range protos {
			r := p.decide(s, dsub, pr, port)
			if r == nil {
				v.Allowed, v.Rule = false, ""
				break
			}
			if v.Rule == "" {
				v.Rule = r.origin()
				if len(r.via) > 0 {
					names := make([]string, len(r.via))
					for i, sel := range r.via {
						names[i] = sel.raw
					}
					if e := v.Rule + ": " + strings.Join(names, ", "); !slices.Contains(via, e) {
						via = append(via, e)
					}
				}
			}
		}
		ex.Allowed = ex.Allowed && v.Allowed
		ex.Verdicts = append(ex.Verdicts, v)
	}
	if dsel.kind == selPrefix && !netmap.TailnetIPv4Range.Contains(dsel.prefix.Addr()) && !netmap.TailnetIPv6Range.Contains(dsel.prefix.Addr()) {
		ex.Routed = p.routedPath(dsel.prefix.Addr())
		ex.Routed.Internet = inInternet(dsel.prefix.Addr())
		ex.Routed.Via = via
	}
	return ex, nil
}
