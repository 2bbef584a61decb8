package policy

import (
	"fmt"
	"net/netip"
	"strings"
)

type selKind uint8

const (
	selAny      selKind = iota // "*"
	selUser                    // a user's login email: that user's untagged devices
	selGroup                   // group:NAME: its members' untagged devices
	selTag                     // tag:NAME: devices carrying the tag
	selMember                  // autogroup:member: every untagged user device
	selTagged                  // autogroup:tagged: every tagged device
	selAdmin                   // autogroup:admin: tagOwners only
	selSelf                    // autogroup:self: the source user's own devices (dst only)
	selPrefix                  // an IP, a CIDR or a host alias
	selInternet                // autogroup:internet: exit node use (dst of acls and grants only)
)

// selector is one resolved entry of a src, dst, owner or target list.
type selector struct {
	kind   selKind
	name   string // user email, "group:x", "tag:x"
	prefix netip.Prefix
	raw    string // as written (host aliases keep their name here)
	pos    Pos
}

func (s selector) String() string { return s.raw }

// selContext says where a selector appears, which decides the forms allowed.
type selContext uint8

const (
	ctxSrc selContext = iota
	ctxDst
	ctxTagOwner
	ctxTestSrc
	ctxTestDst
	ctxTarget // nodeAttrs targets, autoApprovers
)

// validName reports whether s is a tag or group name: lowercase letters,
// digits, '-', '_' and '.', starting with a letter or digit.
func validName(s string) bool {
	if s == "" {
		return false
	}
	for i, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
		case (r == '-' || r == '_' || r == '.') && i > 0:
		default:
			return false
		}
	}
	return true
}

// resolveSelector turns a written selector into a selector, checking that
// groups, tags and hosts it names are defined. Tags and groups are matched
// lowercased, as Tailscale documents.
func (p *Policy) resolveSelector(raw string, pos Pos, ctx selContext) (selector, error) {
	s := selector{raw: raw, pos: pos}
	lower := strings.ToLower(raw)
	switch {
	case raw == "":
		return s, fmt.Errorf("empty selector")
	case raw == "*":
		if ctx == ctxTagOwner || ctx == ctxTestSrc || ctx == ctxTestDst {
			return s, fmt.Errorf("%q is not allowed here: name a user, group or tag", raw)
		}
		s.kind = selAny
	case strings.HasPrefix(lower, "group:"):
		if !validName(lower[len("group:"):]) {
			return s, fmt.Errorf("bad group name %q: use letters, digits, '-', '_' or '.'", raw)
		}
		if _, ok := p.groups[lower]; !ok {
			return s, fmt.Errorf("unknown group %q: define it in \"groups\"", raw)
		}
		if ctx == ctxTestDst {
			return s, fmt.Errorf("a test destination names one device: use a user, tag, host or address, not %q", raw)
		}
		s.kind, s.name = selGroup, lower
	case strings.HasPrefix(lower, "tag:"):
		if !validName(lower[len("tag:"):]) {
			return s, fmt.Errorf("bad tag name %q: use letters, digits, '-', '_' or '.'", raw)
		}
		if _, ok := p.tagOwners[lower]; !ok {
			return s, fmt.Errorf("unknown tag %q: every tag needs an entry in \"tagOwners\"", raw)
		}
		s.kind, s.name = selTag, lower
	case strings.HasPrefix(lower, "autogroup:"):
		switch lower {
		case "autogroup:member":
			s.kind = selMember
		case "autogroup:tagged":
			s.kind = selTagged
		case "autogroup:admin":
			if ctx != ctxTagOwner {
				return s, fmt.Errorf("autogroup:admin is only allowed in \"tagOwners\" (meshd has no admin devices)")
			}
			s.kind = selAdmin
		case "autogroup:self":
			if ctx != ctxDst && ctx != ctxTestDst {
				return s, fmt.Errorf("autogroup:self is only allowed as a destination (of a rule or a test)")
			}
			s.kind = selSelf
		case "autogroup:owner", "autogroup:it-admin", "autogroup:network-admin", "autogroup:billing-admin", "autogroup:auditor":
			return s, fmt.Errorf("%s is a Tailscale admin-console role, and meshd has no user roles: name the users, or a group of them", raw)
		case "autogroup:shared":
			return s, fmt.Errorf("autogroup:shared is for devices shared from other tailnets, and meshd does not share devices across tailnets: name the users or tags instead")
		case "autogroup:danger-all":
			return s, fmt.Errorf("autogroup:danger-all would admit addresses outside the tailnet: use * for every tailnet device, or name the CIDRs")
		case "autogroup:internet":
			if ctx != ctxDst {
				return s, fmt.Errorf("autogroup:internet (exit node use) is only allowed as a destination of \"acls\" and \"grants\"")
			}
			s.kind = selInternet
		default:
			return s, fmt.Errorf("unknown autogroup %q: use autogroup:member, autogroup:tagged, autogroup:self, autogroup:internet or autogroup:admin", raw)
		}
		if (ctx == ctxTestSrc || ctx == ctxTestDst) && s.kind != selSelf {
			return s, fmt.Errorf("%q is not one device: tests name a user, tag, host or address", raw)
		}
		if ctx == ctxTagOwner && s.kind != selAdmin {
			return s, fmt.Errorf("%q cannot own tags: use users, groups, tags or autogroup:admin", raw)
		}
	case strings.Contains(raw, "@"):
		if strings.ContainsAny(raw, " \t:/") || strings.HasPrefix(raw, "@") {
			return s, fmt.Errorf("bad user %q: expected a login such as alice@example.com", raw)
		}
		s.kind, s.name = selUser, lower
	default:
		if pfx, ok := p.hosts[raw]; ok {
			s.kind, s.prefix = selPrefix, pfx
			break
		}
		pfx, err := parsePrefixOrAddr(raw)
		if err != nil && strings.Contains(raw, "/") {
			return s, fmt.Errorf("bad CIDR %q: %w", raw, err)
		}
		if err != nil {
			return s, fmt.Errorf("unknown selector %q: expected *, a user email, group:NAME, tag:NAME, autogroup:..., a host from \"hosts\", an IP or a CIDR", raw)
		}
		s.kind, s.prefix = selPrefix, pfx
	}
	if ctx == ctxTagOwner {
		switch s.kind {
		case selUser, selGroup, selTag, selAdmin:
		default:
			return s, fmt.Errorf("%q cannot own tags: use users, groups, tags or autogroup:admin", raw)
		}
	}
	return s, nil
}

// parsePrefixOrAddr parses "100.64.0.1", "fd7a::1", "10.0.0.0/8". A CIDR
// with host bits set is an error, since it usually hides a typo.
func parsePrefixOrAddr(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		pfx, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, err
		}
		if pfx.Masked() != pfx {
			return netip.Prefix{}, fmt.Errorf("%s has host bits set: did you mean %s?", s, pfx.Masked())
		}
		return pfx, nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, err
	}
	if a.Zone() != "" {
		return netip.Prefix{}, fmt.Errorf("%s: zones are not allowed", s)
	}
	return netip.PrefixFrom(a, a.BitLen()), nil
}
