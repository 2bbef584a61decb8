package policy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/tailscale/hujson"

	"meshd.dev/meshd/kubecap"
	"meshd.dev/meshd/netmap"
)

// MaxSize bounds a policy file. Real policies are kilobytes; the bound keeps
// a mistaken upload (a binary, a log) from costing the coordinator memory.
const MaxSize = 4 << 20

// Policy is a parsed and validated tailnet policy whose tests pass. It is
// immutable and safe for concurrent use. Compile it against the node list
// with NewEngine.
type Policy struct {
	file      string
	bootstrap bool

	groups    map[string][]string // "group:x" -> lowercased member logins
	groupPos  map[string]Pos
	hosts     map[string]netip.Prefix
	hostPos   map[string]Pos
	tagOwners map[string][]selector // "tag:x" -> owners
	tagPos    map[string]Pos
	rules     []rule
	tests     []test
	ssh       []sshRule
	sshTests  []sshTest
	approvers []selector // every selector of "autoApprovers", for lints
	// routeApprovers are "autoApprovers".routes in file order;
	// exitApprovers its "exitNode" list.
	routeApprovers []routeApprover
	exitApprovers  []selector
	nodeAttrs      []nodeAttr
	// unenforced are the sections present that meshd parses but does not
	// enforce yet, in file order, for Lint.
	unenforced []sectionAt
}

// sectionAt is a top-level section and the position of its name.
type sectionAt struct {
	name string
	pos  Pos
}

// rule is one "acls" or "grants" entry. Both compile to the same form.
type rule struct {
	pos     Pos
	src     []selector
	targets []target
	// capDsts and caps are the "app" part of a grant: the destinations grant
	// caps to the sources.
	capDsts []selector
	caps    map[string][]json.RawMessage
	// via are a grant's "via" routers (tags): its destinations are
	// allowed only on them, so only they forward it.
	via []selector
}

// target is one destination with its protocols and ports.
type target struct {
	dst    selector
	protos []uint8 // nil: TCP, UDP, ICMP
	ports  []netmap.PortRange
}

// origin is the rule's position as carried in netmap.FilterRule.Origin.
func (r *rule) origin() string {
	if r.pos.Line == 0 {
		return r.pos.File
	}
	return fmt.Sprintf("%s:%d", r.pos.File, r.pos.Line)
}

type test struct {
	pos    Pos
	src    selector
	protos []uint8
	accept []testDst
	deny   []testDst
}

type testDst struct {
	raw  string
	pos  Pos
	host selector
	port uint16
}

type sshRule struct {
	pos    Pos
	action string
	src    []selector
	dst    []selector
	users  []string
	period time.Duration // check: how long an approval lasts; 0 = every time
	env    []string      // acceptEnv patterns
	// recorder are the nodes sessions are streamed to; enforce refuses
	// a session none of them takes.
	recorder []selector
	enforce  bool
}

// sshTest is one "sshTests" entry: src logging in to each dst gets
// accept, check or deny for the listed local users.
type sshTest struct {
	pos    Pos
	src    selector
	dst    []selector
	accept []string
	check  []string
	deny   []string
}

type nodeAttr struct {
	pos    Pos
	target []selector
	attrs  []string
	caps   map[string][]json.RawMessage
}

// Sections a policy may contain. Anything else is an error, so that a
// Tailscale feature meshd lacks is reported rather than silently ignored.
var sections = []string{"groups", "hosts", "tagOwners", "acls", "grants", "tests", "ssh", "sshTests", "autoApprovers", "nodeAttrs"}

// unenforcedSections are the sections meshd parses and validates, so that a
// Tailscale policy carries over, but does not act on yet, each with what
// its author must not count on. Lint warns about each one present (and
// `meshd policy check --strict` fails): a reader must never believe such a
// rule is in force. Delete an entry when the feature is built.
var unenforcedSections = map[string]string{
	"nodeAttrs": "meshd applies no node attributes yet: no attribute or capability in this section reaches any node",
}

// refusedSections are Tailscale sections meshd refuses, each with what to
// use instead. Ignoring them would change what the policy means (a posture
// that no longer narrows a rule widens it), so they are errors, not
// warnings. Keys are lowercased.
var refusedSections = map[string]string{
	"postures":          "meshd has no device posture checks, so rules narrowed by a posture would admit every device: remove the postures and narrow src with tags or groups instead",
	"defaultsrcposture": "meshd has no device posture checks, so rules narrowed by a posture would admit every device: remove it and narrow src with tags or groups instead",
	"ipsets":            "name addresses and CIDRs in \"hosts\" (one prefix each) or write them in the rules",
	"derpmap":           "the relays are the coordinator's: pass `meshd coordinator --derp-map FILE`",
}

// refusedFields are rule fields meshd refuses, each with what to use
// instead; keys are lowercased.
var refusedFields = map[string]string{
	"srcposture":      "meshd has no device posture checks, so the rule would admit every device in src: remove srcPosture and narrow src with tags or groups",
	"srcpostureattrs": "meshd has no device posture checks, so a test of posture attributes checks nothing: remove srcPostureAttrs",
	"ippool":          "the coordinator gives every node its addresses from 100.64.0.0/10 and fd5e:5a1e:d::/48: remove ipPool",
}

// ignoredSections are tailnet-wide settings a Tailscale policy may carry
// that have no meaning in meshd. They are accepted so that the file loads,
// with a warning (an error under --strict) saying what meshd does instead.
var ignoredSections = map[string]string{
	"disableIPv4":         "meshd always gives nodes an IPv4 and an IPv6 address; this setting changes nothing",
	"randomizeClientPort": "meshd nodes pick their UDP port with `meshd daemon --port` (0: random); this setting changes nothing",
	"OneCGNATRoute":       "meshd routes only its own addresses to the tunnel; this setting changes nothing",
}

