package policy

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"meshd.dev/meshd/netmap"
)

// SSHVerdict is the decision of the policy's "ssh" rules for one login.
type SSHVerdict struct {
	// Action is netmap.SSHAccept or netmap.SSHCheck, or "" when no rule
	// lets the caller in as that user (deny by default).
	Action string
	// Rule is the FILE:LINE of the deciding rule.
	Rule string
	// CheckPeriod is how long an approval of a check rule lasts; 0 means
	// every connection needs a fresh one ("always", or no checkPeriod).
	CheckPeriod time.Duration
	AcceptEnv   []string
	// EnforceRecorder: refuse sessions no recorder takes.
	EnforceRecorder bool
	recorder        []selector
	pol             *Policy
}

// IsRecorder reports whether n is one of the verdict's recorders.
func (v SSHVerdict) IsRecorder(n *netmap.Node) bool {
	if v.pol == nil {
		return false
	}
	s := subjectOf(n)
	return slices.ContainsFunc(v.recorder, func(sel selector) bool { return v.pol.matchNode(sel, s, n) })
}

// Recorded reports whether the verdict's sessions are streamed to a recorder.
func (v SSHVerdict) Recorded() bool { return len(v.recorder) > 0 }

// subjectOf describes a real node as the matcher sees devices.
func subjectOf(n *netmap.Node) subject {
	s := subject{user: strings.ToLower(n.User)}
	for _, t := range n.Tags {
		s.tags = append(s.tags, strings.ToLower(t))
	}
	if len(s.tags) > 0 {
		s.user = "" // a tagged node acts for no user
	}
	return s
}

// matchNode is matchSubject for a node with several addresses.
func (p *Policy) matchNode(sel selector, d subject, n *netmap.Node) bool {
	if sel.kind == selPrefix {
		return slices.ContainsFunc(n.Addresses, func(a netip.Prefix) bool { return sel.prefix.Contains(a.Addr()) })
	}
	return p.matchSubject(sel, d, subject{})
}

// SSH decides whether node src may log in to node dst as local user
// localUser: the first "ssh" rule (in file order) whose src, dst and users
// all match decides. No rule: Action "".
func (p *Policy) SSH(src, dst *netmap.Node, localUser string) SSHVerdict {
	ss, ds := subjectOf(src), subjectOf(dst)
	for i := range p.ssh {
		r := &p.ssh[i]
		if !slices.ContainsFunc(r.src, func(sel selector) bool { return p.matchNode(sel, ss, src) }) {
			continue
		}
		if !slices.ContainsFunc(r.dst, func(sel selector) bool {
			if sel.kind == selSelf {
				return ds.user != "" && ds.user == ss.user
			}
			return p.matchNode(sel, ds, dst)
		}) {
			continue
		}
		if !sshUserAllowed(r.users, localUser, ss.user) {
			continue
		}
		return r.verdict(p)
	}
	return SSHVerdict{}
}

func (r *sshRule) verdict(p *Policy) SSHVerdict {
	return SSHVerdict{
		Action: r.action, Rule: fmt.Sprintf("%s:%d", r.pos.File, r.pos.Line), CheckPeriod: r.period,
		AcceptEnv: r.env, EnforceRecorder: r.enforce, recorder: r.recorder, pol: p,
	}
}

// SSH is Policy.SSH under the engine's policy.
func (e *Engine) SSH(src, dst *netmap.Node, localUser string) SSHVerdict {
	return e.pol.SSH(src, dst, localUser)
}

// sshUserAllowed reports whether users (a rule's "users") lets a caller
// whose login is callerLogin ("" for tagged callers) in as localUser.
func sshUserAllowed(users []string, localUser, callerLogin string) bool {
	if localUser == "" {
		return false
	}
	for _, u := range users {
		switch {
		case u == "autogroup:nonroot":
			if localUser != "root" {
				return true
			}
		case strings.HasPrefix(u, "localpart:*@"):
			domain := u[len("localpart:*@"):]
			local, d, ok := strings.Cut(callerLogin, "@")
			if ok && d == domain && local == localUser {
				return true
			}
		case u == localUser:
			return true
		}
	}
	return false
}

