package control

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"path/filepath"
	"slices"
	"strings"
	"time"
	"unicode"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/control/store"
	"meshd.dev/meshd/netmap"
	"meshd.dev/meshd/policy"
)

// BootstrapPolicyText is what `meshd admin policy get` shows while no policy
// is loaded: a policy file equivalent to the bootstrap default, so that the
// operator sees exactly what is allowed and has a starting point.
const BootstrapPolicyText = `// No policy loaded: the bootstrap default is in force.
// Every node may reach every node on every port, and any tag may be applied.
// Set a policy with: meshd admin policy set FILE
{
	"grants": [
		{"src": ["*"], "dst": ["*"], "ip": ["*"]},
	],
}
`

// BootstrapNotice is logged at start and printed by `admin policy get`
// while the bootstrap default is in force.
const BootstrapNotice = "no policy loaded: every node may reach every node (bootstrap default); set one with meshd admin policy set FILE"

// maxPolicyProblems bounds the problems a rejection carries over the wire
// (the admin client reads at most 64 KiB of an error); `meshd policy check`
// shows them all offline.
const maxPolicyProblems = 100

// PolicyError is a rejected policy: one FILE:LINE:COL line per problem.
type PolicyError struct {
	Problems []string
}

func (e *PolicyError) Error() string { return strings.Join(e.Problems, "\n") }

// Unwrap makes errors.Is(err, controlclient.ErrPolicyInvalid) hold.
func (e *PolicyError) Unwrap() error { return controlclient.ErrPolicyInvalid }

// PolicyInfo describes the tailnet policy in force.
type PolicyInfo struct {
	// Bootstrap is true while no policy is loaded: every node may reach
	// every node. Text is then BootstrapPolicyText.
	Bootstrap bool `json:"bootstrap"`
	// File is the base name the policy was set under.
	File string `json:"file,omitempty"`
	// Text is the policy file as set, comments included.
	Text    string    `json:"text"`
	SHA256  string    `json:"sha256,omitempty"`
	Updated time.Time `json:"updated,omitzero"`
	Rules   int       `json:"rules"`
	Tests   int       `json:"tests"`
	// Warnings are the policy's lint findings as FILE:LINE:COL lines:
	// sections meshd does not enforce (ssh, nodeAttrs),
	// wide rules, unused groups, shadowed rules.
	Warnings []string `json:"warnings,omitempty"`
	// ConnectedNodes is how many nodes had a map stream open when the
	// policy was pushed; only in the answer to a set.
	ConnectedNodes int `json:"connected_nodes,omitempty"`
	// TagsRemoved lists the tags nodes had given themselves (meshd up
	// --advertise-tags) that their owners may not hold under this policy,
	// removed when it was set; only in the answer to a set.
	TagsRemoved []TagRemoval `json:"tags_removed,omitempty"`
}

// TagRemoval is the tags a policy change took from one node, and why.
type TagRemoval struct {
	Node     netmap.NodeID `json:"node"`
	Hostname string        `json:"hostname"`
	Tags     []string      `json:"tags"`
	Reason   string        `json:"reason"`
}

func bootstrapInfo() PolicyInfo {
	return PolicyInfo{Bootstrap: true, Text: BootstrapPolicyText}
}

