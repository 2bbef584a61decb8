package main

import (
	"context"
	"errors"
	"flag"

	"github.com/peterbourgon/ff/v3/ffcli"
)

// Placeholder until the owning issue lands; replaced by policy.go.
func (c *cli) policyCmd() *ffcli.Command {
	return &ffcli.Command{Name: "policy", FlagSet: flag.NewFlagSet("policy", flag.ContinueOnError),
		Exec: func(context.Context, []string) error { return errors.New("policy: not built yet") }}
}
