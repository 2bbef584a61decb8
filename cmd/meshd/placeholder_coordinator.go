package main

import (
	"context"
	"errors"
	"flag"

	"github.com/peterbourgon/ff/v3/ffcli"
)

// Placeholder until the owning issue lands; replaced by coordinator.go.
func (c *cli) coordinatorCmd() *ffcli.Command {
	return &ffcli.Command{Name: "coordinator", FlagSet: flag.NewFlagSet("coordinator", flag.ContinueOnError),
		Exec: func(context.Context, []string) error { return errors.New("coordinator: not built yet") }}
}
