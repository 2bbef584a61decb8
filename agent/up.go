package agent

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strings"
	"time"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/netmap"
)

// upAction is what `meshd up` does to the node's registration before
// bringing it up.
type upAction int

const (
	upStart    upAction = iota // nothing: bring the registered node up as it is
	upRegister                 // register with an auth key (first time, or again)
	upRetag                    // ask the coordinator for new tags
)

// registration is one registration with an auth key.
type registration struct {
	coordinator string
	pin         string // "" the first time: the client pins from the key
	hostname    string // "" the first time: the system hostname
	authKey     string
	tags        []string
	noAcceptDNS bool // --accept-dns=false
	ssh         bool // --ssh
}

// upPlan is what Up will do, decided before it changes anything.
type upPlan struct {
	action upAction
	reg    registration // upRegister
	tags   []string     // upRetag
	// acceptDNS, when set, is a new --accept-dns setting to keep.
	acceptDNS *bool
	// note is said in the returned status (a setting from the
	// environment that was not needed).
	note string
}

// enrolment is what planUp needs to know of the node.
type enrolment struct {
	login *Login // nil: never registered
	// tags are the node's tags now: from the latest map, else from the
	// registration.
	tags []string
	// needsReauth: the coordinator deleted or expired the node, so an auth
	// key enrols it again.
	needsReauth bool
}

// planUp decides what Up does with req, or refuses it, before anything
// changes. On a registered node every setting of req must either change
// something the node can change or match what it is; one that would
// change nothing is an error saying why and what to do, never silently
// ignored. Settings from the environment (a container passing the same
// MESHD_* on every start) are the exception: an auth key the node does
// not need and tags it already has are fine there.
func planUp(cur enrolment, req localapi.UpRequest) (upPlan, error) {
	tagsGiven := req.SetTags || len(req.Tags) > 0
	noAcceptDNS := req.AcceptDNS != nil && !*req.AcceptDNS
	tags, err := netmap.NormalizeTags(req.Tags)
	if err != nil {
		return upPlan{}, fmt.Errorf("--advertise-tags: %w", err)
	}
	l := cur.login
	if l == nil {
		switch {
		case req.AuthKey == "":
			return upPlan{}, errors.New("this node is not registered yet: pass --authkey KEY --coordinator URL")
		case req.Coordinator == "":
			return upPlan{}, errors.New("no coordinator: pass --coordinator URL")
		}
		return upPlan{action: upRegister, reg: registration{
			coordinator: req.Coordinator, hostname: req.Hostname, authKey: req.AuthKey, tags: tags, noAcceptDNS: noAcceptDNS,
		}}, nil
	}
	if req.Coordinator != "" && req.Coordinator != l.CoordinatorURL {
		return upPlan{}, fmt.Errorf("this node is registered with %s, not %s: use a fresh --state-dir to join another coordinator",
			l.CoordinatorURL, req.Coordinator)
	}
	reauth := registration{
		coordinator: l.CoordinatorURL, pin: l.ServerPin, authKey: req.AuthKey,
		hostname:    cmp.Or(req.Hostname, l.RequestedHostname, l.Hostname),
		noAcceptDNS: l.NoAcceptDNS,
	}
	if req.AcceptDNS != nil {
		reauth.noAcceptDNS = noAcceptDNS
	}
	if tagsGiven {
		reauth.tags = tags
	}
	switch {
	case req.ForceReauth && req.AuthKey == "":
		return upPlan{}, errors.New("--force-reauth registers this node again with a new auth key: pass --authkey KEY")
	case req.ForceReauth, cur.needsReauth && req.AuthKey != "":
		return upPlan{action: upRegister, reg: reauth}, nil
	case req.AuthKey != "" && !req.AuthKeyFromEnv:
		return upPlan{}, fmt.Errorf("this node is already registered (as %s, node %d): --authkey only enrols a node, so it would change nothing; "+
			"to register it again with this key run `meshd up --force-reauth --authkey KEY`, to bring it up as it is run `meshd up` without --authkey", l.Hostname, l.NodeID)
	}
	var note string
	if req.AuthKey != "" {
		note = "MESHD_AUTHKEY not used: this node is already registered (`meshd up --force-reauth` registers it again with the key)"
	}
	if req.Hostname != "" && !hostnameMatches(l, req.Hostname) {
		return upPlan{}, fmt.Errorf("this node is registered as %q and meshd does not rename an enrolled node, so --hostname %q would change nothing: "+
			"register it again under the new name with `meshd up --force-reauth --authkey KEY --hostname %s`, or drop --hostname (MESHD_HOSTNAME)", l.Hostname, req.Hostname, req.Hostname)
	}
	var acceptDNS *bool
	switch accepting := !l.NoAcceptDNS; {
	case req.AcceptDNS == nil:
	case *req.AcceptDNS != accepting:
		acceptDNS = req.AcceptDNS
	case req.AcceptDNSFromEnv:
	case *req.AcceptDNS:
		return upPlan{}, errors.New("this node already uses the tailnet's DNS (--accept-dns is the default), so --accept-dns changes nothing")
	default:
		return upPlan{}, errors.New("this node already leaves the host's DNS alone, so --accept-dns=false changes nothing (`meshd up --accept-dns` turns MagicDNS on again)")
	}
	if !tagsGiven {
		return upPlan{action: upStart, note: note, acceptDNS: acceptDNS}, nil
	}
	same := slices.Equal(tags, cur.tags)
	switch {
	case same && req.TagsFromEnv:
		return upPlan{action: upStart, note: note, acceptDNS: acceptDNS}, nil
	case same && len(tags) == 0:
		return upPlan{}, errors.New("this node has no tags, so --advertise-tags= changes nothing")
	case same:
		return upPlan{}, fmt.Errorf("this node already has the tags %s, so --advertise-tags changes nothing", strings.Join(tags, ","))
	case len(tags) == 0:
		return upPlan{}, fmt.Errorf("this node is tagged %s and cannot drop its tags by itself: return it to a user by registering it with that user's key, "+
			"`meshd up --force-reauth --authkey USERKEY --advertise-tags=` (or an admin runs `meshd admin nodes tag %d --user LOGIN`)", strings.Join(cur.tags, ","), l.NodeID)
	}
	return upPlan{action: upRetag, tags: tags, note: note, acceptDNS: acceptDNS}, nil
}

