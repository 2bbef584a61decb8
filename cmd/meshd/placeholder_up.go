package main

import (
	"context"
	"errors"
	"flag"

	"github.com/peterbourgon/ff/v3/ffcli"
)

// Placeholder until the owning issue lands; replaced by up.go.
func (c *cli) upCmd() *ffcli.Command {
	return &ffcli.Command{Name: "up", FlagSet: flag.NewFlagSet("up", flag.ContinueOnError),
		Exec: func(context.Context, []string) error { return errors.New("up: not built yet") }}
}