// checkIgnored validates the value of an ignored setting, so that a typo
// there is still reported.
func (ps *parser) checkIgnored(name string, v *hujson.Value) {
	lit, ok := v.Value.(hujson.Literal)
	switch name {
	case "OneCGNATRoute":
		if !ok || lit.Kind() != '"' {
			ps.errorf(v, "%q must be a string", name)
		}
	default:
		if !ok || lit.Kind() != 't' && lit.Kind() != 'f' {
			ps.errorf(v, "%q must be true or false", name)
		}
	}
}

// parser walks the huJSON syntax tree, collecting every problem with the
// position of the offending value.
type parser struct {
	pol   *Policy
	src   []byte
	probs []Problem
	// lineStarts holds the offset of each line's first byte.
	lineStarts []int
}

func (ps *parser) pos(v *hujson.Value) Pos {
	return ps.posAt(v.StartOffset)
}

func (ps *parser) posAt(off int) Pos {
	// Binary search: the last line start <= off.
	lo, hi := 0, len(ps.lineStarts)-1
	for lo < hi {
		mid := (lo + hi + 1) / 2
		if ps.lineStarts[mid] <= off {
			lo = mid
		} else {
			hi = mid - 1
		}
	}
	return Pos{File: ps.pol.file, Line: lo + 1, Col: off - ps.lineStarts[lo] + 1}
}

func (ps *parser) errorf(v *hujson.Value, format string, args ...any) {
	ps.probs = append(ps.probs, Problem{Pos: ps.pos(v), Msg: fmt.Sprintf(format, args...)})
}

var hujsonErrRE = regexp.MustCompile(`^hujson: line (\d+), column (\d+): (.*)$`)

// Parse parses, validates and tests a policy. file names the policy in
// positions and in FilterRule origins. On failure the error is an *Error
// listing every problem.
func Parse(file string, data []byte) (*Policy, error) {
	pol := &Policy{
		file:      file,
		groups:    map[string][]string{},
		groupPos:  map[string]Pos{},
		hosts:     map[string]netip.Prefix{},
		hostPos:   map[string]Pos{},
		tagOwners: map[string][]selector{},
		tagPos:    map[string]Pos{},
	}
	ps := &parser{pol: pol, src: data, lineStarts: []int{0}}
	for i, b := range data {
		if b == '\n' {
			ps.lineStarts = append(ps.lineStarts, i+1)
		}
	}
	if len(data) > MaxSize {
		return nil, &Error{Problems: []Problem{{Pos: Pos{File: file, Line: 1, Col: 1},
			Msg: fmt.Sprintf("policy is %d bytes, more than the %d byte limit", len(data), MaxSize)}}}
	}
	root, err := hujson.Parse(data)
	if err != nil {
		pr := Problem{Pos: Pos{File: file, Line: 1, Col: 1}, Msg: "syntax error: " + err.Error()}
		if m := hujsonErrRE.FindStringSubmatch(err.Error()); m != nil {
			pr.Pos.Line, _ = strconv.Atoi(m[1])
			pr.Pos.Col, _ = strconv.Atoi(m[2])
			pr.Msg = "syntax error: " + m[3]
		}
		return nil, &Error{Problems: []Problem{pr}}
	}
	obj, ok := root.Value.(*hujson.Object)
	if !ok {
		ps.errorf(&root, "a policy is a JSON object with sections such as \"grants\" and \"tagOwners\"")
		return nil, &Error{Problems: ps.probs}
	}
	// Definitions first, whatever their order in the file, so that rules
	// may refer to groups and tags defined below them.
	byName := map[string]*hujson.Value{}
	for i := range obj.Members {
		m := &obj.Members[i]
		name, ok := ps.memberName(m)
		if !ok {
			continue
		}
		// Section names match without regard to case, as Tailscale's
		// parser (encoding/json) matches them: "TagOwners" is "tagOwners".
		canon, known := canonicalName(sections, name)
		if !known {
			canon, known = canonicalName(slices.Collect(maps.Keys(ignoredSections)), name)
		}
		switch {
		case !known:
			if instead, ok := refusedSections[strings.ToLower(name)]; ok {
				ps.errorf(&m.Name, "section %q is not supported: %s", name, instead)
				continue
			}
			ps.errorf(&m.Name, "unknown section %q: meshd policies have %s", name, strings.Join(sections, ", "))
		case byName[canon] != nil:
			ps.errorf(&m.Name, "duplicate section %q (section names are case-insensitive)", name)
		case ignoredSections[canon] != "":
			byName[canon] = &m.Value
			ps.checkIgnored(canon, &m.Value)
			pol.unenforced = append(pol.unenforced, sectionAt{canon, ps.pos(&m.Name)})
		default:
			name = canon
			byName[name] = &m.Value
			if _, ok := unenforcedSections[name]; ok {
				pol.unenforced = append(pol.unenforced, sectionAt{name, ps.pos(&m.Name)})
			}
		}
	}
	if v := byName["tagOwners"]; v != nil {
		ps.tagNames(v)
	}
	if v := byName["groups"]; v != nil {
		ps.parseGroups(v)
	}
	if v := byName["hosts"]; v != nil {
		ps.parseHosts(v)
	}
	if v := byName["tagOwners"]; v != nil {
		ps.parseTagOwners(v)
	}
	if v := byName["acls"]; v != nil {
		ps.eachElem(v, "acls", ps.parseACL)
	}
	if v := byName["grants"]; v != nil {
		ps.eachElem(v, "grants", ps.parseGrant)
	}
	if v := byName["ssh"]; v != nil {
		ps.eachElem(v, "ssh", ps.parseSSH)
	}
	if v := byName["autoApprovers"]; v != nil {
		ps.parseAutoApprovers(v)
	}
	if v := byName["nodeAttrs"]; v != nil {
		ps.eachElem(v, "nodeAttrs", ps.parseNodeAttr)
	}
	if v := byName["tests"]; v != nil {
		ps.eachElem(v, "tests", ps.parseTest)
	}
	if v := byName["sshTests"]; v != nil {
		ps.eachElem(v, "sshTests", ps.parseSSHTest)
	}
	// Rules come out in file order regardless of section, so "the first
	// rule that allows a flow" means the same thing to the reader.
	sortRules(pol.rules)
	if len(ps.probs) == 0 {
		ps.probs = append(ps.probs, pol.runTests()...)
		ps.probs = append(ps.probs, pol.runSSHTests()...)
	}
	if len(ps.probs) > 0 {
		sortProblems(ps.probs)
		return nil, &Error{Problems: ps.probs}
	}
	return pol, nil
}

