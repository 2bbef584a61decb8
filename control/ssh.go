package control

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/http"
	"net/netip"
	"slices"
	"sync"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/internal/connlimit"
	"meshd.dev/meshd/netmap"
	"meshd.dev/meshd/policy"
)

// SSHPolicy is implemented by policies with "ssh" rules (policy.Engine).
// Without it (the bootstrap default) every SSH login is refused.
type SSHPolicy interface {
	SSH(src, dst *netmap.Node, localUser string) policy.SSHVerdict
}

const (
	// sshCheckTimeout is how long a check-mode connection waits for an
	// admin's approval before it is refused.
	sshCheckTimeout = 5 * time.Minute
	// sshWaitPoll is the longest one wait request is held open.
	sshWaitPoll = 25 * time.Second
	// maxSSHChecks bounds pending approvals, so that a node cannot grow
	// the coordinator's memory by opening connections.
	maxSSHChecks = 1024
)

// sshChecks holds check-mode approvals: pending ones and, per
// (caller, node, local user), how long a granted one lasts.
type sshChecks struct {
	mu      sync.Mutex
	pending map[string]*sshPending
	granted map[sshGrantKey]time.Time // valid until
}

type sshGrantKey struct {
	caller, node netmap.NodeID
	user         string
}

type sshPending struct {
	check  netmap.SSHApproval
	period time.Duration
	done   chan struct{} // closed on approval
}

func (c *sshChecks) init() {
	if c.pending == nil {
		c.pending = map[string]*sshPending{}
		c.granted = map[sshGrantKey]time.Time{}
	}
}

// expireLocked forgets checks and grants past their time.
func (c *sshChecks) expireLocked(now time.Time) {
	for id, p := range c.pending {
		if !now.Before(p.check.Expires) {
			delete(c.pending, id)
		}
	}
	for k, until := range c.granted {
		if !now.Before(until) {
			delete(c.granted, k)
		}
	}
}

// sshRoutes adds the node's SSH endpoints.
func (s *Server) sshRoutes() {
	s.mux.HandleFunc("POST "+controlclient.SSHAuthorizePath, s.handleSSHAuthorize)
	s.mux.HandleFunc("POST "+controlclient.SSHWaitPath, s.handleSSHWait)
}

// sshAdminRoutes adds `meshd admin ssh list|approve`.
func (s *Server) sshAdminRoutes(mux *http.ServeMux, h func(func(*http.Request) (any, error)) http.HandlerFunc) {
	mux.HandleFunc("GET /admin/v1/ssh/checks", h(func(r *http.Request) (any, error) { return s.SSHChecks(), nil }))
	mux.HandleFunc("POST /admin/v1/ssh/checks/{id}/approve", h(func(r *http.Request) (any, error) {
		return struct{}{}, s.ApproveSSH(r.Context(), r.PathValue("id"))
	}))
}

func (s *Server) handleSSHAuthorize(w http.ResponseWriter, r *http.Request) {
	mk, err := machineKey(r)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	var req netmap.SSHAuthRequest
	if err := decodeBody(r, &req); err != nil {
		s.writeError(w, r, err)
		return
	}
	if err := checkVersion(req.Version); err != nil {
		s.writeError(w, r, err)
		return
	}
	n, err := s.nodeForMap(r.Context(), mk)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	connlimit.Authenticate(r.Context())
	writeJSON(w, http.StatusOK, s.authorizeSSH(n.ID, req))
}

