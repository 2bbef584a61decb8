package control

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/control/store"
	"meshd.dev/meshd/netmap"
	"meshd.dev/meshd/policy"
)

// Kinds of audit actors.
const (
	// ActorAdmin is a holder of the admin token.
	ActorAdmin = "admin"
	// ActorNode is a node, authenticated by its machine key.
	ActorNode = "node"
	// ActorCoordinator is the coordinator acting on its own (expiry,
	// ephemeral clean-up, --policy at start, tag re-checks).
	ActorCoordinator = "coordinator"
)

// Actor is who did what an audit event records.
type Actor struct {
	Kind string `json:"kind"`
	// NodeID and Hostname name a node actor.
	NodeID   netmap.NodeID `json:"node_id,omitempty"`
	Hostname string        `json:"hostname,omitempty"`
	// Addr is the address the request came from, when there was one.
	Addr string `json:"addr,omitempty"`
}

func (a Actor) String() string {
	s := a.Kind
	if a.Kind == ActorNode {
		s = fmt.Sprintf("node %d (%s)", a.NodeID, a.Hostname)
	}
	if a.Addr != "" {
		s += " from " + a.Addr
	}
	return s
}

// NodeActor is the actor for node n.
func NodeActor(n *netmap.Node) Actor {
	return Actor{Kind: ActorNode, NodeID: n.ID, Hostname: n.Hostname}
}

// Audit actions. Other packages may add their own (SSH and Kubernetes
// proxy sessions: "ssh.session.start", "k8s.session.start", ...).
const (
	AuditKeyCreate     = "key.create"
	AuditKeyRevoke     = "key.revoke"
	AuditKeyUse        = "key.use"
	AuditNodeRegister  = "node.register"
	AuditNodeKeyRotate = "node.key_rotate"
	AuditNodeDelete    = "node.delete"
	AuditNodeExpire    = "node.expire"
	AuditNodeApprove   = "node.approve"
	AuditNodeTags      = "node.tags"
	AuditNodeUser      = "node.user"
	AuditPolicySet     = "policy.set"
	AuditTagsRemoved   = "node.tags_removed"
	AuditSessionStart  = "session.start"
	AuditSessionEnd    = "session.end"
	AuditSSHLogin      = "ssh.login"   // a node asked whether a login may proceed: the decision
	AuditSSHApprove    = "ssh.approve" // an admin approved a check-mode login
	auditDefaultLimit  = 1000
	auditMaxLimit      = 10000
	auditDetailsMaxLen = 1 << 20
)

// AuditEvent is one entry of the coordinator's audit log.
type AuditEvent struct {
	// ID is assigned when the event is stored; ids increase.
	ID     int64     `json:"id"`
	Time   time.Time `json:"time"`
	Actor  Actor     `json:"actor"`
	Action string    `json:"action"`
	// Target is what the action was done to: a node id, a key id, a
	// policy file name, a session.
	Target string `json:"target,omitempty"`
	// Details says more, as a JSON object (tags before and after, the
	// policy's diff, ...).
	Details json.RawMessage `json:"details,omitempty"`
}

type actorKey struct{}

// WithActor returns ctx carrying who acts, for the audit events of what is
// done under it. The admin API sets the admin actor on every request.
func WithActor(ctx context.Context, a Actor) context.Context {
	return context.WithValue(ctx, actorKey{}, a)
}

func actorFrom(ctx context.Context) Actor {
	if a, ok := ctx.Value(actorKey{}).(Actor); ok {
		return a
	}
	return Actor{Kind: ActorCoordinator}
}

// Audit appends e to the audit log. A zero Time is now; an Actor without
// a Kind is the one ctx carries (WithActor), else the coordinator. Details,
// if any, must be a JSON object. Events are only ever appended: nothing
// updates or deletes them (the database refuses too).
func (s *Server) Audit(ctx context.Context, e AuditEvent) error {
	if e.Action == "" {
		return fmt.Errorf("audit: event without an action")
	}
	if e.Time.IsZero() {
		e.Time = s.now()
	}
	if e.Actor.Kind == "" {
		e.Actor = actorFrom(ctx)
	}
	if len(e.Details) > 0 {
		var obj map[string]json.RawMessage
		if len(e.Details) > auditDetailsMaxLen || json.Unmarshal(e.Details, &obj) != nil {
			return fmt.Errorf("audit %s: details are not a JSON object of at most 1 MiB", e.Action)
		}
	}
	actor, err := json.Marshal(e.Actor)
	if err != nil {
		return fmt.Errorf("audit %s: %w", e.Action, err)
	}
	// The event is written even if the caller's request was cancelled:
	// what was done must not go unrecorded because a client hung up.
	_, err = s.store.AppendAudit(context.WithoutCancel(ctx), store.AuditEvent{
		Time: e.Time.UTC(), Actor: string(actor), Action: e.Action, Target: e.Target, Details: string(e.Details),
	})
	return err
}

// audit records an action the coordinator already carried out: a failure
// to record it is logged loudly, the action stands.
func (s *Server) audit(ctx context.Context, actor *Actor, action, target string, details any) {
	e := AuditEvent{Action: action, Target: target}
	if actor != nil {
		e.Actor = *actor
	}
	if details != nil {
		b, err := json.Marshal(details)
		if err != nil {
			s.log.Error("audit: encode details", "action", action, "err", err)
		}
		e.Details = b
	}
	if err := s.Audit(ctx, e); err != nil {
		s.log.Error("audit log: event not recorded", "action", action, "target", target, "err", err)
	}
}

