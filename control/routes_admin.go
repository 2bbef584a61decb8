package control

import (
	"context"
	"fmt"
	"net/http"
	"net/netip"
	"slices"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
)

// RouteInfo is one node's routes as `meshd admin routes list` shows them.
type RouteInfo struct {
	ID       netmap.NodeID `json:"id"`
	Hostname string        `json:"hostname"`
	Online   bool          `json:"online"`
	// Advertised are the routes the node offers.
	Advertised []netip.Prefix `json:"advertised"`
	// Approved are the advertised routes in force (by an administrator or
	// the policy's autoApprovers).
	Approved []netip.Prefix `json:"approved"`
	// AdminApproved are those an administrator approved (they survive a
	// policy change); an approval of a route the node stopped advertising
	// is kept and applies again when it advertises it.
	AdminApproved []netip.Prefix `json:"admin_approved"`
	// Primary are the approved routes this node carries now; an approved
	// subnet route not in Primary is on standby behind another router.
	Primary []netip.Prefix `json:"primary"`
}

// Routes lists every node that advertises routes or has approvals.
func (s *Server) Routes(ctx context.Context) ([]RouteInfo, error) {
	ns, err := s.store.Nodes(ctx)
	if err != nil {
		return nil, err
	}
	out := []RouteInfo{}
	for _, n := range ns {
		if len(n.AdvertisedRoutes) == 0 && len(n.RoutesApproved) == 0 {
			continue
		}
		ri := RouteInfo{ID: n.ID, Hostname: n.Hostname, Advertised: nonNil(n.AdvertisedRoutes), AdminApproved: nonNil(n.RoutesApproved),
			Approved: []netip.Prefix{}, Primary: []netip.Prefix{}}
		if cur := s.hub.get(n.ID); cur != nil {
			ri.Online, ri.Advertised = cur.Online, nonNil(cur.AdvertisedRoutes)
			ri.Approved, ri.Primary = nonNil(cur.ApprovedRoutes), nonNil(cur.PrimaryRoutes)
		}
		out = append(out, ri)
	}
	return out, nil
}

// ApproveRoute approves route p of node id. Only an advertised route can
// be approved (so a typo is an error, not a silent pre-approval); for an
// exit node approve 0.0.0.0/0 and ::/0 (each or both). Approving what an
// administrator already approved is an error: it would change nothing.
func (s *Server) ApproveRoute(ctx context.Context, id netmap.NodeID, p netip.Prefix) error {
	return s.changeRoute(ctx, id, p, true)
}

// RejectRoute withdraws an administrator's approval of route p of node id.
// A route approved only by the policy's autoApprovers cannot be rejected
// here (the error says to change the policy).
func (s *Server) RejectRoute(ctx context.Context, id netmap.NodeID, p netip.Prefix) error {
	return s.changeRoute(ctx, id, p, false)
}

func (s *Server) changeRoute(ctx context.Context, id netmap.NodeID, p netip.Prefix, approve bool) error {
	if ps, err := netmap.CheckRoutableIPs([]netip.Prefix{p}); err != nil || len(ps) != 1 {
		return fmt.Errorf("%w: %v", controlclient.ErrBadRequest, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	n, err := s.storeNode(ctx, id)
	if err != nil {
		return err
	}
	advertised := n.AdvertisedRoutes
	if cur := s.hub.get(id); cur != nil {
		advertised = cur.AdvertisedRoutes
	}
	has := slices.Contains(n.RoutesApproved, p)
	switch {
	case approve && has:
		return fmt.Errorf("%w: route %v of node %d (%s) is already approved, so approving it changes nothing", controlclient.ErrBadRequest, p, id, n.Hostname)
	case approve && !slices.Contains(advertised, p):
		return fmt.Errorf("%w: node %d (%s) does not advertise %v (it advertises %v): only advertised routes can be approved",
			controlclient.ErrBadRequest, id, n.Hostname, p, advertised)
	case !approve && !has:
		if cur := s.hub.get(id); cur != nil && slices.Contains(cur.ApprovedRoutes, p) {
			return fmt.Errorf("%w: route %v of node %d (%s) is approved by the policy's autoApprovers, not by an administrator: change the policy to withdraw it",
				controlclient.ErrBadRequest, p, id, n.Hostname)
		}
		return fmt.Errorf("%w: route %v of node %d (%s) is not approved, so rejecting it changes nothing", controlclient.ErrBadRequest, p, id, n.Hostname)
	}
	if approve {
		n.RoutesApproved = append(slices.Clone(n.RoutesApproved), p)
		netmap.SortPrefixes(n.RoutesApproved)
	} else {
		n.RoutesApproved = slices.DeleteFunc(slices.Clone(n.RoutesApproved), func(q netip.Prefix) bool { return q == p })
		if len(n.RoutesApproved) == 0 {
			n.RoutesApproved = nil
		}
	}
	n.AdminActed = s.now().UTC()
	if err := s.store.UpdateNode(ctx, n); err != nil {
		return err
	}
	s.log.Info("route approval changed by administrator", "node", id, "route", p, "approved", approve)
	s.republishLocked(n)
	return nil
}

type routeRequest struct {
	Route string `json:"route"`
}

func (s *Server) routeAdminRoutes(mux *http.ServeMux, h func(func(*http.Request) (any, error)) http.HandlerFunc) {
	mux.HandleFunc("GET /admin/v1/routes", h(func(r *http.Request) (any, error) { return s.Routes(r.Context()) }))
	op := func(approve bool) http.HandlerFunc {
		return h(func(r *http.Request) (any, error) {
			id, err := parseNodeID(r.PathValue("id"))
			if err != nil {
				return nil, err
			}
			var req routeRequest
			if err := decodeBody(r, &req); err != nil {
				return nil, err
			}
			p, err := netip.ParsePrefix(req.Route)
			if err != nil {
				return nil, fmt.Errorf("%w: route %q is not a prefix such as 10.1.0.0/24", controlclient.ErrBadRequest, req.Route)
			}
			return struct{}{}, s.changeRoute(r.Context(), id, p, approve)
		})
	}
	mux.HandleFunc("POST /admin/v1/nodes/{id}/routes/approve", op(true))
	mux.HandleFunc("POST /admin/v1/nodes/{id}/routes/reject", op(false))
}
