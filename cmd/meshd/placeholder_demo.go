package main

import (
	"context"
	"errors"
	"flag"

	"github.com/peterbourgon/ff/v3/ffcli"
)

// Placeholder until the owning issue lands; replaced by demo.go.
func (c *cli) demoCmd() *ffcli.Command {
	return &ffcli.Command{Name: "demo", FlagSet: flag.NewFlagSet("demo", flag.ContinueOnError),
		Exec: func(context.Context, []string) error { return errors.New("demo: not built yet") }}
}