// planSSH decides what `--ssh[=false]` does: nil leaves the setting as
// it is. On a registered node a value it has already changes nothing and
// is an error, unless it came from the environment.
func planSSH(l *Login, req localapi.UpRequest) (*bool, error) {
	switch {
	case req.SSH == nil:
		return nil, nil
	case l == nil, *req.SSH != l.SSH:
		return req.SSH, nil
	case req.SSHFromEnv:
		return nil, nil
	case *req.SSH:
		return nil, errors.New("this node already runs the SSH server, so --ssh changes nothing (`meshd up --ssh=false` turns it off)")
	}
	return nil, errors.New("this node runs no SSH server, so --ssh=false changes nothing")
}

// hostnameMatches reports whether h names the node as it registered: the
// name it asked for, or the one the coordinator gave it (sanitized, or with
// a suffix on a clash).
func hostnameMatches(l *Login, h string) bool {
	h = strings.TrimSpace(h)
	return strings.EqualFold(h, l.Hostname) || l.RequestedHostname != "" && strings.EqualFold(h, l.RequestedHostname)
}

// Up joins the tailnet: it registers with an auth key the first time (or
// again, with --force-reauth or after the coordinator dropped the node),
// changes the node's tags when asked, and otherwise brings the registered
// node up as it is. It waits (bounded by ctx) for the first network map,
// or until the coordinator says the node waits for an admin's approval
// (BackendState NeedsApproval: the node comes up by itself once approved).
// A request that would change nothing on a registered node is an error.
func (a *Agent) Up(ctx context.Context, req localapi.UpRequest) (*localapi.Status, error) {
	a.upMu.Lock()
	defer a.upMu.Unlock()
	st, err := a.up(ctx, req)
	if err != nil && req.AuthKey != "" && needsReauth(err) {
		// Found out only now (the stream was refused) that the
		// coordinator dropped this node, e.g. an ephemeral node whose
		// container restarted with its old state volume: enrol again.
		return a.up(ctx, req)
	}
	return st, err
}