func sortRules(rs []rule) {
	for i := 1; i < len(rs); i++ {
		for j := i; j > 0 && (rs[j].pos.Line < rs[j-1].pos.Line ||
			rs[j].pos.Line == rs[j-1].pos.Line && rs[j].pos.Col < rs[j-1].pos.Col); j-- {
			rs[j], rs[j-1] = rs[j-1], rs[j]
		}
	}
}

// canonicalName returns the entry of names that name spells without
// regard to case.
func canonicalName(names []string, name string) (string, bool) {
	for _, n := range names {
		if strings.EqualFold(n, name) {
			return n, true
		}
	}
	return "", false
}

func (ps *parser) memberName(m *hujson.ObjectMember) (string, bool) {
	lit, ok := m.Name.Value.(hujson.Literal)
	if !ok || lit.Kind() != '"' {
		ps.errorf(&m.Name, "object keys must be strings")
		return "", false
	}
	return litString(lit), true
}

// object returns v's members by name, reporting duplicates, and reports
// fields not in allowed (nil allows any name).
func (ps *parser) object(v *hujson.Value, what string, allowed ...string) ([]hujson.ObjectMember, bool) {
	obj, ok := v.Value.(*hujson.Object)
	if !ok {
		ps.errorf(v, "%s must be an object", what)
		return nil, false
	}
	seen := map[string]bool{}
	out := obj.Members[:0:0]
	for i := range obj.Members {
		m := obj.Members[i]
		name, ok := ps.memberName(&m)
		if !ok {
			continue
		}
		// Field names match without regard to case, as in Tailscale
		// ("Action" is "action"); map keys (tags, hosts, capabilities)
		// keep their own rules.
		key := name
		if allowed != nil {
			key = strings.ToLower(name)
		}
		if seen[key] {
			ps.errorf(&obj.Members[i].Name, "duplicate key %q in %s", name, what)
			continue
		}
		seen[key] = true
		if allowed != nil {
			if _, ok := canonicalName(allowed, name); !ok {
				if instead, ok := refusedFields[strings.ToLower(name)]; ok {
					ps.errorf(&obj.Members[i].Name, "field %q in %s is not supported: %s", name, what, instead)
					continue
				}
				ps.errorf(&obj.Members[i].Name, "unknown field %q in %s: allowed fields are %s", name, what, strings.Join(allowed, ", "))
				continue
			}
		}
		out = append(out, obj.Members[i])
	}
	return out, true
}

// litString is the value of a string literal. Most policy strings have no
// escapes; those are sliced out directly rather than through
// encoding/json, which dominated parsing time.
func litString(lit hujson.Literal) string {
	if len(lit) >= 2 && lit[0] == '"' && lit[len(lit)-1] == '"' &&
		bytes.IndexByte(lit, '\\') < 0 && utf8.Valid(lit) {
		return string(lit[1 : len(lit)-1])
	}
	return lit.String()
}

// field returns the member called name, spelled in any case (object has
// refused two spellings of one name).
func (ps *parser) field(members []hujson.ObjectMember, name string) *hujson.Value {
	for i := range members {
		if lit, ok := members[i].Name.Value.(hujson.Literal); ok && strings.EqualFold(litString(lit), name) {
			return &members[i].Value
		}
	}
	return nil
}

func (ps *parser) eachElem(v *hujson.Value, what string, f func(*hujson.Value)) {
	arr, ok := v.Value.(*hujson.Array)
	if !ok {
		ps.errorf(v, "%q must be an array", what)
		return
	}
	for i := range arr.Elements {
		f(&arr.Elements[i])
	}
}

func (ps *parser) boolean(v *hujson.Value, what string) (bool, bool) {
	lit, ok := v.Value.(hujson.Literal)
	if !ok || (lit.Kind() != 't' && lit.Kind() != 'f') {
		ps.errorf(v, "%s must be true or false", what)
		return false, false
	}
	return lit.Kind() == 't', true
}

func (ps *parser) str(v *hujson.Value, what string) (string, bool) {
	lit, ok := v.Value.(hujson.Literal)
	if !ok || lit.Kind() != '"' {
		ps.errorf(v, "%s must be a string", what)
		return "", false
	}
	return litString(lit), true
}

type strAt struct {
	s   string
	val *hujson.Value
}

func (ps *parser) strList(v *hujson.Value, what string) []strAt {
	arr, ok := v.Value.(*hujson.Array)
	if !ok {
		ps.errorf(v, "%s must be an array of strings", what)
		return nil
	}
	var out []strAt
	for i := range arr.Elements {
		e := &arr.Elements[i]
		if s, ok := ps.str(e, what+" entries"); ok {
			out = append(out, strAt{s, e})
		}
	}
	return out
}

