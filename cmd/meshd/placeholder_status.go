package main

import (
	"context"
	"errors"
	"flag"

	"github.com/peterbourgon/ff/v3/ffcli"
)

// Placeholder until the owning issue lands; replaced by status.go.
func (c *cli) statusCmd() *ffcli.Command {
	return &ffcli.Command{Name: "status", FlagSet: flag.NewFlagSet("status", flag.ContinueOnError),
		Exec: func(context.Context, []string) error { return errors.New("status: not built yet") }}
}
