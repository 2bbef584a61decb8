package main

import (
	"context"
	"flag"
	"fmt"

	"github.com/peterbourgon/ff/v3/ffcli"

	"meshd.dev/meshd/agent/localapi"
)

func (c *cli) downCmd() *ffcli.Command {
	fs := flag.NewFlagSet("down", flag.ContinueOnError)
	socket := fs.String("socket", localapi.DefaultSocket, "local API unix socket of the daemon")
	return &ffcli.Command{
		Name:       "down",
		ShortUsage: "meshd down [--socket PATH]",
		ShortHelp:  "leave the tailnet until the next `meshd up` (keeps keys and registration)",
		FlagSet:    fs,
		Options:    envOptions,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return fmt.Errorf("down: unexpected arguments %q", args)
			}
			if err := localapi.NewClient(*socket).Down(ctx); err != nil {
				return noDaemonHint(err, *socket)
			}
			fmt.Fprintln(c.stdout, "meshd: down (run `meshd up` to reconnect; no auth key needed)")
			return nil
		},
	}
}