func (ps *parser) selectors(v *hujson.Value, what string, ctx selContext) []selector {
	var out []selector
	list := ps.strList(v, what)
	if v != nil && len(list) == 0 {
		if arr, ok := v.Value.(*hujson.Array); ok && len(arr.Elements) == 0 {
			ps.errorf(v, "%s is empty", what)
		}
	}
	for _, e := range list {
		sel, err := ps.pol.resolveSelector(e.s, ps.pos(e.val), ctx)
		if err != nil {
			ps.errorf(e.val, "%s: %v", what, err)
			continue
		}
		out = append(out, sel)
	}
	return out
}

func (ps *parser) required(v *hujson.Value, members []hujson.ObjectMember, name, what string) *hujson.Value {
	f := ps.field(members, name)
	if f == nil {
		ps.errorf(v, "%s needs %q", what, name)
	}
	return f
}

func (ps *parser) tagNames(v *hujson.Value) {
	members, ok := ps.object(v, `"tagOwners"`)
	if !ok {
		return
	}
	for i := range members {
		name, _ := ps.memberName(&members[i])
		lower := strings.ToLower(name)
		// The coordinator stores and sends tags as netmap.CheckTag allows,
		// so a policy may only define tags a node can actually carry.
		if err := netmap.CheckTag(lower); err != nil {
			ps.errorf(&members[i].Name, "bad tag in \"tagOwners\": %v", err)
			continue
		}
		if _, dup := ps.pol.tagPos[lower]; dup {
			ps.errorf(&members[i].Name, "tag %q is defined twice (tags are case-insensitive)", name)
			continue
		}
		ps.pol.tagPos[lower] = ps.pos(&members[i].Name)
		ps.pol.tagOwners[lower] = nil
	}
}

func (ps *parser) parseGroups(v *hujson.Value) {
	members, ok := ps.object(v, `"groups"`)
	if !ok {
		return
	}
	for i := range members {
		name, _ := ps.memberName(&members[i])
		lower := strings.ToLower(name)
		if !strings.HasPrefix(lower, "group:") || !validName(lower[6:]) {
			ps.errorf(&members[i].Name, "bad group %q: groups look like group:NAME (letters, digits, '-', '_', '.')", name)
			continue
		}
		if _, dup := ps.pol.groupPos[lower]; dup {
			ps.errorf(&members[i].Name, "group %q is defined twice (groups are case-insensitive)", name)
			continue
		}
		ps.pol.groupPos[lower] = ps.pos(&members[i].Name)
		users := []string{}
		for _, e := range ps.strList(&members[i].Value, "group members") {
			if !strings.Contains(e.s, "@") || strings.ContainsAny(e.s, " \t:/") {
				ps.errorf(e.val, "group %s: member %q is not a user login: groups hold users such as alice@example.com (no groups, tags or addresses)", lower, e.s)
				continue
			}
			users = append(users, strings.ToLower(e.s))
		}
		ps.pol.groups[lower] = users
	}
}

func (ps *parser) parseHosts(v *hujson.Value) {
	members, ok := ps.object(v, `"hosts"`)
	if !ok {
		return
	}
	for i := range members {
		name, _ := ps.memberName(&members[i])
		if name == "" || strings.ContainsAny(name, ":@*/ ") || !validName(strings.ToLower(name)) {
			ps.errorf(&members[i].Name, "bad host name %q: use letters, digits, '-', '_' or '.'", name)
			continue
		}
		if _, err := netip.ParseAddr(name); err == nil {
			ps.errorf(&members[i].Name, "host name %q is an address: host aliases are names", name)
			continue
		}
		s, ok := ps.str(&members[i].Value, "host "+name)
		if !ok {
			continue
		}
		pfx, err := parsePrefixOrAddr(s)
		if err != nil {
			ps.errorf(&members[i].Value, "host %s: bad address or CIDR %q: %v", name, s, err)
			continue
		}
		ps.pol.hosts[name] = pfx
		ps.pol.hostPos[name] = ps.pos(&members[i].Name)
	}
}

func (ps *parser) parseTagOwners(v *hujson.Value) {
	members, ok := ps.object(v, `"tagOwners"`)
	if !ok {
		return
	}
	for i := range members {
		name, _ := ps.memberName(&members[i])
		lower := strings.ToLower(name)
		if _, ok := ps.pol.tagOwners[lower]; !ok {
			continue // reported by tagNames
		}
		owners := ps.strList(&members[i].Value, "tag owners")
		sels := []selector{}
		for _, o := range owners {
			sel, err := ps.pol.resolveSelector(o.s, ps.pos(o.val), ctxTagOwner)
			if err != nil {
				ps.errorf(o.val, "owner of %s: %v", lower, err)
				continue
			}
			sels = append(sels, sel)
		}
		ps.pol.tagOwners[lower] = sels
	}
}

