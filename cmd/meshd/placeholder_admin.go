package main

import (
	"context"
	"errors"
	"flag"

	"github.com/peterbourgon/ff/v3/ffcli"
)

// Placeholder until the owning issue lands; replaced by admin.go.
func (c *cli) adminCmd() *ffcli.Command {
	return &ffcli.Command{Name: "admin", FlagSet: flag.NewFlagSet("admin", flag.ContinueOnError),
		Exec: func(context.Context, []string) error { return errors.New("admin: not built yet") }}
}
