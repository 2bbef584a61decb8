package main

import (
	"context"
	"errors"
	"flag"

	"github.com/peterbourgon/ff/v3/ffcli"
)

// Placeholder until the owning issue lands; replaced by debug.go.
func (c *cli) debugCmd() *ffcli.Command {
	return &ffcli.Command{Name: "debug", FlagSet: flag.NewFlagSet("debug", flag.ContinueOnError),
		Exec: func(context.Context, []string) error { return errors.New("debug: not built yet") }}
}