func (ps *parser) parseACL(v *hujson.Value) {
	members, ok := ps.object(v, "an acl", "action", "src", "dst", "proto", "users", "ports")
	if !ok {
		return
	}
	// "users" and "ports" are the names Tailscale's first ACLs used for
	// src and dst; its parser still takes them, so a file written then
	// loads here too.
	srcName, dstName := ps.legacyName(members, "src", "users"), ps.legacyName(members, "dst", "ports")
	r := rule{pos: ps.pos(v)}
	if a := ps.required(v, members, "action", "an acl"); a != nil {
		if s, ok := ps.str(a, `"action"`); ok && s != "accept" {
			ps.errorf(a, "action %q: the only action is \"accept\" (everything else is denied by default)", s)
		}
	}
	var protos []uint8
	if p := ps.field(members, "proto"); p != nil {
		if s, ok := ps.str(p, `"proto"`); ok {
			var err error
			if protos, err = parseProto(s); err != nil {
				ps.errorf(p, "%v", err)
			}
		}
	}
	if src := ps.required(v, members, srcName, "an acl"); src != nil {
		r.src = ps.selectors(src, "src", ctxSrc)
	}
	if dst := ps.required(v, members, dstName, "an acl"); dst != nil {
		list := ps.strList(dst, "dst")
		if arr, ok := dst.Value.(*hujson.Array); ok && len(arr.Elements) == 0 {
			ps.errorf(dst, "dst is empty")
		}
		for _, e := range list {
			host, portStr, err := splitHostPorts(e.s)
			if err != nil {
				ps.errorf(e.val, "dst: %v", err)
				continue
			}
			sel, err := ps.pol.resolveSelector(host, ps.pos(e.val), ctxDst)
			if err != nil {
				ps.errorf(e.val, "dst: %v", err)
				continue
			}
			ports, err := parsePorts(portStr)
			if err != nil {
				ps.errorf(e.val, "dst: %v", err)
				continue
			}
			if !hasPorts(protos) && protos != nil && portStr != "*" {
				ps.errorf(e.val, "dst: protocol %s has no ports: write %s:*", protoName(protos[0]), host)
				continue
			}
			r.targets = append(r.targets, target{dst: sel, protos: protos, ports: ports})
		}
	}
	ps.checkSelfSources(&r)
	ps.pol.rules = append(ps.pol.rules, r)
}

// legacyName is the name of the field given as name or its legacy alias;
// both at once is an error.
func (ps *parser) legacyName(members []hujson.ObjectMember, name, legacy string) string {
	if ps.field(members, legacy) == nil {
		return name
	}
	if ps.field(members, name) != nil {
		ps.errorf(ps.field(members, legacy), "%q is the old name of %q: write only %q", legacy, name, name)
		return name
	}
	return legacy
}

// checkSelfSources refuses autogroup:self as a destination of a rule whose
// sources are not all users (a user, a group, autogroup:member), as
// Tailscale does: a tagged device or an address has no "own devices", so
// such a rule could only mean something its author did not write.
func (ps *parser) checkSelfSources(r *rule) {
	var self *selector
	for i := range r.targets {
		if r.targets[i].dst.kind == selSelf {
			self = &r.targets[i].dst
		}
	}
	for i := range r.capDsts {
		if r.capDsts[i].kind == selSelf {
			self = &r.capDsts[i]
		}
	}
	if self == nil {
		return
	}
	for _, s := range r.src {
		switch s.kind {
		case selUser, selGroup, selMember:
			continue
		}
		ps.probs = append(ps.probs, Problem{Pos: self.pos, Msg: fmt.Sprintf(
			"autogroup:self is only allowed when every src is a user, a group or autogroup:member, and src %q is not: "+
				"give it a rule of its own naming the destinations it needs", s.raw)})
		return
	}
}

// splitHostPorts splits an ACL destination "HOST:PORTS" at its last colon;
// IPv6 addresses may be bracketed ("[fd7a::1]:22").
func splitHostPorts(s string) (host, ports string, err error) {
	if strings.HasPrefix(s, "[") {
		end := strings.Index(s, "]:")
		if end < 0 {
			return "", "", fmt.Errorf("%q: write a bracketed IPv6 destination as [ADDR]:PORTS", s)
		}
		return s[1:end], s[end+2:], nil
	}
	i := strings.LastIndexByte(s, ':')
	if i < 0 {
		return "", "", fmt.Errorf("%q has no ports: write HOST:PORTS such as tag:web:443 or *:*", s)
	}
	host, ports = s[:i], s[i+1:]
	if host == "" || ports == "" {
		return "", "", fmt.Errorf("%q: write HOST:PORTS such as tag:web:443 or *:*", s)
	}
	// "tag:web" alone splits into "tag" and "web": point at the missing ports.
	if host == "tag" || host == "group" || host == "autogroup" {
		return "", "", fmt.Errorf("%q has no ports: write %s:PORTS such as %s:443", s, s, s)
	}
	return host, ports, nil
}

func (ps *parser) parseGrant(v *hujson.Value) {
	members, ok := ps.object(v, "a grant", "src", "dst", "ip", "app", "via")
	if !ok {
		return
	}
	r := rule{pos: ps.pos(v)}
	if src := ps.required(v, members, "src", "a grant"); src != nil {
		r.src = ps.selectors(src, "src", ctxSrc)
	}
	var dsts []selector
	if dst := ps.required(v, members, "dst", "a grant"); dst != nil {
		dsts = ps.selectors(dst, "dst", ctxDst)
	}
	ip, app := ps.field(members, "ip"), ps.field(members, "app")
	if ip == nil && app == nil {
		ps.errorf(v, "a grant needs \"ip\" (ports it opens) or \"app\" (capabilities it grants), or both")
	}
	if app != nil {
		for _, d := range dsts {
			if d.kind == selInternet {
				ps.errorf(app, "\"app\" capabilities are granted on devices, and autogroup:internet is exit node use: give it a grant of its own with \"ip\"")
				break
			}
		}
	}
	if via := ps.field(members, "via"); via != nil {
		r.via = ps.parseVia(via, dsts, app != nil)
	}
	if ip != nil {
		list := ps.strList(ip, `"ip"`)
		if arr, ok := ip.Value.(*hujson.Array); ok && len(arr.Elements) == 0 {
			ps.errorf(ip, "\"ip\" is empty: use [\"*\"] for every port")
		}
		for _, e := range list {
			protos, ports, err := parseIPSpec(e.s)
			if err != nil {
				ps.errorf(e.val, "ip: %v", err)
				continue
			}
			for _, d := range dsts {
				r.targets = append(r.targets, target{dst: d, protos: protos, ports: ports})
			}
		}
	}
	if app != nil {
		r.caps = ps.parseCaps(app)
		r.capDsts = dsts
	}
	ps.checkSelfSources(&r)
	ps.pol.rules = append(ps.pol.rules, r)
}

