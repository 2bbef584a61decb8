package main

import (
	"context"
	"errors"
	"flag"

	"github.com/peterbourgon/ff/v3/ffcli"
)

// Placeholder until the owning issue lands; replaced by ip.go.
func (c *cli) ipCmd() *ffcli.Command {
	return &ffcli.Command{Name: "ip", FlagSet: flag.NewFlagSet("ip", flag.ContinueOnError),
		Exec: func(context.Context, []string) error { return errors.New("ip: not built yet") }}
}
