package main

import (
	"context"
	"errors"
	"flag"

	"github.com/peterbourgon/ff/v3/ffcli"
)

// Placeholder until the owning issue lands; replaced by derp.go.
func (c *cli) derpCmd() *ffcli.Command {
	return &ffcli.Command{Name: "derp", FlagSet: flag.NewFlagSet("derp", flag.ContinueOnError),
		Exec: func(context.Context, []string) error { return errors.New("derp: not built yet") }}
}
