package main

import (
	"context"
	"flag"
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/peterbourgon/ff/v3/ffcli"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/control"
	"meshd.dev/meshd/netmap"
)

func (c *cli) routesCmds() []*ffcli.Command {
	return []*ffcli.Command{c.routesListCmd(), c.routeOpCmd("approve"), c.routeOpCmd("reject")}
}

func (c *cli) routesListCmd() *ffcli.Command {
	var asJSON bool
	return c.adminLeaf("list", "meshd admin routes list [--json]", "list advertised, approved and primary routes per node",
		func(fs *flag.FlagSet) { fs.BoolVar(&asJSON, "json", false, "print JSON") },
		func(ctx context.Context, ac *control.AdminClient, args []string) error {
			if len(args) > 0 {
				return &exitError{2, fmt.Sprintf("routes list: unexpected arguments %q", args)}
			}
			rs, err := ac.Routes(ctx)
			if err != nil {
				return fmt.Errorf("routes list: %w", err)
			}
			if asJSON {
				return printJSON(c.stdout, rs)
			}
			var rows [][]string
			for _, r := range rs {
				for _, p := range r.Advertised {
					state := "pending"
					switch {
					case contains(r.Primary, p):
						state = "primary"
					case contains(r.Approved, p) && !netmap.IsExitRoute(p):
						state = "standby"
					case contains(r.Approved, p):
						state = "approved"
					}
					by := "-"
					switch {
					case contains(r.AdminApproved, p):
						by = "admin"
					case contains(r.Approved, p):
						by = "autoApprovers"
					}
					online := "offline"
					if r.Online {
						online = "online"
					}
					rows = append(rows, []string{strconv.FormatUint(uint64(r.ID), 10), r.Hostname, p.String(), state, by, online})
				}
			}
			return table(c.stdout, "ID\tHOSTNAME\tROUTE\tSTATE\tAPPROVED-BY\tNODE", rows)
		})
}

func contains(ps []netip.Prefix, p netip.Prefix) bool {
	for _, q := range ps {
		if q == p {
			return true
		}
	}
	return false
}

// routeOpCmd is `admin routes approve|reject NODE PREFIX`, NODE an id or
// a hostname.
func (c *cli) routeOpCmd(name string) *ffcli.Command {
	help := "approve a route a node advertises (0.0.0.0/0 and ::/0 for an exit node)"
	if name == "reject" {
		help = "withdraw an administrator's approval of a node's route"
	}
	return c.adminLeaf(name, "meshd admin routes "+name+" NODE PREFIX", help, nil,
		func(ctx context.Context, ac *control.AdminClient, args []string) error {
			if len(args) != 2 {
				return &exitError{2, fmt.Sprintf("routes %s: want NODE (id or hostname) and PREFIX, got %q", name, args)}
			}
			p, err := netip.ParsePrefix(args[1])
			if err != nil {
				return &exitError{2, fmt.Sprintf("routes %s: %q is not a prefix such as 10.1.0.0/24", name, args[1])}
			}
			id, err := resolveAdminNode(ctx, ac, args[0])
			if err != nil {
				return fmt.Errorf("routes %s: %w", name, err)
			}
			op := ac.ApproveRoute
			if name == "reject" {
				op = ac.RejectRoute
			}
			if err := op(ctx, id, p); err != nil {
				return fmt.Errorf("routes %s: %w", name, err)
			}
			fmt.Fprintf(c.stdout, "%sd route %v of node %d\n", name, p, id)
			return nil
		})
}

// resolveAdminNode turns an id or a hostname into a node id.
func resolveAdminNode(ctx context.Context, ac *control.AdminClient, arg string) (netmap.NodeID, error) {
	if id, err := strconv.ParseUint(arg, 10, 63); err == nil && id > 0 {
		return netmap.NodeID(id), nil
	}
	ns, err := ac.Nodes(ctx)
	if err != nil {
		return 0, err
	}
	name := strings.TrimSuffix(strings.ToLower(arg), ".")
	for _, n := range ns {
		if strings.EqualFold(n.Hostname, name) || strings.TrimSuffix(strings.ToLower(n.DNSName), ".") == name {
			return n.ID, nil
		}
	}
	return 0, fmt.Errorf("no node with id or hostname %q (meshd admin nodes list shows them)", arg)
}

