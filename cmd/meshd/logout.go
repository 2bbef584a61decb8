package main

import (
	"context"
	"flag"
	"fmt"

	"github.com/peterbourgon/ff/v3/ffcli"

	"meshd.dev/meshd/agent/localapi"
)

func (c *cli) logoutCmd() *ffcli.Command {
	fs := flag.NewFlagSet("logout", flag.ContinueOnError)
	socket := fs.String("socket", localapi.DefaultSocket, "local API unix socket of the daemon")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	return &ffcli.Command{
		Name:       "logout",
		ShortUsage: "meshd logout [--socket PATH] [--json]",
		ShortHelp:  "leave the tailnet for good: an ephemeral node is deleted, any other's key expires (the next up needs an auth key)",
		FlagSet:    fs,
		Options:    envOptions,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return fmt.Errorf("logout: unexpected arguments %q", args)
			}
			res, err := localapi.NewClient(*socket).Logout(ctx)
			if err != nil {
				return noDaemonHint(err, *socket)
			}
			if *asJSON {
				return printJSON(c.stdout, res)
			}
			switch {
			case res.Deleted:
				fmt.Fprintf(c.stdout, "meshd: logged out; ephemeral node %d deleted from the tailnet\n", res.NodeID)
			case res.Expired:
				fmt.Fprintf(c.stdout, "meshd: logged out; node %d's key expired (run `meshd up --authkey KEY` to come back as the same node)\n", res.NodeID)
			default:
				fmt.Fprintf(c.stdout, "meshd: logged out; the coordinator had already deleted or expired node %d (run `meshd up --authkey KEY` to enrol again)\n", res.NodeID)
			}
			return nil
		},
	}
}
