package control

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"slices"
	"sync"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/control/store"
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
	// maxSSHChecks bounds pending approvals (of all coordinators sharing
	// the database), so that a node cannot grow the database by opening
	// connections.
	maxSSHChecks = 1024
	// A node may report sshEndBurst session ends at once and one more
	// every sshEndEvery (per coordinator it reports to): a busy server's
	// sessions, not a flood into the audit log.
	sshEndBurst = 64
	sshEndEvery = time.Second
)

// sshWaiters wakes the wait requests held on this coordinator when their
// check is approved, here or (through the change feed) on another
// coordinator sharing the database. The checks themselves are in the
// store: this holds only who waits.
type sshWaiters struct {
	mu sync.Mutex
	m  map[string]*sshWaiter
}

type sshWaiter struct {
	done chan struct{} // closed on approval
	n    int           // requests waiting
}

// add returns a channel closed when check id is approved, and a function
// to call when the caller stops waiting.
func (w *sshWaiters) add(id string) (<-chan struct{}, func()) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.m == nil {
		w.m = map[string]*sshWaiter{}
	}
	e := w.m[id]
	if e == nil {
		e = &sshWaiter{done: make(chan struct{})}
		w.m[id] = e
	}
	e.n++
	return e.done, func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		if e.n--; e.n == 0 && w.m[id] == e {
			delete(w.m, id)
		}
	}
}

// wakeAll ends every wait, to read its check again: after the change
// feed was cut, approvals made meanwhile were not announced.
func (w *sshWaiters) wakeAll() {
	w.mu.Lock()
	defer w.mu.Unlock()
	for id, e := range w.m {
		close(e.done)
		delete(w.m, id)
	}
}

// wake ends the waits on check id.
func (w *sshWaiters) wake(id string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if e := w.m[id]; e != nil {
		close(e.done)
		delete(w.m, id)
	}
}

// sshRoutes adds the node's SSH endpoints.
func (s *Server) sshRoutes() {
	s.mux.HandleFunc("POST "+controlclient.SSHAuthorizePath, s.handleSSHAuthorize)
	s.mux.HandleFunc("POST "+controlclient.SSHWaitPath, s.handleSSHWait)
	s.mux.HandleFunc("POST "+controlclient.SSHSessionPath, s.handleSSHSessionEnd)
}

// sshAdminRoutes adds `meshd admin ssh list|approve`.
func (s *Server) sshAdminRoutes(mux *http.ServeMux, h func(func(*http.Request) (any, error)) http.HandlerFunc) {
	mux.HandleFunc("GET /admin/v1/ssh/checks", h(func(r *http.Request) (any, error) { return s.SSHChecks(r.Context()) }))
	mux.HandleFunc("POST /admin/v1/ssh/checks/{id}/approve", h(func(r *http.Request) (any, error) {
		return struct{}{}, s.ApproveSSH(r.Context(), r.PathValue("id"))
	}))
}

// readNodeRequest reads the request of an enrolled node: its machine key,
// the body into req, req's protocol version (version, if not nil) and the
// node. On failure it has answered with the error and returns false.
func (s *Server) readNodeRequest(w http.ResponseWriter, r *http.Request, req any, version func() int) (store.Node, bool) {
	mk, err := machineKey(r)
	if err == nil {
		err = decodeBody(r, req)
	}
	if err == nil && version != nil {
		err = checkVersion(version())
	}
	var n store.Node
	if err == nil {
		n, err = s.nodeForMap(r.Context(), mk)
	}
	if err != nil {
		s.writeError(w, r, err)
		return n, false
	}
	connlimit.Authenticate(r.Context())
	return n, true
}

func (s *Server) handleSSHAuthorize(w http.ResponseWriter, r *http.Request) {
	var req netmap.SSHAuthRequest
	n, ok := s.readNodeRequest(w, r, &req, func() int { return req.Version })
	if !ok {
		return
	}
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
	ok, err := s.store.SSHGranted(s.ctx, resp.Caller.NodeID, dst.ID, user, now)
	if err != nil {
		s.log.Error("ssh login: read approvals", "err", err)
		resp.Action, resp.Message = netmap.SSHReject, "meshd: the coordinator cannot check approvals now; try again later"
		return
	}
	if ok {
		resp.Action = netmap.SSHAccept
		return
	}
	var b [8]byte
	rand.Read(b[:])
	id := hex.EncodeToString(b[:])
	c := store.SSHCheck{
		SSHApproval: netmap.SSHApproval{
			ID: id, Caller: resp.Caller, NodeID: dst.ID, Hostname: dst.Hostname, LocalUser: user,
			Created: now, Expires: now.Add(sshCheckTimeout),
		},
		Period: period,
	}
	switch err := s.store.AddSSHCheck(s.ctx, c, maxSSHChecks, now); {
	case errors.Is(err, store.ErrTooManySSHChecks):
		resp.Action, resp.Message = netmap.SSHReject, "meshd: too many logins wait for approval; try again later"
		return
	case err != nil:
		s.log.Error("ssh login: record check", "err", err)
		resp.Action, resp.Message = netmap.SSHReject, "meshd: the coordinator cannot record the approval request now; try again later"
		return
	}
	resp.CheckID = id
	resp.Message = fmt.Sprintf("meshd: this login needs an administrator's approval; waiting up to %v.\r\n"+
		"Ask an admin to run: meshd admin ssh approve %s\r\n", sshCheckTimeout, id)
}