// AuditLog returns up to limit audit events at or after since, oldest
// first.
func (s *Server) AuditLog(ctx context.Context, since time.Time, limit int) ([]AuditEvent, error) {
	evs, err := s.store.AuditEvents(ctx, since, limit)
	if err != nil {
		return nil, err
	}
	out := make([]AuditEvent, 0, len(evs))
	for _, se := range evs {
		e := AuditEvent{ID: se.ID, Time: se.Time, Action: se.Action, Target: se.Target}
		if err := json.Unmarshal([]byte(se.Actor), &e.Actor); err != nil {
			e.Actor = Actor{Kind: "unreadable: " + se.Actor}
		}
		if se.Details != "" {
			e.Details = json.RawMessage(se.Details)
		}
		out = append(out, e)
	}
	return out, nil
}

// auditRoutes serves the audit log to administrators: read only. There is
// no endpoint that writes, changes or deletes an event.
func (s *Server) auditRoutes(mux *http.ServeMux, h func(func(*http.Request) (any, error)) http.HandlerFunc) {
	mux.HandleFunc("GET /admin/v1/audit", h(func(r *http.Request) (any, error) {
		q := r.URL.Query()
		var since time.Time
		if v := q.Get("since"); v != "" {
			t, err := time.Parse(time.RFC3339Nano, v)
			if err != nil {
				return nil, fmt.Errorf("%w: since %q: want an RFC 3339 time", controlclient.ErrBadRequest, v)
			}
			since = t
		}
		limit := auditDefaultLimit
		if v := q.Get("limit"); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > auditMaxLimit {
				return nil, fmt.Errorf("%w: limit %q: want 1-%d", controlclient.ErrBadRequest, v, auditMaxLimit)
			}
			limit = n
		}
		return s.AuditLog(r.Context(), since, limit)
	}))
}

// AuditLog fetches audit events at or after since (zero: from the start),
// oldest first, in pages of up to limit events until fn returns false or
// the log ends.
func (a *AdminClient) AuditLog(ctx context.Context, since time.Time, fn func(AuditEvent) bool) error {
	seen := map[int64]bool{}
	for {
		u := a.base.JoinPath("/admin/v1/audit")
		q := u.Query()
		if !since.IsZero() {
			q.Set("since", since.UTC().Format(time.RFC3339Nano))
		}
		q.Set("limit", strconv.Itoa(auditDefaultLimit))
		u.RawQuery = q.Encode()
		var page []AuditEvent
		if err := controlclient.DoJSON(ctx, a.hc, http.MethodGet, u.String(), a.token, nil, &page, nil); err != nil {
			return err
		}
		fresh := 0
		for _, e := range page {
			// The next page starts at the last time seen, so events
			// sharing that time come again: skip those already given.
			if seen[e.ID] {
				continue
			}
			if !e.Time.Equal(since) {
				clear(seen)
				since = e.Time
			}
			seen[e.ID] = true
			fresh++
			if !fn(e) {
				return nil
			}
		}
		if len(page) < auditDefaultLimit || fresh == 0 {
			return nil
		}
	}
}

// auditNodeView is what an audit event says about a node.
type auditNodeView struct {
	ID       netmap.NodeID `json:"id"`
	Hostname string        `json:"hostname"`
	User     string        `json:"user,omitempty"`
	Tags     []string      `json:"tags,omitempty"`
}

func auditNode(n *store.Node) auditNodeView {
	return auditNodeView{ID: n.ID, Hostname: n.Hostname, User: n.User, Tags: n.Tags}
}

// auditChange is the details of an event that changed something.
type auditChange struct {
	Before any `json:"before"`
	After  any `json:"after"`
}

func nodeTarget(id netmap.NodeID) string { return "node:" + strconv.FormatUint(uint64(id), 10) }

// bootstrapAsPolicy is the bootstrap default written as a policy, to diff
// a first policy against.
const bootstrapAsPolicy = `{"grants": [{"src": ["*"], "dst": ["*"], "ip": ["*"]}]}`

// policyChange is what the audit log says about a policy change.
type policyChange struct {
	SHA256 string             `json:"sha256"`
	Rules  int                `json:"rules"`
	Diff   *policy.PolicyDiff `json:"diff,omitempty"`
	// Replaced is the file the policy replaced ("" for the bootstrap
	// default).
	Replaced  string `json:"replaced"`
	DiffError string `json:"diff_error,omitempty"`
}

// policyDiff compares p with the stored policy (or the bootstrap
// default), before p replaces it.
func (s *Server) policyDiff(ctx context.Context, p *policy.Policy) policyChange {
	var c policyChange
	old, err := s.store.Policy(ctx)
	var oldP *policy.Policy
	switch {
	case errors.Is(err, store.ErrNotFound):
		oldP, err = policy.Parse("bootstrap", []byte(bootstrapAsPolicy))
	case err == nil:
		c.Replaced = old.File
		oldP, err = policy.Parse(old.File, old.Data)
	}
	if err != nil {
		c.DiffError = err.Error()
		return c
	}
	d := policy.Diff(oldP, p)
	c.Diff = &d
	return c
}

func policyAudit(info PolicyInfo, c policyChange) policyChange {
	c.SHA256, c.Rules = info.SHA256, info.Rules
	return c
}