// routeFlagValues are the routing flags of `meshd up`.
type routeFlagValues struct {
	advertiseRoutes string
	advertiseExit   bool
	acceptRoutes    bool
	exitNode        string
	allowLAN        bool
	snat            bool
}

func (r *routeFlagValues) register(fs *flag.FlagSet) {
	fs.StringVar(&r.advertiseRoutes, "advertise-routes", "", "subnets this node offers to route for the tailnet, comma-separated (10.1.0.0/24,fd00:1::/64); "+
		"they take effect once approved (meshd admin routes approve, or the policy's autoApprovers); --advertise-routes= withdraws them. Kernel TUN mode only")
	fs.BoolVar(&r.advertiseExit, "advertise-exit-node", false, "offer this node as an exit node (not built yet: an error)")
	fs.BoolVar(&r.acceptRoutes, "accept-routes", false, "route to the subnets other nodes advertise (approved, primary routers), "+
		"through a routing table of meshd's own (kernel TUN) or the proxies (netstack)")
	fs.StringVar(&r.exitNode, "exit-node", "", "send this node's internet traffic through the exit node NAME or IP (not built yet: an error)")
	fs.BoolVar(&r.allowLAN, "exit-node-allow-lan-access", false, "with --exit-node, keep reaching the local network directly")
	fs.BoolVar(&r.snat, "snat-subnet-routes", true, "on a subnet router, masquerade forwarded tailnet traffic as the router's own address; "+
		"=false keeps tailnet sources (the subnet must route 100.64.0.0/10 back to this router)")
}

// flags returns the routing flags given, nil if none was.
func (r *routeFlagValues) flags(fs *flag.FlagSet, onCommandLine map[string]bool) (*localapi.RouteFlags, error) {
	var out localapi.RouteFlags
	given, typed := false, false
	var err error
	fs.Visit(func(f *flag.Flag) {
		set := true
		switch f.Name {
		case "advertise-routes":
			var ps []netip.Prefix
			for _, s := range splitList(r.advertiseRoutes) {
				p, perr := netip.ParsePrefix(s)
				if perr != nil {
					err = fmt.Errorf("--advertise-routes: %q is not a prefix such as 10.1.0.0/24", s)
					return
				}
				ps = append(ps, p)
			}
			out.AdvertiseRoutes = &ps
		case "advertise-exit-node":
			out.AdvertiseExitNode = &r.advertiseExit
		case "accept-routes":
			out.AcceptRoutes = &r.acceptRoutes
		case "exit-node":
			out.ExitNode = &r.exitNode
		case "exit-node-allow-lan-access":
			out.ExitNodeAllowLANAccess = &r.allowLAN
		case "snat-subnet-routes":
			out.SNATSubnetRoutes = &r.snat
		default:
			set = false
		}
		if set {
			given = true
			typed = typed || onCommandLine[f.Name]
		}
	})
	if err != nil || !given {
		return nil, err
	}
	out.FromEnv = !typed
	return &out, nil
}

// routesLine describes a node's routes for `meshd status`: each advertised
// route as primary (carried now), standby (approved, another router
// carries it), exit (an approved exit node) or pending (not approved).
func routesLine(n *localapi.Node) string {
	var parts []string
	for _, p := range n.AdvertisedRoutes {
		state := "pending approval"
		switch {
		case contains(n.PrimaryRoutes, p) && netmap.IsExitRoute(p):
			state = "exit node"
		case contains(n.PrimaryRoutes, p):
			state = "primary"
		case contains(n.ApprovedRoutes, p):
			state = "standby"
		}
		parts = append(parts, p.String()+" "+state)
	}
	return strings.Join(parts, ", ")
}