func (s *Server) handleSSHWait(w http.ResponseWriter, r *http.Request) {
	var req netmap.SSHWaitRequest
	n, ok := s.readNodeRequest(w, r, &req, nil)
	if !ok {
		return
	}
	gone := &netmap.SSHWaitResponse{Message: "meshd: the approval request expired or does not exist"}
	// read reports the check's state; a node waits only on its own
	// checks: another's id is unknown to it.
	read := func() (*netmap.SSHWaitResponse, time.Time, error) {
		c, err := s.store.SSHCheck(r.Context(), req.CheckID, s.now())
		switch {
		case errors.Is(err, store.ErrNotFound) || err == nil && c.NodeID != n.ID:
			return gone, time.Time{}, nil
		case err != nil:
			return nil, time.Time{}, err
		case c.Approved:
			return &netmap.SSHWaitResponse{Approved: true}, c.Expires, nil
		}
		return nil, c.Expires, nil
	}
	resp, expires, err := read()
	if err != nil || resp != nil {
		s.writeSSHWait(w, r, resp, err)
		return
	}
	// Wait first, then read again: an approval committed in between
	// is seen by the read, one after it wakes the wait.
	done, stop := s.sshWaiters.add(req.CheckID)
	defer stop()
	if resp, expires, err = read(); err != nil || resp != nil {
		s.writeSSHWait(w, r, resp, err)
		return
	}
	t := time.NewTimer(max(min(sshWaitPoll, expires.Sub(s.now())), 0))
	defer t.Stop()
	select {
	case <-done:
		resp, _, err = read()
		if err == nil && resp == nil {
			resp = &netmap.SSHWaitResponse{Pending: true}
		}
		s.writeSSHWait(w, r, resp, err)
	case <-t.C:
		if !s.now().Before(expires) {
			writeJSON(w, http.StatusOK, &netmap.SSHWaitResponse{Message: fmt.Sprintf("meshd: no administrator approved this login within %v", sshCheckTimeout)})
			return
		}
		writeJSON(w, http.StatusOK, &netmap.SSHWaitResponse{Pending: true})
	case <-r.Context().Done():
	}
}

func (s *Server) writeSSHWait(w http.ResponseWriter, r *http.Request, resp *netmap.SSHWaitResponse, err error) {
	if err != nil {
		s.writeError(w, r, fmt.Errorf("ssh wait: %w", err))
		return
	}
	writeJSON(w, http.StatusOK, resp)
}

// SSHChecks lists the check-mode logins waiting for approval, or approved
// and not yet expired, of every coordinator sharing the database.
func (s *Server) SSHChecks(ctx context.Context) ([]netmap.SSHApproval, error) {
	cs, err := s.store.SSHChecks(ctx, s.now())
	if err != nil {
		return nil, err
	}
	out := make([]netmap.SSHApproval, 0, len(cs))
	for _, c := range cs {
		out = append(out, c.SSHApproval)
	}
	return out, nil
}

// ApproveSSH approves the pending check id: its connection proceeds, and
// the same caller may log in to the same node as the same user without a
// new approval for the rule's checkPeriod.
func (s *Server) ApproveSSH(ctx context.Context, id string) error {
	c, err := s.store.ApproveSSHCheck(ctx, id, s.now())
	switch {
	case errors.Is(err, store.ErrNotFound):
		return fmt.Errorf("%w: no SSH login waits for approval %q (it expired or was approved): see meshd admin ssh list", controlclient.ErrNotFound, id)
	case errors.Is(err, store.ErrSSHApproved):
		return fmt.Errorf("%w: SSH login %s is already approved", controlclient.ErrBadRequest, id)
	case err != nil:
		return err
	}
	// Waits on other coordinators are woken by the change feed.
	s.sshWaiters.wake(id)
	s.log.Info("ssh login approved", "check", id, "caller", c.Caller.NodeID, "node", c.NodeID, "local_user", c.LocalUser)
	s.audit(ctx, nil, AuditSSHApprove, nodeTarget(c.NodeID), map[string]any{
		"check": id, "caller": c.Caller, "local_user": c.LocalUser, "period": c.Period.String(),
	})
	return nil
}