// authorizeSSH decides an SSH login to node dstID.
func (s *Server) authorizeSSH(dstID netmap.NodeID, req netmap.SSHAuthRequest) *netmap.SSHAuthResponse {
	reject := func(msg string) *netmap.SSHAuthResponse {
		return &netmap.SSHAuthResponse{Action: netmap.SSHReject, Message: msg}
	}
	if !validLocalUser(req.LocalUser) {
		return reject(fmt.Sprintf("meshd: %q is not a local user name", req.LocalUser))
	}
	h := s.hub
	h.mu.Lock()
	dst := h.nodes[dstID]
	pol := h.policy
	var src *netmap.Node
	if dst != nil && req.CallerAddr.IsValid() {
		for _, n := range h.nodes {
			if slices.ContainsFunc(n.Addresses, func(p netip.Prefix) bool { return p.Addr() == req.CallerAddr }) {
				src = n
				break
			}
		}
	}
	var nodes []*netmap.Node
	if src != nil {
		nodes = h.allLocked()
	}
	h.mu.Unlock()
	if dst == nil {
		return reject("meshd: this node is not in the tailnet")
	}
	if src == nil || src.ID == dst.ID || !pol.CanSee(dst, src) {
		s.auditSSH(netmap.SSHCaller{}, dst, req.LocalUser, "reject", "", "caller "+req.CallerAddr.String()+" is not a peer")
		return reject("meshd: the caller is not a node of this tailnet")
	}
	caller := netmap.SSHCaller{NodeID: src.ID, Hostname: src.Hostname, User: src.User, Tags: src.Tags}
	sp, ok := pol.(SSHPolicy)
	var v policy.SSHVerdict
	if ok {
		v = sp.SSH(src, dst, req.LocalUser)
	}
	if v.Action == "" {
		s.auditSSH(caller, dst, req.LocalUser, "reject", "", "no ssh rule")
		return reject(fmt.Sprintf("meshd: no ssh rule of the tailnet policy lets %s log in to %s as %q", callerName(caller), dst.Hostname, req.LocalUser))
	}
	resp := &netmap.SSHAuthResponse{Action: v.Action, Rule: v.Rule, AcceptEnv: v.AcceptEnv, Caller: caller, EnforceRecorder: v.EnforceRecorder}
	if v.Recorded() {
		for _, n := range nodes {
			if n.ID != dst.ID && v.IsRecorder(n) && len(n.Addresses) > 0 {
				resp.Recorders = append(resp.Recorders, netip.AddrPortFrom(n.Addresses[0].Addr(), netmap.SSHRecorderPort))
			}
		}
		if len(resp.Recorders) == 0 && v.EnforceRecorder {
			s.auditSSH(caller, dst, req.LocalUser, "reject", v.Rule, "no recorder node")
			return reject("meshd: this session must be recorded and no recorder is available")
		}
	}
	if v.Action == netmap.SSHCheck {
		s.checkSSH(resp, dst, req.LocalUser, v.CheckPeriod)
	}
	s.auditSSH(caller, dst, req.LocalUser, resp.Action, v.Rule, "")
	return resp
}

// checkSSH turns resp into an accept if the caller holds a live approval,
// else registers a pending check.
func (s *Server) checkSSH(resp *netmap.SSHAuthResponse, dst *netmap.Node, user string, period time.Duration) {
	now := s.now()
	c := &s.sshChecks
	c.mu.Lock()
	defer c.mu.Unlock()
	c.init()
	c.expireLocked(now)
	if until, ok := c.granted[sshGrantKey{resp.Caller.NodeID, dst.ID, user}]; ok && now.Before(until) {
		resp.Action = netmap.SSHAccept
		return
	}
	if len(c.pending) >= maxSSHChecks {
		resp.Action, resp.Message = netmap.SSHReject, "meshd: too many logins wait for approval; try again later"
		return
	}
	var b [8]byte
	rand.Read(b[:])
	id := hex.EncodeToString(b[:])
	c.pending[id] = &sshPending{
		check: netmap.SSHApproval{
			ID: id, Caller: resp.Caller, NodeID: dst.ID, Hostname: dst.Hostname, LocalUser: user,
			Created: now, Expires: now.Add(sshCheckTimeout),
		},
		period: period,
		done:   make(chan struct{}),
	}
	resp.CheckID = id
	resp.Message = fmt.Sprintf("meshd: this login needs an administrator's approval; waiting up to %v.\r\n"+
		"Ask an admin to run: meshd admin ssh approve %s\r\n", sshCheckTimeout, id)
}

