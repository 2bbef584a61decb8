package main

import (
	"context"
	"errors"
	"flag"

	"github.com/peterbourgon/ff/v3/ffcli"
)

// Placeholder until the owning issue lands; replaced by down.go.
func (c *cli) downCmd() *ffcli.Command {
	return &ffcli.Command{Name: "down", FlagSet: flag.NewFlagSet("down", flag.ContinueOnError),
		Exec: func(context.Context, []string) error { return errors.New("down: not built yet") }}
}