// parseVia checks a grant's "via": tags of the routers (subnet routers,
// exit nodes) that alone may carry the grant's destinations, which must
// all be routed ones (addresses and CIDRs outside the tailnet, hosts
// naming them, autogroup:internet): "via" narrows which router's filter
// allows a destination, and a tailnet device is reached directly.
func (ps *parser) parseVia(v *hujson.Value, dsts []selector, hasApp bool) []selector {
	sels := ps.selectors(v, "via", ctxTarget)
	ok := true
	for _, s := range sels {
		if s.kind != selTag {
			ps.errorf(v, "via: %q: name the routers by tag, such as tag:router-eu", s.raw)
			ok = false
		}
	}
	if hasApp {
		ps.errorf(v, "via: a grant with \"via\" opens routed paths; give its \"app\" capabilities a grant of their own")
		ok = false
	}
	for _, d := range dsts {
		switch {
		case d.kind == selInternet:
		case d.kind == selPrefix && !d.prefix.Overlaps(netmap.TailnetIPv4Range) && !d.prefix.Overlaps(netmap.TailnetIPv6Range):
		default:
			ps.errorf(v, "via: destination %q is not routed: via applies to CIDRs and hosts outside the tailnet and to autogroup:internet (give tailnet destinations a grant of their own)", d.raw)
			ok = false
		}
	}
	if !ok {
		return nil
	}
	return sels
}

// parseIPSpec parses one grant "ip" entry: "*", "22", "1000-2000",
// "tcp:443", "icmp:*", "6:80,443".
func parseIPSpec(s string) ([]uint8, []netmap.PortRange, error) {
	if s == "*" {
		return nil, []netmap.PortRange{netmap.AllPorts}, nil
	}
	protoStr, portStr, hasProto := strings.Cut(s, ":")
	if !hasProto {
		ports, err := parsePorts(s)
		return nil, ports, err
	}
	protos, err := parseProto(protoStr)
	if err != nil {
		return nil, nil, err
	}
	if protoStr == "" {
		return nil, nil, fmt.Errorf("%q: missing protocol before ':'", s)
	}
	ports, err := parsePorts(portStr)
	if err != nil {
		return nil, nil, err
	}
	if !hasPorts(protos) && portStr != "*" {
		return nil, nil, fmt.Errorf("%q: protocol %s has no ports: write %s:*", s, protoStr, protoStr)
	}
	return protos, ports, nil
}

func (ps *parser) parseCaps(v *hujson.Value) map[string][]json.RawMessage {
	members, ok := ps.object(v, `"app"`)
	if !ok {
		return nil
	}
	caps := map[string][]json.RawMessage{}
	for i := range members {
		name, _ := ps.memberName(&members[i])
		if !strings.Contains(name, "/") || strings.ContainsAny(name, " \t") {
			ps.errorf(&members[i].Name, "capability %q: name capabilities by domain, such as meshd.dev/cap/kubernetes", name)
			continue
		}
		arr, ok := members[i].Value.Value.(*hujson.Array)
		if !ok {
			ps.errorf(&members[i].Value, "capability %s: the value is an array of JSON objects", name)
			continue
		}
		vals := []json.RawMessage{}
		for j := range arr.Elements {
			e := &arr.Elements[j]
			if _, ok := e.Value.(*hujson.Object); !ok {
				ps.errorf(e, "capability %s: each value must be a JSON object", name)
				continue
			}
			c := e.Clone()
			c.Minimize()
			packed := bytes.Clone(c.Pack())
			if kubecap.IsName(name) && !ps.checkKubeCap(name, e, packed) {
				continue
			}
			vals = append(vals, json.RawMessage(packed))
		}
		caps[name] = vals
	}
	return caps
}

// checkKubeCap reports the problems of a Kubernetes capability value
// (kubecap) where they are: an unknown field at its name, anything else
// at the value. The proxy would ignore a value it cannot read; the policy
// refuses it, so that a typo is not a silently missing permission.
func (ps *parser) checkKubeCap(name string, v *hujson.Value, packed []byte) bool {
	obj := v.Value.(*hujson.Object)
	for i := range obj.Members {
		m := &obj.Members[i]
		key, ok := ps.memberName(m)
		if !ok {
			return false
		}
		switch key {
		case "recorder", "enforceRecorder":
		case "impersonate":
			sub, ok := m.Value.Value.(*hujson.Object)
			if !ok {
				continue // kubecap.Parse reports it
			}
			for j := range sub.Members {
				if k, ok := ps.memberName(&sub.Members[j]); ok && k != "groups" {
					ps.errorf(&sub.Members[j].Name, "capability %s: unknown field %q in impersonate (it has groups)", name, k)
					return false
				}
			}
		default:
			ps.errorf(&m.Name, "capability %s: unknown field %q (known: impersonate, recorder, enforceRecorder)", name, key)
			return false
		}
	}
	if _, err := kubecap.Parse(packed); err != nil {
		ps.errorf(v, "capability %s: %v", name, err)
		return false
	}
	return true
}

