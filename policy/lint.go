package policy

import (
	"fmt"
	"slices"

	"meshd.dev/meshd/netmap"
)

// Lint returns warnings about a valid policy: sections meshd parses but
// does not enforce, rules that let everything reach everything, tags used
// but owned by nobody, groups never used, and rules that allow nothing a
// wider rule does not already allow.
func (p *Policy) Lint() []Problem {
	var out []Problem
	warn := func(pos Pos, format string, args ...any) {
		out = append(out, Problem{Pos: pos, Severity: SeverityWarning, Msg: fmt.Sprintf(format, args...)})
	}
	for _, s := range p.unenforced {
		if why, ok := ignoredSections[s.name]; ok {
			warn(s.pos, "setting %q is ignored: %s", s.name, why)
			continue
		}
		warn(s.pos, "section %q is not enforced: %s", s.name, unenforcedSections[s.name])
	}
	for i := range p.rules {
		r := &p.rules[i]
		if p.ruleIsAllowAll(r) {
			warn(r.pos, "wide rule: src \"*\" may reach dst \"*\" on every port, the same as the bootstrap allow-all default; name the sources and destinations that need access")
		}
	}
	for i := range p.ssh {
		if msg := p.sshUnreachable(&p.ssh[i]); msg != "" {
			warn(p.ssh[i].pos, "%s", msg)
		}
	}
	used := p.usedTags()
	for tag, owners := range p.tagOwners {
		if len(owners) == 0 && used[tag] {
			warn(p.tagPos[tag], "%s is used but owned by no one: only auth keys created with it can apply it (add owners, or ignore if that is intended)", tag)
		}
	}
	usedGroups := p.usedGroups()
	for g, pos := range p.groupPos {
		if !usedGroups[g] {
			warn(pos, "%s is never used", g)
		}
	}
	if len(p.rules) > maxShadowRules {
		warn(Pos{File: p.file, Line: 1, Col: 1}, "%d rules: the shadowed-rule check is skipped above %d rules", len(p.rules), maxShadowRules)
	}
	for j := range p.rules {
		if len(p.rules) > maxShadowRules {
			break
		}
		if by := p.shadowedBy(j); by != nil {
			warn(p.rules[j].pos, "rule allows nothing more than the wider rule at %s: remove it or narrow that one", by.origin())
		}
	}
	sortProblems(out)
	return out
}

func (p *Policy) ruleIsAllowAll(r *rule) bool {
	if !slices.ContainsFunc(r.src, func(s selector) bool { return s.kind == selAny }) {
		return false
	}
	for _, t := range r.targets {
		if t.dst.kind == selAny && t.protos == nil && netmap.PortRangesCover(t.ports, []netmap.PortRange{netmap.AllPorts}) {
			return true
		}
	}
	return false
}

// everySelector calls f for every selector the policy holds.
func (p *Policy) everySelector(f func(selector)) {
	for i := range p.rules {
		r := &p.rules[i]
		for _, s := range r.src {
			f(s)
		}
		for _, t := range r.targets {
			f(t.dst)
		}
		for _, s := range r.capDsts {
			f(s)
		}
	}
	for _, owners := range p.tagOwners {
		for _, s := range owners {
			f(s)
		}
	}
	for _, t := range p.tests {
		f(t.src)
		for _, d := range t.accept {
			f(d.host)
		}
		for _, d := range t.deny {
			f(d.host)
		}
	}
	for _, r := range p.ssh {
		for _, s := range r.src {
			f(s)
		}
		for _, s := range r.dst {
			f(s)
		}
		for _, s := range r.recorder {
			f(s)
		}
	}
	for _, t := range p.sshTests {
		f(t.src)
		for _, d := range t.dst {
			f(d)
		}
	}
	for _, s := range p.approvers {
		f(s)
	}
	for _, na := range p.nodeAttrs {
		for _, s := range na.target {
			f(s)
		}
	}
}

func (p *Policy) usedGroups() map[string]bool {
	used := map[string]bool{}
	p.everySelector(func(s selector) {
		if s.kind == selGroup {
			used[s.name] = true
		}
	})
	return used
}

