package main

import (
	"context"
	"flag"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/peterbourgon/ff/v3/ffcli"

	"meshd.dev/meshd/agent/localapi"
)

func (c *cli) ipCmd() *ffcli.Command {
	fs := flag.NewFlagSet("ip", flag.ContinueOnError)
	socket := fs.String("socket", localapi.DefaultSocket, "local API unix socket of the daemon")
	only4 := fs.Bool("4", false, "only the IPv4 address")
	only6 := fs.Bool("6", false, "only the IPv6 address")
	return &ffcli.Command{
		Name:       "ip",
		ShortUsage: "meshd ip [-4|-6] [PEER]",
		ShortHelp:  "print this node's (or PEER's) tailnet addresses",
		FlagSet:    fs,
		Options:    envOptions,
		Exec: func(ctx context.Context, args []string) error {
			if *only4 && *only6 {
				return &exitError{code: 2, msg: "ip: -4 and -6 are exclusive"}
			}
			if len(args) > 1 {
				return &exitError{code: 2, msg: "ip: at most one PEER (hostname, node id or address)"}
			}
			st, err := localapi.NewClient(*socket).Status(ctx)
			if err != nil {
				return noDaemonHint(err, *socket)
			}
			n, err := findNode(st, args)
			if err != nil {
				return err
			}
			printed := false
			for _, ip := range n.IPs {
				if (*only4 && !ip.Is4()) || (*only6 && !ip.Is6()) {
					continue
				}
				fmt.Fprintln(c.stdout, ip)
				printed = true
			}
			if !printed {
				return fmt.Errorf("ip: %s has no matching address", n.Hostname)
			}
			return nil
		},
	}
}

// findNode returns self (no args) or the peer named by args[0]: a
// hostname, a node id or one of its addresses. A query that matches more
// than one node (two nodes with one name, from a coordinator that does
// not keep names unique) is an error naming them, never a guess.
func findNode(st *localapi.Status, args []string) (*localapi.Node, error) {
	if len(args) == 0 {
		if st.Self == nil || len(st.Self.IPs) == 0 {
			return nil, fmt.Errorf("ip: no addresses yet (state %s): run meshd up", st.BackendState)
		}
		return st.Self, nil
	}
	q := args[0]
	ip, ipErr := netip.ParseAddr(q)
	id, idErr := strconv.ParseUint(q, 10, 64)
	nodes := []*localapi.Node{}
	if st.Self != nil {
		nodes = append(nodes, st.Self)
	}
	for i := range st.Peers {
		nodes = append(nodes, &st.Peers[i].Node)
	}
	var found []*localapi.Node
	for _, n := range nodes {
		match := strings.EqualFold(n.Hostname, q) || idErr == nil && uint64(n.ID) == id
		if ipErr == nil && slices.Contains(n.IPs, ip.Unmap()) {
			match = true
		}
		if match {
			found = append(found, n)
		}
	}
	switch len(found) {
	case 0:
		return nil, fmt.Errorf("ip: no peer %q (see meshd status)", q)
	case 1:
		return found[0], nil
	}
	who := make([]string, len(found))
	for i, n := range found {
		who[i] = fmt.Sprintf("%s (node %d)", n.Hostname, n.ID)
	}
	return nil, fmt.Errorf("ip: %q matches %d nodes: %s; name one by its node id", q, len(found), strings.Join(who, ", "))
}