func (a *Agent) up(ctx context.Context, req localapi.UpRequest) (*localapi.Status, error) {
	if req.AuthKey != "" && !req.AuthKeyFromEnv && !req.ForceReauth {
		// Whether the key is needed depends on the coordinator's verdict on
		// a session that is starting (the daemon just started): wait for it.
		a.awaitUp(ctx, 20*time.Second, nil)
	}
	a.mu.Lock()
	cur := enrolment{login: a.login, needsReauth: needsReauth(a.ctlErr)}
	switch {
	case a.nm != nil:
		cur.tags = a.nm.Self.Tags
	case a.login != nil:
		cur.tags = a.login.Tags
	}
	a.mu.Unlock()
	plan, err := planUp(cur, req)
	if err != nil {
		return nil, err
	}
	sshSet, err := planSSH(cur.login, req)
	if err != nil {
		return nil, err
	}
	if plan.action == upRegister {
		plan.reg.ssh = sshSet != nil && *sshSet || sshSet == nil && cur.login != nil && cur.login.SSH
	}
	var curPrefs localapi.RoutePrefs
	if cur.login != nil {
		curPrefs = cur.login.Routing
	}
	routing, routingChanged, err := planRouting(curPrefs, req.Routing, a.opts.TUN == TUNUserspace)
	if err != nil {
		return nil, err
	}
	if req.AcceptDNS != nil && a.opts.TUN == TUNUserspace {
		plan.note = strings.TrimPrefix(plan.note+"; ", "; ") +
			"--accept-dns is kept for kernel TUN mode; this daemon runs the netstack, which never changes the host's DNS"
	}
	// want, when set, is the self the coordinator must send before Up
	// returns, so that the status shows the change just made.
	var want func(*netmap.Node) bool
	switch plan.action {
	case upRegister:
		if cur.login != nil {
			a.log.Info("registering again with an auth key", "force", req.ForceReauth, "reason", a.ctlErrText())
		}
		n, err := a.register(ctx, plan.reg)
		if err != nil {
			return nil, err
		}
		want = func(self *netmap.Node) bool {
			return self.User == n.User && self.Hostname == n.Hostname && slices.Equal(self.Tags, n.Tags)
		}
	case upRetag:
		n, err := a.retag(ctx, plan.tags)
		if err != nil {
			return nil, err
		}
		want = func(self *netmap.Node) bool { return slices.Equal(self.Tags, n.Tags) }
	}
	a.mu.Lock()
	login := a.login
	if !login.WantRunning || plan.acceptDNS != nil || sshSet != nil && *sshSet != login.SSH || routingChanged {
		l := *login
		l.WantRunning = true
		if plan.acceptDNS != nil {
			l.NoAcceptDNS = !*plan.acceptDNS
		}
		if sshSet != nil {
			l.SSH = *sshSet
		}
		if routingChanged {
			l.Routing = routing
		}
		if err := a.store.SaveLogin(&l); err != nil {
			a.mu.Unlock()
			return nil, err
		}
		a.login = &l
	}
	a.startLocked()
	if routingChanged {
		a.routingChangedLocked()
	}
	if plan.acceptDNS != nil && a.eng != nil && a.nm != nil {
		// A running data plane takes the new setting now.
		a.syncOSDNSLocked(a.nm)
	}
	if sshSet != nil && a.eng != nil {
		a.sshAttachLocked()
	}
	// With the data plane already up from the saved map, wait only briefly
	// for the coordinator: long enough to report a refused connection (pin
	// mismatch, node deleted), short enough that `meshd up` with the
	// coordinator down returns promptly; the node works meanwhile.
	timeout := 20 * time.Second
	if a.eng != nil {
		timeout = 5 * time.Second
	}
	a.mu.Unlock()
	a.awaitUp(ctx, timeout, want)
	a.mu.Lock()
	engErr, ctlErr := a.engErr, a.ctlErr
	a.mu.Unlock()
	if ctlErr != nil {
		return nil, explainControlError(login.CoordinatorURL, ctlErr)
	}
	if engErr != nil {
		return nil, fmt.Errorf("registered, but the data plane failed: %w", engErr)
	}
	st, err := a.Status(ctx)
	if err != nil {
		return nil, err
	}
	if plan.note != "" {
		st.Message = strings.TrimPrefix(st.Message+"; ", "; ") + plan.note
	}
	return st, nil
}

// awaitUp waits, at most timeout, until the control session has given its
// verdict: a network map (whose self satisfies want, if set), the end of
// the session, or the news that the node waits for approval. It returns at
// once when no session runs.
func (a *Agent) awaitUp(ctx context.Context, timeout time.Duration, want func(*netmap.Node) bool) {
	wait, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		a.mu.Lock()
		ch := a.changed
		settled := a.sess == nil || a.approvalPending || closed(a.sess.done) ||
			closed(a.mapSeen) && a.nm != nil && (want == nil || want(&a.nm.Self))
		a.mu.Unlock()
		if settled {
			return
		}
		select {
		case <-ch:
		case <-wait.Done():
			return
		}
	}
}

