package control

import (
	"fmt"
	"net/netip"
	"slices"
	"time"

	"meshd.dev/meshd/internal/clock"
	"meshd.dev/meshd/netmap"
)

// RouteApprover is implemented by policies with "autoApprovers"
// (policy.Engine): AutoApproves reports whether the policy approves node n's
// advertised route p by itself (exit routes: "exitNode"; others: "routes",
// whose prefix must contain p). The coordinator asks it whenever a node
// advertises routes and whenever a policy goes into force, so a route
// auto-approved under one policy stops being routed under a policy that
// no longer approves it (administrator approvals stay).
type RouteApprover interface {
	AutoApproves(n *netmap.Node, p netip.Prefix) bool
}

// routeState is the hub's part of subnet routing: administrator approvals
// and the elected primary router of each subnet. Guarded by hub.mu.
type routeState struct {
	// admin are the routes an administrator approved, per node (the
	// stored store.Node.RoutesApproved).
	admin map[netmap.NodeID][]netip.Prefix
	// routers are the nodes with approved routes, the election's
	// candidates.
	routers map[netmap.NodeID]struct{}
	// primary is the router elected for each approved non-exit prefix. It
	// keeps its role while online, so a router coming back does not
	// move the subnet again.
	primary map[netip.Prefix]netmap.NodeID
	// lastReport is when each router last reported (its heartbeat), or
	// opened its stream.
	lastReport map[netmap.NodeID]time.Time
}

// RouterHeartbeat is how often a node that advertises routes reports to the
// coordinator (the agent's side), and RouterSilence how long a primary
// subnet router may stay silent (four missed reports) before the
// coordinator ends its map stream, which hands its subnets to a standby;
// it looks every routerCheck. Without it a router that vanished from the
// network (no FIN, no RST) kept its subnets until HTTP/2's pings found the
// connection dead: 40 s measured (bench/README.md). A router dropped for a
// slow link only reconnects; its subnets stay with the standby.
const (
	RouterHeartbeat = 2 * time.Second
	RouterSilence   = 4 * RouterHeartbeat
	routerCheck     = time.Second
)

// errRouterSilent ends the map stream of a primary router that stopped
// reporting.
var errRouterSilent = fmt.Errorf("map session dropped: a primary subnet router must report every %v and this one was silent for %v", RouterHeartbeat, RouterSilence)

// noteReport records a report (a heartbeat) of router id.
func (h *hub) noteReport(id netmap.NodeID, now time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.routes.lastReport == nil {
		h.routes.lastReport = make(map[netmap.NodeID]time.Time)
	}
	h.routes.lastReport[id] = now
}

// silentRouters drops the map sessions of the primary subnet routers that
// have not reported since now-RouterSilence and returns their ids. A
// router's clock starts when it reports or opens a stream.
func (h *hub) silentRouters(now time.Time) []netmap.NodeID {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []netmap.NodeID
	for id := range h.routes.routers {
		n := h.nodes[id]
		if n == nil || len(h.sessions[id]) == 0 || !slices.ContainsFunc(n.PrimaryRoutes, func(p netip.Prefix) bool { return !netmap.IsExitRoute(p) }) {
			continue
		}
		last, ok := h.routes.lastReport[id]
		if !ok {
			if h.routes.lastReport == nil {
				h.routes.lastReport = make(map[netmap.NodeID]time.Time)
			}
			h.routes.lastReport[id] = now
			continue
		}
		if now.Sub(last) < RouterSilence {
			continue
		}
		for _, s := range h.sessions[id] {
			h.dropLocked(s, errRouterSilent)
		}
		delete(h.routes.lastReport, id)
		out = append(out, id)
	}
	return out
}

// watchRouters ends the streams of silent primary routers at each tick of
// t, until the server closes.
func (s *Server) watchRouters(t clock.Ticker) {
	defer s.wg.Done()
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C():
			for _, id := range s.hub.silentRouters(s.now()) {
				s.log.Warn("primary subnet router stopped reporting; handing its routes to a standby", "node", id, "silent_for", RouterSilence)
			}
		}
	}
}

// setAdminRoutesLocked records the routes an administrator approved for
// node id; the next upsert of the node applies them.
func (h *hub) setAdminRoutesLocked(id netmap.NodeID, ps []netip.Prefix) {
	if h.routes.admin == nil {
		h.routes.admin = make(map[netmap.NodeID][]netip.Prefix)
	}
	if len(ps) == 0 {
		delete(h.routes.admin, id)
		return
	}
	h.routes.admin[id] = slices.Clone(ps)
}

// approvedLocked returns the routes of n in force: those it advertises
// that an administrator or the policy's autoApprovers approved.
func (h *hub) approvedLocked(n *netmap.Node) []netip.Prefix {
	if len(n.AdvertisedRoutes) == 0 {
		return nil
	}
	admin := h.routes.admin[n.ID]
	ra, _ := h.policy.(RouteApprover)
	var out []netip.Prefix
	for _, p := range n.AdvertisedRoutes {
		if slices.Contains(admin, p) || ra != nil && ra.AutoApproves(n, p) {
			out = append(out, p)
		}
	}
	return out
}

