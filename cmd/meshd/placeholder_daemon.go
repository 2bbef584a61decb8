package main

import (
	"context"
	"errors"
	"flag"

	"github.com/peterbourgon/ff/v3/ffcli"
)

// Placeholder until the owning issue lands; replaced by daemon.go.
func (c *cli) daemonCmd() *ffcli.Command {
	return &ffcli.Command{Name: "daemon", FlagSet: flag.NewFlagSet("daemon", flag.ContinueOnError),
		Exec: func(context.Context, []string) error { return errors.New("daemon: not built yet") }}
}