func closed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// notifyLocked wakes everyone waiting for a change of state (awaitUp,
// WaitState). a.mu must be held.
func (a *Agent) notifyLocked() {
	close(a.changed)
	a.changed = make(chan struct{})
}

// WaitState returns the node's status as soon as its BackendState is not
// from, or the current status when ctx ends (`meshd up` waiting for an
// admin's approval).
func (a *Agent) WaitState(ctx context.Context, from string) (*localapi.Status, error) {
	for {
		a.mu.Lock()
		ch := a.changed
		a.mu.Unlock()
		st, err := a.Status(ctx)
		if err != nil || st.BackendState != from {
			return st, err
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return st, nil
		}
	}
}

func (a *Agent) ctlErrText() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.ctlErr == nil {
		return ""
	}
	return a.ctlErr.Error()
}

// register registers the machine with an auth key and installs the new
// login. A running control session is kept: the coordinator pushes the new
// identity to it, so peers never lose the node while it registers again.
// On failure nothing changes.
func (a *Agent) register(ctx context.Context, r registration) (*netmap.Node, error) {
	hostname := r.hostname
	if hostname == "" {
		h, err := os.Hostname()
		if err != nil {
			return nil, fmt.Errorf("no --hostname given and the system hostname is unknown: %w", err)
		}
		hostname = h
	}
	cc, err := a.opts.NewControlClient(ControlConfig{URL: r.coordinator, MachineKey: a.id.MachineKey, ServerPin: r.pin, NodeKey: a.id.NodeKey, Logger: a.log, DialContext: a.underlayDial()})
	if err != nil {
		return nil, err
	}
	defer cc.Close()
	resp, err := cc.Register(ctx, netmap.RegisterRequest{
		Version: netmap.ProtocolVersion, NodeKey: a.NodeKey(), DiscoKey: a.disco.Public(),
		Hostname: hostname, OS: runtime.GOOS, AuthKey: r.authKey, RequestTags: r.tags,
	})
	if err != nil {
		return nil, explainControlError(r.coordinator, err)
	}
	l := &Login{
		CoordinatorURL: r.coordinator, ServerPin: cmp.Or(cc.ServerPin(), resp.ServerKey), NodeID: resp.Node.ID,
		Hostname: resp.Node.Hostname, RequestedHostname: hostname, Tags: resp.Node.Tags, Ephemeral: resp.Node.Ephemeral,
		WantRunning: true, NoAcceptDNS: r.noAcceptDNS, SSH: r.ssh,
	}
	a.mu.Lock()
	if a.login != nil {
		l.Routing = a.login.Routing // registering again keeps the routing preferences
	}
	a.mu.Unlock()
	if err := a.store.SaveLogin(l); err != nil {
		return nil, err
	}
	a.mu.Lock()
	a.login = l
	a.ctlErr = nil
	a.notifyLocked()
	a.mu.Unlock()
	a.log.Info("registered", "node_id", resp.Node.ID, "hostname", resp.Node.Hostname, "tags", resp.Node.Tags, "user", resp.Node.User, "addresses", resp.Node.Addresses)
	return &resp.Node, nil
}

// retag asks the coordinator to replace the node's tags (authenticated by
// the machine key; the policy's tagOwners decide) and records them. On
// failure nothing changes.
func (a *Agent) retag(ctx context.Context, tags []string) (*netmap.Node, error) {
	a.mu.Lock()
	login := *a.login
	a.mu.Unlock()
	cc, err := a.opts.NewControlClient(a.controlCfg(login))
	if err != nil {
		return nil, err
	}
	defer cc.Close()
	resp, err := cc.SetTags(ctx, netmap.SetTagsRequest{Version: netmap.ProtocolVersion, Tags: tags})
	if err != nil {
		return nil, explainRetagError(login.CoordinatorURL, login.NodeID, tags, err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	l := *a.login
	l.Tags = resp.Node.Tags
	if err := a.store.SaveLogin(&l); err != nil {
		return nil, err
	}
	a.login = &l
	a.log.Info("re-tagged", "node_id", resp.Node.ID, "tags", resp.Node.Tags)
	return &resp.Node, nil
}