// withRoutes sets n's PrimaryRoutes to ps and its AllowedIPs to its
// addresses plus ps, which is what peers' WireGuard routes to it.
func withRoutes(n *netmap.Node, ps []netip.Prefix) {
	if len(ps) == 0 {
		ps = nil
	}
	n.PrimaryRoutes = ps
	allowed := make([]netip.Prefix, 0, len(n.Addresses)+len(ps))
	allowed = append(allowed, n.Addresses...)
	allowed = append(allowed, ps...)
	n.AllowedIPs = allowed
}

// upsertLocked adds or replaces n, first deciding its approved and primary
// routes, and re-elects the primaries n's change moves (its going offline
// hands its subnets to a standby router). n must not be modified
// afterwards.
func (h *hub) upsertLocked(n *netmap.Node) {
	n.ApprovedRoutes = h.approvedLocked(n)
	if len(n.ApprovedRoutes) == 0 {
		n.ApprovedRoutes = nil
	}
	_, wasRouter := h.routes.routers[n.ID]
	if len(n.ApprovedRoutes) == 0 && !wasRouter {
		withRoutes(n, nil)
		h.upsertOneLocked(n)
		return
	}
	if h.routes.routers == nil {
		h.routes.routers = make(map[netmap.NodeID]struct{})
	}
	if len(n.ApprovedRoutes) > 0 {
		h.routes.routers[n.ID] = struct{}{}
	} else {
		delete(h.routes.routers, n.ID)
	}
	prim := h.electLocked(n)
	withRoutes(n, prim[n.ID])
	h.upsertOneLocked(n)
	h.applyElectionLocked(prim, n.ID)
}

// reelectLocked runs the election after a node left the hub.
func (h *hub) reelectLocked() {
	if len(h.routes.routers) == 0 && len(h.routes.primary) == 0 {
		return
	}
	h.applyElectionLocked(h.electLocked(nil), 0)
}

// reapproveLocked re-checks every advertiser's approvals, after a policy
// change (autoApprovers may differ).
func (h *hub) reapproveLocked() {
	for _, n := range h.allLocked() {
		if len(n.AdvertisedRoutes) == 0 {
			continue
		}
		if a := h.approvedLocked(n); !slices.Equal(a, n.ApprovedRoutes) {
			nn := *n
			h.upsertLocked(&nn)
		}
	}
}

// applyElectionLocked republishes the routers (other than skip) whose
// primary routes prim changes. Only routers can gain or lose primaries
// here: a node that stops being a router is the one being upserted (skip,
// already given its routes) or one that left the hub.
func (h *hub) applyElectionLocked(prim map[netmap.NodeID][]netip.Prefix, skip netmap.NodeID) {
	ids := make([]netmap.NodeID, 0, len(h.routes.routers))
	for id := range h.routes.routers {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for _, id := range ids {
		if id == skip {
			continue
		}
		cur := h.nodes[id]
		if cur == nil || slices.Equal(cur.PrimaryRoutes, prim[id]) {
			continue
		}
		nn := *cur
		withRoutes(&nn, prim[id])
		h.upsertOneLocked(&nn)
	}
}

// electLocked decides which router carries each approved route, with n
// (if non-nil) standing for its hub entry. Exit routes are every approved
// exit node's (a client picks one). Of the routers approved for a subnet,
// the current primary stays while it is online; otherwise the online
// router with the lowest id takes over; with none online the current one
// stays (nothing better exists, and the routes come back with it).
func (h *hub) electLocked(n *netmap.Node) map[netmap.NodeID][]netip.Prefix {
	out := make(map[netmap.NodeID][]netip.Prefix)
	cands := make(map[netip.Prefix][]*netmap.Node)
	ids := make([]netmap.NodeID, 0, len(h.routes.routers))
	for id := range h.routes.routers {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for _, id := range ids {
		r := h.nodes[id]
		if n != nil && id == n.ID {
			r = n
		}
		if r == nil {
			continue
		}
		for _, p := range r.ApprovedRoutes {
			if netmap.IsExitRoute(p) {
				out[id] = append(out[id], p)
				continue
			}
			cands[p] = append(cands[p], r)
		}
	}
	for p := range h.routes.primary {
		if _, ok := cands[p]; !ok {
			delete(h.routes.primary, p)
		}
	}
	if h.routes.primary == nil {
		h.routes.primary = make(map[netip.Prefix]netmap.NodeID)
	}
	for p, rs := range cands {
		pick := pickPrimary(rs, h.routes.primary[p])
		h.routes.primary[p] = pick
		out[pick] = append(out[pick], p)
	}
	for id := range out {
		netmap.SortPrefixes(out[id])
	}
	return out
}

// pickPrimary chooses among rs (sorted by id) given the current primary.
func pickPrimary(rs []*netmap.Node, cur netmap.NodeID) netmap.NodeID {
	curIn := false
	for _, r := range rs {
		if r.ID == cur {
			if r.Online {
				return cur
			}
			curIn = true
		}
	}
	for _, r := range rs {
		if r.Online {
			return r.ID
		}
	}
	if curIn {
		return cur
	}
	return rs[0].ID
}

// upsertRouted adds or replaces n with the routes an administrator
// approved for it (the stored store.Node.RoutesApproved).
func (h *hub) upsertRouted(n *netmap.Node, adminApproved []netip.Prefix) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.setAdminRoutesLocked(n.ID, adminApproved)
	h.upsertLocked(n)
}