func (s *Server) handleSSHWait(w http.ResponseWriter, r *http.Request) {
	mk, err := machineKey(r)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	var req netmap.SSHWaitRequest
	if err := decodeBody(r, &req); err != nil {
		s.writeError(w, r, err)
		return
	}
	n, err := s.nodeForMap(r.Context(), mk)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	connlimit.Authenticate(r.Context())
	c := &s.sshChecks
	c.mu.Lock()
	c.init()
	p := c.pending[req.CheckID]
	c.mu.Unlock()
	// A node waits only on its own checks: another's id is unknown to it.
	if p == nil || p.check.NodeID != n.ID {
		writeJSON(w, http.StatusOK, &netmap.SSHWaitResponse{Message: "meshd: the approval request expired or does not exist"})
		return
	}
	wait := min(sshWaitPoll, p.check.Expires.Sub(s.now()))
	t := time.NewTimer(max(wait, 0))
	defer t.Stop()
	select {
	case <-p.done:
		writeJSON(w, http.StatusOK, &netmap.SSHWaitResponse{Approved: true})
	case <-t.C:
		if !s.now().Before(p.check.Expires) {
			writeJSON(w, http.StatusOK, &netmap.SSHWaitResponse{Message: fmt.Sprintf("meshd: no administrator approved this login within %v", sshCheckTimeout)})
			return
		}
		writeJSON(w, http.StatusOK, &netmap.SSHWaitResponse{Pending: true})
	case <-r.Context().Done():
	}
}

// SSHChecks lists the check-mode logins waiting for approval.
func (s *Server) SSHChecks() []netmap.SSHApproval {
	c := &s.sshChecks
	c.mu.Lock()
	defer c.mu.Unlock()
	c.init()
	c.expireLocked(s.now())
	out := []netmap.SSHApproval{}
	for _, p := range c.pending {
		out = append(out, p.check)
	}
	slices.SortFunc(out, func(a, b netmap.SSHApproval) int { return cmp.Compare(a.Created.UnixNano(), b.Created.UnixNano()) })
	return out
}

// ApproveSSH approves the pending check id: its connection proceeds, and
// the same caller may log in to the same node as the same user without a
// new approval for the rule's checkPeriod.
func (s *Server) ApproveSSH(ctx context.Context, id string) error {
	now := s.now()
	c := &s.sshChecks
	c.mu.Lock()
	defer c.mu.Unlock()
	c.init()
	c.expireLocked(now)
	p := c.pending[id]
	if p == nil {
		return fmt.Errorf("%w: no SSH login waits for approval %q (it expired or was approved): see meshd admin ssh list", controlclient.ErrNotFound, id)
	}
	if p.check.Approved {
		return fmt.Errorf("%w: SSH login %s is already approved", controlclient.ErrBadRequest, id)
	}
	p.check.Approved = true
	close(p.done)
	if p.period > 0 {
		c.granted[sshGrantKey{p.check.Caller.NodeID, p.check.NodeID, p.check.LocalUser}] = now.Add(p.period)
	}
	s.log.Info("ssh login approved", "check", id, "caller", p.check.Caller.NodeID, "node", p.check.NodeID, "local_user", p.check.LocalUser)
	s.audit(ctx, nil, AuditSSHApprove, nodeTarget(p.check.NodeID), map[string]any{
		"check": id, "caller": p.check.Caller, "local_user": p.check.LocalUser, "period": p.period.String(),
	})
	return nil
}

// auditSSH records one SSH authorization decision in the log and the
// audit log, as done by the node that asked (the login's destination).
func (s *Server) auditSSH(caller netmap.SSHCaller, dst *netmap.Node, localUser, action, rule, reason string) {
	s.log.Info("ssh login", "caller_node", caller.NodeID, "caller_host", caller.Hostname, "caller_user", caller.User, "caller_tags", caller.Tags,
		"node", dst.ID, "host", dst.Hostname, "local_user", localUser, "action", action, "rule", rule, "reason", reason)
	actor := NodeActor(dst)
	s.audit(s.ctx, &actor, AuditSSHLogin, nodeTarget(dst.ID), auditSSHLogin{
		Caller: caller, LocalUser: localUser, Action: action, Rule: rule, Reason: reason,
	})
}

// auditSSHLogin is an AuditSSHLogin event's details.
type auditSSHLogin struct {
	Caller    netmap.SSHCaller `json:"caller"`
	LocalUser string           `json:"local_user"`
	Action    string           `json:"action"` // accept, check or reject
	Rule      string           `json:"rule,omitempty"`
	Reason    string           `json:"reason,omitempty"`
}

func callerName(c netmap.SSHCaller) string {
	if c.User != "" {
		return fmt.Sprintf("%s (%s)", c.User, c.Hostname)
	}
	return c.Hostname
}

// validLocalUser accepts POSIX-ish login names.
func validLocalUser(u string) bool {
	if u == "" || len(u) > 64 || u[0] == '-' {
		return false
	}
	for _, r := range u {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '_', r == '-', r == '.':
		default:
			return false
		}
	}
	return true
}