// policyFileName reduces a client-supplied name to a base name fit for
// messages: no directories (which say nothing about the server), no control
// characters, bounded length.
func policyFileName(name string) string {
	name = filepath.Base(strings.ReplaceAll(name, `\`, "/"))
	name = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return -1
		}
		return r
	}, name)
	if len(name) > 128 {
		name = name[:128]
	}
	if name == "" || name == "." || name == "/" {
		return "policy.hujson"
	}
	return name
}

// parsePolicy parses, validates and tests a policy file, turning its
// problems into a *PolicyError.
func parsePolicy(file string, data []byte) (*policy.Policy, error) {
	if len(data) > policy.MaxSize {
		return nil, &PolicyError{Problems: []string{fmt.Sprintf("%s:1:1: policy is larger than the %d byte (4 MiB) limit", file, policy.MaxSize)}}
	}
	p, err := policy.Parse(file, data)
	if err == nil {
		return p, nil
	}
	var pe *policy.Error
	if !errors.As(err, &pe) {
		return nil, fmt.Errorf("%w: %s: %v", controlclient.ErrPolicyInvalid, file, err)
	}
	out := &PolicyError{}
	for i, pr := range pe.Problems {
		if i == maxPolicyProblems {
			out.Problems = append(out.Problems, fmt.Sprintf("... and %d more problems: run meshd policy check %s to see them all", len(pe.Problems)-i, file))
			break
		}
		out.Problems = append(out.Problems, pr.String())
	}
	return nil, out
}

func infoFor(p *policy.Policy, file string, data []byte, updated time.Time) PolicyInfo {
	sum := sha256.Sum256(data)
	info := PolicyInfo{
		File: file, Text: string(data), SHA256: hex.EncodeToString(sum[:]), Updated: updated,
		Rules: p.NumRules(), Tests: p.NumTests(),
	}
	for _, pr := range p.Lint() {
		info.Warnings = append(info.Warnings, pr.String())
	}
	return info
}

// logWarnings logs each lint warning of the policy going into force, so
// that a rule meshd does not enforce (an "ssh" section, say) is never taken
// for one in force by whoever reads the coordinator's log.
func (s *Server) logWarnings(info PolicyInfo) {
	for _, w := range info.Warnings {
		s.log.Warn("policy warning", "file", info.File, "warning", w)
	}
}

// strictError turns a policy's warnings into a rejection, for
// `meshd admin policy set --strict`.
func strictError(info PolicyInfo) error {
	if len(info.Warnings) == 0 {
		return nil
	}
	e := &PolicyError{Problems: slices.Clone(info.Warnings)}
	if len(e.Problems) > maxPolicyProblems {
		e.Problems = e.Problems[:maxPolicyProblems]
	}
	e.Problems = append(e.Problems, fmt.Sprintf("%s: %d warning(s) and --strict is set", info.File, len(info.Warnings)))
	return e
}

// initPolicy puts the start-up policy in force: --policy if given (stored,
// replacing what was stored), else the stored one, else the bootstrap
// default. A stored policy that no longer validates stops the start rather
// than silently falling back to allow-all.
func (s *Server) initPolicy(ctx context.Context) error {
	s.polMu.Lock()
	defer s.polMu.Unlock()
	if s.opts.Policy != nil {
		file := policyFileName(s.opts.PolicyFile)
		p, err := parsePolicy(file, s.opts.Policy)
		if err != nil {
			return fmt.Errorf("coordinator: --policy %s: %w", file, err)
		}
		now := s.now().UTC()
		old, err := s.store.Policy(ctx)
		switch {
		case err == nil && bytes.Equal(old.Data, s.opts.Policy):
			now = old.Updated // unchanged: keep when it was really set
		case err == nil:
			s.log.Warn("--policy replaces the stored policy", "file", file, "stored_file", old.File, "stored_updated", old.Updated)
			fallthrough
		case errors.Is(err, store.ErrNotFound):
			defer s.audit(ctx, &Actor{Kind: ActorCoordinator}, AuditPolicySet, file, policyAudit(infoFor(p, file, s.opts.Policy, now), s.policyDiff(ctx, p)))
			if err := s.store.SetPolicy(ctx, store.Policy{File: file, Data: s.opts.Policy, Updated: now}); err != nil {
				return fmt.Errorf("coordinator: store --policy: %w", err)
			}
		default:
			return fmt.Errorf("coordinator: %w", err)
		}
		info := infoFor(p, file, s.opts.Policy, now)
		if _, err := s.installPolicy(ctx, policy.NewEngine(p), info); err != nil {
			return fmt.Errorf("coordinator: %w", err)
		}
		s.log.Info("policy loaded", "from", "--policy", "file", file, "rules", p.NumRules(), "tests", p.NumTests())
		s.logWarnings(info)
		return nil
	}
	st, err := s.store.Policy(ctx)
	if errors.Is(err, store.ErrNotFound) {
		s.mu.Lock()
		s.polInfo = bootstrapInfo()
		s.mu.Unlock()
		s.log.Warn(BootstrapNotice)
		return nil
	}
	if err != nil {
		return fmt.Errorf("coordinator: %w", err)
	}
	p, err := parsePolicy(st.File, st.Data)
	if err != nil {
		return fmt.Errorf("coordinator: the stored policy %s (set %s) no longer validates, and falling back to allow-all is not safe: start with --policy FILE to replace it: %w",
			st.File, st.Updated.Format(time.RFC3339), err)
	}
	info := infoFor(p, st.File, st.Data, st.Updated)
	if _, err := s.installPolicy(ctx, policy.NewEngine(p), info); err != nil {
		return fmt.Errorf("coordinator: %w", err)
	}
	s.log.Info("policy loaded", "from", "store", "file", st.File, "rules", p.NumRules(), "tests", p.NumTests(), "updated", st.Updated)
	s.logWarnings(info)
	return nil
}

// ApplyPolicy parses, validates and tests a policy file, stores it, and
// pushes it to every connected node (filters and peer lists). file is the
// name used in messages (its base name is kept). A rejected policy returns
// an error wrapping controlclient.ErrPolicyInvalid (a *PolicyError with FILE:LINE:COL
// lines) and the previous policy stays in force.
func (s *Server) ApplyPolicy(ctx context.Context, file string, data []byte) (PolicyInfo, error) {
	return s.applyPolicy(ctx, file, data, false)
}

// ApplyPolicyStrict is ApplyPolicy that also rejects a policy with
// warnings (`meshd admin policy set --strict`), such as a section meshd
// does not enforce.
func (s *Server) ApplyPolicyStrict(ctx context.Context, file string, data []byte) (PolicyInfo, error) {
	return s.applyPolicy(ctx, file, data, true)
}

func (s *Server) applyPolicy(ctx context.Context, file string, data []byte, strict bool) (PolicyInfo, error) {
	file = policyFileName(file)
	// Parse outside the lock: a large policy must not stall registrations.
	p, err := parsePolicy(file, data)
	if err == nil && strict {
		err = strictError(infoFor(p, file, data, time.Time{}))
	}
	if err != nil {
		s.log.Info("policy rejected; the previous one stays in force", "file", file, "err", err)
		return PolicyInfo{}, err
	}
	// Once decided, a set runs to the end even if the client goes away:
	// a policy stored but with its tag re-check cut short would leave tags
	// in force that it does not allow.
	ctx = context.WithoutCancel(ctx)
	s.polMu.Lock()
	defer s.polMu.Unlock()
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return PolicyInfo{}, errors.New("coordinator is shutting down")
	}
	now := s.now().UTC()
	began := time.Now()
	diff := s.policyDiff(ctx, p)
	diffed := time.Now()
	// Store first: a policy in force that would not survive a restart
	// would be a lie.
	if err := s.store.SetPolicy(ctx, store.Policy{File: file, Data: data, Updated: now}); err != nil {
		return PolicyInfo{}, err
	}
	stored := time.Now()
	info := infoFor(p, file, data, now)
	removed, err := s.installPolicy(ctx, policy.NewEngine(p), info)
	installed := time.Now()
	if err != nil {
		// The policy is stored and in force; say loudly what is not done.
		s.log.Error("policy set, but re-checking the tags nodes gave themselves failed", "file", file, "err", err)
		info.Warnings = append(info.Warnings, fmt.Sprintf("%s: the policy is in force, but re-checking the tags nodes gave themselves failed (%v): set it again", file, err))
	}
	info.ConnectedNodes = s.hub.connected()
	info.TagsRemoved = removed
	s.log.Info("policy set", "file", file, "rules", info.Rules, "tests", info.Tests, "sha256", info.SHA256[:12],
		"connected_nodes", info.ConnectedNodes, "nodes_lost_tags", len(removed),
		"diff", diffed.Sub(began).Round(time.Microsecond), "store", stored.Sub(diffed).Round(time.Microsecond),
		"install", installed.Sub(stored).Round(time.Microsecond))
	s.logWarnings(info)
	s.audit(ctx, nil, AuditPolicySet, file, policyAudit(info, diff))
	return info, nil
}

// installPolicy puts pol in force (nil: the bootstrap default), described
// by info, and re-checks the tags nodes gave themselves against it: before
// the swap, so that no tag its owner may not hold is in force under pol
// for a moment, and after, for a node that registered under the previous
// policy meanwhile. The hub works out the change outside s.mu, so
// registrations and map requests carry on while it does. s.polMu held.
func (s *Server) installPolicy(ctx context.Context, pol Policy, info PolicyInfo) ([]TagRemoval, error) {
	removed, err := s.recheckTags(ctx, pol, info.File)
	// Described before the hub sends it: whoever sees the new policy in a
	// node's map then finds it in CurrentPolicy too (a replica test read
	// the old one in the fan-out's window).
	s.mu.Lock()
	s.polInfo = info
	s.mu.Unlock()
	start := time.Now()
	s.hub.setPolicy(pol)
	s.met.policy.Observe(time.Since(start).Seconds())
	if err != nil {
		return removed, err
	}
	more, err := s.recheckTags(ctx, pol, info.File)
	return append(removed, more...), err
}

// CurrentPolicy describes the policy in force.
func (s *Server) CurrentPolicy() PolicyInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.polInfo
}

// readPolicyBody reads a policy upload, bounded by policy.MaxSize.
func readPolicyBody(r *http.Request, file string) ([]byte, error) {
	tooBig := &PolicyError{Problems: []string{fmt.Sprintf("%s:1:1: policy is larger than the %d byte (4 MiB) limit", file, policy.MaxSize)}}
	if r.ContentLength > policy.MaxSize {
		return nil, tooBig
	}
	// How long the upload may take is bounded by connlimit.LimitBody.
	data, err := io.ReadAll(io.LimitReader(r.Body, policy.MaxSize+1))
	if err != nil {
		return nil, fmt.Errorf("%w: reading the policy: %v", controlclient.ErrBadRequest, err)
	}
	if len(data) > policy.MaxSize {
		return nil, tooBig
	}
	return data, nil
}

func (s *Server) policyRoutes(mux *http.ServeMux, h func(func(*http.Request) (any, error)) http.HandlerFunc) {
	mux.HandleFunc("GET /admin/v1/policy", h(func(r *http.Request) (any, error) { return s.CurrentPolicy(), nil }))
	mux.HandleFunc("PUT /admin/v1/policy", h(func(r *http.Request) (any, error) {
		file := policyFileName(r.URL.Query().Get("file"))
		data, err := readPolicyBody(r, file)
		if err != nil {
			return nil, err
		}
		return s.applyPolicy(r.Context(), file, data, r.URL.Query().Get("strict") == "1")
	}))
	mux.HandleFunc("POST /admin/v1/policy/cuts", h(func(r *http.Request) (any, error) {
		file := policyFileName(r.URL.Query().Get("file"))
		data, err := readPolicyBody(r, file)
		if err != nil {
			return nil, err
		}
		return s.PolicyCuts(r.Context(), file, data)
	}))
}

// Policy returns the policy in force (BootstrapPolicyText and Bootstrap
// set while none is loaded).
func (a *AdminClient) Policy(ctx context.Context) (PolicyInfo, error) {
	var out PolicyInfo
	return out, a.do(ctx, http.MethodGet, "/admin/v1/policy", nil, &out)
}

// SetPolicy uploads a policy file. The coordinator validates it (syntax,
// references, its own tests) and either puts it in force for every node or
// rejects it with an error wrapping controlclient.ErrPolicyInvalid whose message lists
// FILE:LINE:COL problems; file's base name names it in those messages.
func (a *AdminClient) SetPolicy(ctx context.Context, file string, data []byte) (PolicyInfo, error) {
	return a.setPolicy(ctx, file, data, false)
}

// SetPolicyStrict is SetPolicy that also has the policy rejected if it has
// warnings (a section meshd does not enforce, a wide rule, ...): the
// warnings come back as the problems of the rejection.
func (a *AdminClient) SetPolicyStrict(ctx context.Context, file string, data []byte) (PolicyInfo, error) {
	return a.setPolicy(ctx, file, data, true)
}

func (a *AdminClient) setPolicy(ctx context.Context, file string, data []byte, strict bool) (PolicyInfo, error) {
	u := a.base.JoinPath("/admin/v1/policy")
	q := url.Values{"file": {policyFileName(file)}}
	if strict {
		q.Set("strict", "1")
	}
	u.RawQuery = q.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, u.String(), bytes.NewReader(data))
	if err != nil {
		return PolicyInfo{}, err
	}
	req.Header.Set("Content-Type", "application/hujson")
	req.Header.Set("Authorization", "Bearer "+a.token)
	resp, err := a.hc.Do(req)
	if err != nil {
		return PolicyInfo{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return PolicyInfo{}, controlclient.ReadAPIError(resp)
	}
	var out PolicyInfo
	if err := netmap.DecodeJSON(resp.Body, netmap.MaxMessageSize, &out); err != nil {
		return PolicyInfo{}, fmt.Errorf("coordinator response: %w", err)
	}
	return out, nil
}
