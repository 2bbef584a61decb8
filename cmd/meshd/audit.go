package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"

	"meshd.dev/meshd/control"
)

// parseSince reads --since: a duration back from now (24h) or an RFC 3339
// time.
func parseSince(v string, now time.Time) (time.Time, error) {
	if v == "" {
		return time.Time{}, nil
	}
	if d, err := time.ParseDuration(v); err == nil {
		if d < 0 {
			return time.Time{}, fmt.Errorf("--since %s: want a positive duration (how far back) or an RFC 3339 time", v)
		}
		return now.Add(-d), nil
	}
	t, err := time.Parse(time.RFC3339Nano, v)
	if err != nil {
		return time.Time{}, fmt.Errorf("--since %q: want a duration (24h) or an RFC 3339 time (2026-01-02T15:04:05Z)", v)
	}
	return t, nil
}

func (c *cli) adminAuditCmd() *ffcli.Command {
	var since string
	var asJSON bool
	return c.adminLeaf("audit", "meshd admin audit [--since DURATION|RFC3339] [--json]",
		"print the coordinator's audit log (admin actions, key use, registrations, tag and policy changes, sessions)",
		func(fs *flag.FlagSet) {
			fs.StringVar(&since, "since", "", "only events from this long ago (24h) or this RFC 3339 time on; default: all")
			fs.BoolVar(&asJSON, "json", false, "one JSON object per line (JSON Lines), for a SIEM")
		},
		func(ctx context.Context, ac *control.AdminClient, args []string) error {
			if len(args) > 0 {
				return &exitError{2, fmt.Sprintf("admin audit: unexpected arguments %q", args)}
			}
			from, err := parseSince(since, time.Now())
			if err != nil {
				return &exitError{2, "admin audit: " + err.Error()}
			}
			enc := json.NewEncoder(c.stdout)
			tw := tabwriter.NewWriter(c.stdout, 0, 0, 2, ' ', 0)
			if !asJSON {
				fmt.Fprintln(tw, "TIME\tACTOR\tACTION\tTARGET\tDETAILS")
			}
			var werr error
			err = ac.AuditLog(ctx, from, func(e control.AuditEvent) bool {
				if asJSON {
					werr = enc.Encode(e)
				} else {
					_, werr = fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", e.Time.UTC().Format(time.RFC3339), e.Actor, e.Action, orDash(e.Target), orDash(strings.TrimSpace(string(e.Details))))
				}
				return werr == nil
			})
			if err != nil {
				return fmt.Errorf("admin audit: %w", err)
			}
			if werr != nil {
				return werr
			}
			if !asJSON {
				return tw.Flush()
			}
			return nil
		})
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