func (ps *parser) parseSSH(v *hujson.Value) {
	members, ok := ps.object(v, "an ssh rule", "action", "src", "dst", "users", "checkPeriod", "acceptEnv", "recorder", "enforceRecorder")
	if !ok {
		return
	}
	r := sshRule{pos: ps.pos(v)}
	if a := ps.required(v, members, "action", "an ssh rule"); a != nil {
		if s, ok := ps.str(a, `"action"`); ok {
			if s != "accept" && s != "check" {
				ps.errorf(a, "ssh action %q: use \"accept\" or \"check\"", s)
			}
			r.action = s
		}
	}
	if src := ps.required(v, members, "src", "an ssh rule"); src != nil {
		r.src = ps.selectors(src, "src", ctxSrc)
	}
	if dst := ps.required(v, members, "dst", "an ssh rule"); dst != nil {
		r.dst = ps.selectors(dst, "dst", ctxDst)
		for _, sel := range r.dst {
			if sel.kind == selInternet {
				ps.errorf(dst, "dst: autogroup:internet is exit node use, not a device to log in to")
			}
		}
	}
	if u := ps.required(v, members, "users", "an ssh rule"); u != nil {
		for _, e := range ps.strList(u, "users") {
			if lp, ok := strings.CutPrefix(e.s, "localpart:*@"); ok {
				if lp == "" || strings.ContainsAny(lp, " \t:/@") {
					ps.errorf(e.val, "ssh users: %q: use localpart:*@DOMAIN, such as localpart:*@example.com", e.s)
					continue
				}
				r.users = append(r.users, strings.ToLower(e.s))
				continue
			}
			if e.s == "" || strings.ContainsAny(e.s, " \t:/") && !strings.HasPrefix(e.s, "autogroup:") {
				ps.errorf(e.val, "ssh users: %q is not a login name (use root, ubuntu, autogroup:nonroot ...)", e.s)
				continue
			}
			if strings.HasPrefix(e.s, "autogroup:") && e.s != "autogroup:nonroot" {
				ps.errorf(e.val, "ssh users: unknown %q: the only autogroup here is autogroup:nonroot", e.s)
				continue
			}
			r.users = append(r.users, e.s)
		}
	}
	if cp := ps.field(members, "checkPeriod"); cp != nil {
		if s, ok := ps.str(cp, `"checkPeriod"`); ok && s != "always" {
			d, err := time.ParseDuration(s)
			if err != nil || d <= 0 {
				ps.errorf(cp, "checkPeriod %q: use a duration such as 12h, or \"always\"", s)
			}
			r.period = d
		}
		if r.action != "check" {
			ps.errorf(cp, "checkPeriod only applies to \"check\" rules")
		}
	}
	if env := ps.field(members, "acceptEnv"); env != nil {
		for _, e := range ps.strList(env, "acceptEnv") {
			if e.s == "" || strings.ContainsAny(e.s, "= \t") {
				ps.errorf(e.val, "acceptEnv %q: name a variable, optionally with * and ? wildcards", e.s)
				continue
			}
			r.env = append(r.env, e.s)
		}
	}
	if rec := ps.field(members, "recorder"); rec != nil {
		r.recorder = ps.selectors(rec, "recorder", ctxDst)
		for _, sel := range r.recorder {
			if sel.kind == selSelf || sel.kind == selInternet {
				ps.errorf(rec, "recorder: %s names no recorder: use a tag such as tag:recorder", sel.raw)
			}
		}
	}
	if er := ps.field(members, "enforceRecorder"); er != nil {
		if b, ok := ps.boolean(er, `"enforceRecorder"`); ok {
			r.enforce = b
			if b && len(r.recorder) == 0 {
				ps.errorf(er, "enforceRecorder needs a \"recorder\" to enforce")
			}
		}
	}
	ps.pol.ssh = append(ps.pol.ssh, r)
}

// checkApprovers refuses address selectors in autoApprovers: an approver
// is a node's identity, and an address would let whoever holds or routes
// it approve routes.
func (ps *parser) checkApprovers(v *hujson.Value, sels []selector) {
	for _, s := range sels {
		if s.kind == selPrefix {
			ps.errorf(v, "autoApprovers: %q is an address; approvers are users, groups, tags or autogroups", s.raw)
		}
	}
}

func (ps *parser) parseAutoApprovers(v *hujson.Value) {
	members, ok := ps.object(v, `"autoApprovers"`, "routes", "exitNode")
	if !ok {
		return
	}
	if routes := ps.field(members, "routes"); routes != nil {
		rm, ok := ps.object(routes, `"routes"`)
		if ok {
			for i := range rm {
				name, _ := ps.memberName(&rm[i])
				pfx, err := netip.ParsePrefix(name)
				if err != nil || pfx.Masked() != pfx {
					ps.errorf(&rm[i].Name, "autoApprovers routes: %q is not a CIDR such as 10.0.0.0/24", name)
				}
				sels := ps.selectors(&rm[i].Value, "route approvers", ctxTarget)
				ps.checkApprovers(&rm[i].Value, sels)
				ps.pol.approvers = append(ps.pol.approvers, sels...)
				if err == nil && pfx.Masked() == pfx {
					ps.pol.routeApprovers = append(ps.pol.routeApprovers, routeApprover{prefix: pfx, who: sels, pos: ps.pos(&rm[i].Name)})
				}
			}
		}
	}
	if exit := ps.field(members, "exitNode"); exit != nil {
		sels := ps.selectors(exit, "exitNode approvers", ctxTarget)
		ps.checkApprovers(exit, sels)
		ps.pol.approvers = append(ps.pol.approvers, sels...)
		ps.pol.exitApprovers = append(ps.pol.exitApprovers, sels...)
	}
}

