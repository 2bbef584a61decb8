package main

import (
	"flag"
	"fmt"

	"meshd.dev/meshd/internal/connlimit"
)

// connFlags are the connection caps of a server (coordinator, relay). Only
// the caps are flags: an operator raises them for many nodes behind one
// NAT address or a TCP load balancer, or lowers them below a small
// open-file limit. The timeouts need no tuning (internal/connlimit).
type connFlags struct {
	cmd          string
	perIP, total *int
}

func registerConnFlags(fs *flag.FlagSet, cmd string) *connFlags {
	return &connFlags{
		cmd: cmd,
		perIP: fs.Int("max-conns-per-ip", connlimit.DefaultPerSource,
			"most concurrent connections from one IP address (IPv6: one /64); raise it for many nodes behind one NAT address or a TCP load balancer"),
		total: fs.Int("max-conns", connlimit.DefaultTotal, "most concurrent connections in total; keep it below the open-file limit"),
	}
}

// limits returns the caps, or an error for values no server can run with.
func (f *connFlags) limits() (connlimit.Limits, error) {
	if *f.perIP <= 0 || *f.total <= 0 {
		return connlimit.Limits{}, fmt.Errorf("--max-conns-per-ip %d and --max-conns %d must be positive", *f.perIP, *f.total)
	}
	return connlimit.Limits{
		PerSource: *f.perIP, Total: *f.total,
		Hint: "raise meshd " + f.cmd + " --max-conns-per-ip / --max-conns",
	}, nil
}