func (p *Policy) usedTags() map[string]bool {
	used := map[string]bool{}
	p.everySelector(func(s selector) {
		if s.kind == selTag {
			used[s.name] = true
		}
	})
	return used
}

// shadowedBy returns a rule that allows everything rule j allows, or nil.
// Rules granting capabilities are never reported: their "app" part is not
// compared.
func (p *Policy) shadowedBy(j int) *rule {
	rj := &p.rules[j]
	if rj.caps != nil || len(rj.targets) == 0 {
		return nil
	}
	for i := range p.rules {
		if i == j {
			continue
		}
		ri := &p.rules[i]
		if !p.rulesCover(ri, rj) {
			continue
		}
		// Two identical rules cover each other: report only the later one.
		if p.rulesCover(rj, ri) && i > j {
			continue
		}
		return ri
	}
	return nil
}

// maxCoverWork bounds the comparison of two rules in lint: beyond it (rules
// with thousands of destinations each) the shadowing lint skips the pair
// rather than make `policy check` quadratic in a pathological file.
const maxCoverWork = 1 << 20

// maxShadowRules bounds the pairwise shadowed-rule check.
const maxShadowRules = 5000

// rulesCover reports whether every flow of b is a flow of a.
func (p *Policy) rulesCover(a, b *rule) bool {
	if len(a.targets)*len(b.targets)+len(a.src)*len(b.src) > maxCoverWork {
		return false
	}
	for _, s := range b.src {
		if !slices.ContainsFunc(a.src, func(sup selector) bool { return p.selCovers(sup, s) }) {
			return false
		}
	}
	for _, t := range b.targets {
		covered := slices.ContainsFunc(a.targets, func(u target) bool {
			return p.selCovers(u.dst, t.dst) && protosCover(u.protos, t.protos) && netmap.PortRangesCover(u.ports, t.ports)
		})
		if !covered {
			return false
		}
	}
	return true
}

func protosCover(sup, sub []uint8) bool {
	sup, sub = effectiveProtos(sup), effectiveProtos(sub)
	for _, p := range sub {
		if !slices.Contains(sup, p) {
			return false
		}
	}
	return true
}

// selCovers reports whether every device or address sub matches is matched
// by sup.
func (p *Policy) selCovers(sup, sub selector) bool {
	switch sup.kind {
	case selAny:
		return sub.kind != selInternet // "*" is not exit node use
	case selInternet:
		return sub.kind == selInternet
	case selMember:
		return sub.kind == selMember || sub.kind == selUser || sub.kind == selGroup || sub.kind == selSelf
	case selTagged:
		return sub.kind == selTagged || sub.kind == selTag
	case selTag, selUser:
		return sub.kind == sup.kind && sub.name == sup.name
	case selSelf:
		return sub.kind == selSelf
	case selGroup:
		switch sub.kind {
		case selUser:
			return slices.Contains(p.groups[sup.name], sub.name)
		case selGroup:
			members := p.groups[sub.name]
			if len(members) == 0 {
				return sub.name == sup.name
			}
			for _, u := range members {
				if !slices.Contains(p.groups[sup.name], u) {
					return false
				}
			}
			return true
		}
	case selPrefix:
		return sub.kind == selPrefix && sup.prefix.Bits() <= sub.prefix.Bits() && sup.prefix.Contains(sub.prefix.Addr())
	}
	return false
}

// sshUnreachable says which of an ssh rule's sources can reach none of
// its destinations on TCP port 22: ssh rules open no network access, so
// for them the rule is dead. Sources and destinations the policy cannot
// name devices for (autogroups, "*") are not judged.
func (p *Policy) sshUnreachable(r *sshRule) string {
	for _, ssel := range r.src {
		for _, src := range p.subjectsFor(ssel) {
			reach, judged := false, false
			for _, dsel := range r.dst {
				for _, dst := range p.subjectsFor(dsel) {
					judged = true
					reach = reach || p.decide(src, dst, netmap.ProtoTCP, 22) != nil
				}
			}
			if judged && !reach {
				return fmt.Sprintf("ssh rule: no acl or grant lets %s reach its destinations on tcp:22, so the rule lets it log in nowhere (ssh rules open no network access)",
					describeSrc(ssel, src))
			}
		}
	}
	return ""
}