// nodeOf is the device a test subject stands for.
func nodeOf(s subject) *netmap.Node {
	n := &netmap.Node{User: s.user, Tags: s.tags}
	if s.addr.IsValid() {
		n.Addresses = []netip.Prefix{netip.PrefixFrom(s.addr, s.addr.BitLen())}
	}
	return n
}

func (p *Policy) runSSHTests() []Problem {
	var probs []Problem
	for _, t := range p.sshTests {
		srcs := p.subjectsFor(t.src)
		if len(srcs) == 0 {
			probs = append(probs, Problem{Pos: t.src.pos, Msg: fmt.Sprintf("sshTests src %s has no members, so the test checks nothing", t.src.raw)})
			continue
		}
		for _, dsel := range t.dst {
			dsts := p.subjectsFor(dsel)
			for _, src := range srcs {
				for _, dst := range dsts {
					if dsel.kind == selSelf {
						dst = subject{user: src.user}
					}
					sn, dn := nodeOf(src), nodeOf(dst)
					for _, want := range []struct {
						action string
						users  []string
					}{{netmap.SSHAccept, t.accept}, {netmap.SSHCheck, t.check}, {"", t.deny}} {
						for _, u := range want.users {
							v := p.SSH(sn, dn, u)
							if v.Action == want.action {
								continue
							}
							got := "denied (no ssh rule matches)"
							if v.Action != "" {
								got = fmt.Sprintf("%s by the rule at %s", v.Action, v.Rule)
							}
							probs = append(probs, Problem{Pos: t.pos, Msg: fmt.Sprintf(
								"ssh test failed: %s -> %s as %q is %s, the test expects %s", describeSrc(t.src, src), dsel.raw, u, got, cmpOr(want.action, "deny"))})
						}
					}
				}
			}
		}
	}
	return probs
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// SSHExplanation answers `meshd policy explain --ssh-user`.
type SSHExplanation struct {
	Src  string `json:"src"`
	Dst  string `json:"dst"`
	User string `json:"user"`
	// Allowed is true when every device the source stands for may log in
	// (accept or check) and reach port 22.
	Allowed  bool         `json:"allowed"`
	Verdicts []SSHExplain `json:"verdicts"`
}

// SSHExplain is the decision for one source device.
type SSHExplain struct {
	Src string `json:"src"`
	// Action is accept, check, or "" (no ssh rule: refused).
	Action string `json:"action,omitempty"`
	Rule   string `json:"rule,omitempty"`
	// Port22Rule is the acl or grant letting the source reach TCP port 22
	// of the destination (the ssh rules open no network access); empty
	// when none does, and the login cannot happen.
	Port22Rule string `json:"port22_rule,omitempty"`
}

// ExplainSSH says whether src may log in to dst (a device, read as the
// policy's tests read it) as the local user, by which ssh rule, and which
// rule lets it reach port 22.
func (p *Policy) ExplainSSH(src, dst, user string) (SSHExplanation, error) {
	ex := SSHExplanation{Src: src, Dst: dst, User: user}
	ssel, err := p.resolveSelector(src, Pos{}, ctxTestSrc)
	if err != nil {
		return ex, fmt.Errorf("--src: %w", err)
	}
	dsel, err := p.resolveSelector(dst, Pos{}, ctxTestDst)
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
	dsub := p.subjectsFor(dsel)[0]
	if dsel.kind == selSelf {
		return ex, fmt.Errorf("--dst autogroup:self: name the device")
	}
	ex.Allowed = true
	for _, s := range srcs {
		v := p.SSH(nodeOf(s), nodeOf(dsub), user)
		e := SSHExplain{Src: s.String(), Action: v.Action, Rule: v.Rule}
		if r := p.decide(s, dsub, netmap.ProtoTCP, 22); r != nil {
			e.Port22Rule = r.origin()
		}
		ex.Allowed = ex.Allowed && e.Action != "" && e.Port22Rule != ""
		ex.Verdicts = append(ex.Verdicts, e)
	}
	return ex, nil
}