func (ps *parser) parseNodeAttr(v *hujson.Value) {
	members, ok := ps.object(v, "a nodeAttrs entry", "target", "attr", "app")
	if !ok {
		return
	}
	na := nodeAttr{pos: ps.pos(v)}
	if t := ps.required(v, members, "target", "a nodeAttrs entry"); t != nil {
		na.target = ps.selectors(t, "target", ctxTarget)
	}
	if a := ps.field(members, "attr"); a != nil {
		for _, e := range ps.strList(a, "attr") {
			na.attrs = append(na.attrs, e.s)
		}
	}
	if app := ps.field(members, "app"); app != nil {
		na.caps = ps.parseCaps(app)
	}
	if ps.field(members, "attr") == nil && ps.field(members, "app") == nil {
		ps.errorf(v, "a nodeAttrs entry needs \"attr\" or \"app\"")
	}
	ps.pol.nodeAttrs = append(ps.pol.nodeAttrs, na)
}

func (ps *parser) parseSSHTest(v *hujson.Value) {
	members, ok := ps.object(v, "an ssh test", "src", "dst", "accept", "check", "deny")
	if !ok {
		return
	}
	t := sshTest{pos: ps.pos(v)}
	if src := ps.required(v, members, "src", "an ssh test"); src != nil {
		if s, ok := ps.str(src, "ssh test src"); ok {
			sel, err := ps.pol.resolveSelector(s, ps.pos(src), ctxTestSrc)
			switch {
			case err != nil:
				ps.errorf(src, "ssh test src: %v", err)
			case sel.kind == selPrefix && sel.prefix.Bits() != sel.prefix.Addr().BitLen():
				ps.errorf(src, "ssh test src %q: a test source is one device, not a CIDR", s)
			default:
				t.src = sel
			}
		}
	}
	if dst := ps.required(v, members, "dst", "an ssh test"); dst != nil {
		for _, e := range ps.strList(dst, "dst") {
			sel, err := ps.pol.resolveSelector(e.s, ps.pos(e.val), ctxTestDst)
			switch {
			case err != nil:
				ps.errorf(e.val, "ssh test dst: %v", err)
			case sel.kind == selPrefix && sel.prefix.Bits() != sel.prefix.Addr().BitLen():
				ps.errorf(e.val, "ssh test dst %q: a test destination is one device, not a CIDR", e.s)
			default:
				t.dst = append(t.dst, sel)
			}
		}
	}
	users := func(name string) []string {
		var out []string
		if f := ps.field(members, name); f != nil {
			for _, e := range ps.strList(f, name) {
				if e.s == "" || strings.ContainsAny(e.s, " \t:/@") {
					ps.errorf(e.val, "ssh test %s: %q is not a local user name", name, e.s)
					continue
				}
				out = append(out, e.s)
			}
		}
		return out
	}
	t.accept, t.check, t.deny = users("accept"), users("check"), users("deny")
	if len(t.accept)+len(t.check)+len(t.deny) == 0 && len(ps.probs) == 0 {
		ps.errorf(v, "an ssh test needs users in \"accept\", \"check\" or \"deny\"")
	}
	ps.pol.sshTests = append(ps.pol.sshTests, t)
}

func (ps *parser) parseTest(v *hujson.Value) {
	members, ok := ps.object(v, "a test", "src", "accept", "deny", "proto")
	if !ok {
		return
	}
	t := test{pos: ps.pos(v)}
	if src := ps.required(v, members, "src", "a test"); src != nil {
		if s, ok := ps.str(src, "test src"); ok {
			sel, err := ps.pol.resolveSelector(s, ps.pos(src), ctxTestSrc)
			if err != nil {
				ps.errorf(src, "test src: %v", err)
			} else if sel.kind == selPrefix && sel.prefix.Bits() != sel.prefix.Addr().BitLen() {
				ps.errorf(src, "test src %q: a test source is one device, not a CIDR", s)
			} else {
				t.src = sel
			}
		}
	}
	if p := ps.field(members, "proto"); p != nil {
		if s, ok := ps.str(p, `"proto"`); ok {
			protos, err := parseProto(s)
			if err != nil {
				ps.errorf(p, "%v", err)
			}
			t.protos = protos
		}
	}
	if t.protos == nil {
		t.protos = []uint8{netmap.ProtoTCP} // tests without proto mean TCP
	}
	parseDsts := func(name string) []testDst {
		f := ps.field(members, name)
		if f == nil {
			return nil
		}
		var out []testDst
		for _, e := range ps.strList(f, name) {
			host, portStr, err := splitHostPorts(e.s)
			if err != nil {
				ps.errorf(e.val, "test %s: %v", name, err)
				continue
			}
			port, err := parsePort(portStr)
			if err != nil && strings.ContainsAny(portStr, ",-*") {
				ps.errorf(e.val, "test %s %q: a test destination names one port, not a list, range or *", name, e.s)
				continue
			}
			if err != nil {
				ps.errorf(e.val, "test %s %q: %v", name, e.s, err)
				continue
			}
			sel, err := ps.pol.resolveSelector(host, ps.pos(e.val), ctxTestDst)
			if err != nil {
				ps.errorf(e.val, "test %s: %v", name, err)
				continue
			}
			if sel.kind == selPrefix && sel.prefix.Bits() != sel.prefix.Addr().BitLen() {
				ps.errorf(e.val, "test %s %q: a test destination is one address, not a CIDR", name, e.s)
				continue
			}
			out = append(out, testDst{raw: e.s, pos: ps.pos(e.val), host: sel, port: port})
		}
		return out
	}
	t.accept = parseDsts("accept")
	t.deny = parseDsts("deny")
	if ps.field(members, "accept") == nil && ps.field(members, "deny") == nil {
		ps.errorf(v, "a test needs \"accept\" or \"deny\" (or both)")
	}
	ps.pol.tests = append(ps.pol.tests, t)
}