func (s *Server) handleSSHSessionEnd(w http.ResponseWriter, r *http.Request) {
	var req netmap.SSHSessionEnd
	n, ok := s.readNodeRequest(w, r, &req, func() int { return req.Version })
	if !ok {
		return
	}
	if err := s.sshSessionEnd(r.Context(), &n.Node, req); err != nil {
		s.writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, struct{}{})
}

// sshSessionEnd records node n's report that a session on it ended. The
// event's actor and target are n, whatever the report says.
func (s *Server) sshSessionEnd(ctx context.Context, n *netmap.Node, req netmap.SSHSessionEnd) error {
	if err := checkSessionEnd(req); err != nil {
		return err
	}
	if req.CheckID != "" {
		// A live check names its node: a report cannot borrow another
		// node's approval. An expired one (sessions outlast checks) is
		// recorded as the node says.
		c, err := s.store.SSHCheck(ctx, req.CheckID, s.now())
		switch {
		case err == nil && c.NodeID != n.ID:
			return fmt.Errorf("%w: check %s is not a login to this node", controlclient.ErrBadRequest, req.CheckID)
		case err != nil && !errors.Is(err, store.ErrNotFound):
			return err
		}
	}
	if !s.sshEnds.allow(n.ID, s.now()) {
		return fmt.Errorf("%w: node %d reported more than %d ssh sessions recently (one more every %v)",
			controlclient.ErrRateLimited, n.ID, sshEndBurst, sshEndEvery)
	}
	s.log.Info("ssh session ended", "node", n.ID, "host", n.Hostname, "session", req.SessionID, "check", req.CheckID,
		"caller_node", req.Caller.NodeID, "local_user", req.LocalUser, "kind", req.Kind, "duration", req.Duration, "exit", req.ExitStatus)
	actor := NodeActor(n)
	s.audit(ctx, &actor, AuditSessionEnd, nodeTarget(n.ID), auditSSHSessionEnd{
		Protocol: "ssh", Session: req.SessionID, Check: req.CheckID, Caller: req.Caller, LocalUser: req.LocalUser,
		Kind: req.Kind, Duration: req.Duration.String(), ExitStatus: req.ExitStatus, Recorded: req.Recorded,
	})
	return nil
}

// checkSessionEnd refuses a report with fields out of their domain, so
// that the audit log holds only what a session could have been.
func checkSessionEnd(req netmap.SSHSessionEnd) error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: ssh session report: %s", controlclient.ErrBadRequest, fmt.Sprintf(format, args...))
	}
	switch {
	case !validToken(req.SessionID, 64):
		return bad("session_id %.80q: want 1 to 64 letters, digits, - or _", req.SessionID)
	case req.CheckID != "" && !validToken(req.CheckID, 64):
		return bad("check_id %.80q: want 1 to 64 letters, digits, - or _", req.CheckID)
	case !validLocalUser(req.LocalUser):
		return bad("local_user %.80q is not a local user name", req.LocalUser)
	case req.Kind != netmap.SSHSessionShell && req.Kind != netmap.SSHSessionExec && req.Kind != netmap.SSHSessionSubsystem:
		return bad("kind %.40q: want shell, exec or subsystem", req.Kind)
	case req.Duration < 0:
		return bad("negative duration %v", req.Duration)
	case req.ExitStatus < -1 || req.ExitStatus > 255:
		return bad("exit_status %d: want -1 to 255", req.ExitStatus)
	case len(req.Caller.Hostname) > 255 || len(req.Caller.User) > 255 || len(req.Caller.Tags) > 64:
		return bad("caller too long")
	}
	return nil
}

// validToken accepts 1 to maxLen letters, digits, '-' and '_'.
func validToken(s string, maxLen int) bool {
	if s == "" || len(s) > maxLen {
		return false
	}
	for _, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '_', r == '-':
		default:
			return false
		}
	}
	return true
}

// auditSSHSessionEnd is an AuditSessionEnd event's details, as the node
// that hosted the session reported them.
type auditSSHSessionEnd struct {
	Protocol   string           `json:"protocol"`
	Session    string           `json:"session"`
	Check      string           `json:"check,omitempty"`
	Caller     netmap.SSHCaller `json:"caller"`
	LocalUser  string           `json:"local_user"`
	Kind       string           `json:"kind"`
	Duration   string           `json:"duration"`
	ExitStatus int              `json:"exit_status"`
	Recorded   bool             `json:"recorded,omitempty"`
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
