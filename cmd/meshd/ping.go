package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"

	"meshd.dev/meshd/agent/localapi"
)

func (c *cli) pingCmd() *ffcli.Command {
	fs := flag.NewFlagSet("ping", flag.ContinueOnError)
	socket := fs.String("socket", localapi.DefaultSocket, "local API unix socket of the daemon")
	count := fs.Int("c", 10, "number of pings (0: until a direct path, without limit)")
	untilDirect := fs.Bool("until-direct", true, "stop once a pong comes over a direct path; exit 1 if none does")
	timeout := fs.Duration("timeout", 5*time.Second, "how long to wait for each pong")
	asJSON := fs.Bool("json", false, "print one JSON object per pong")
	return &ffcli.Command{
		Name:       "ping",
		ShortUsage: "meshd ping [-c N] [--until-direct=false] [--timeout D] [--json] PEER",
		ShortHelp:  "disco-ping a peer and show the path each pong took",
		LongHelp: "Sends disco pings to PEER (a hostname or tailnet IP) over every path at once\n" +
			"and prints where each pong came from: \"via DERP(region)\" while relayed, or\n" +
			"\"via IP:PORT\" over a direct path, as tailscale ping does.",
		FlagSet: fs,
		Options: envOptions,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) != 1 {
				return errors.New("ping: want exactly one PEER (a hostname or tailnet IP)")
			}
			if *count < 0 || *timeout <= 0 {
				return errors.New("ping: -c must be >= 0 and --timeout > 0")
			}
			return c.ping(ctx, localapi.NewClient(*socket), *socket, args[0], *count, *untilDirect, *timeout, *asJSON)
		},
	}
}

func (c *cli) ping(ctx context.Context, lc *localapi.Client, socket, peer string, count int, untilDirect bool, timeout time.Duration, asJSON bool) error {
	anyPong := false
	for i := 0; count == 0 || i < count; i++ {
		if i > 0 {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(time.Second):
			}
		}
		pctx, cancel := context.WithTimeout(ctx, timeout)
		res, err := lc.Ping(pctx, peer)
		cancel()
		if errors.Is(err, localapi.ErrNoDaemon) {
			return noDaemonHint(err, socket)
		}
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			fmt.Fprintf(c.stderr, "%v\n", err)
			continue
		}
		anyPong = true
		writePong(c.stdout, res, asJSON)
		if untilDirect && res.Path == "direct" {
			return nil
		}
	}
	switch {
	case !anyPong:
		return &exitError{code: 1, msg: fmt.Sprintf("ping %s: no reply", peer)}
	case untilDirect:
		return &exitError{code: 1, msg: fmt.Sprintf("ping %s: direct connection not established (traffic is relayed)", peer)}
	}
	return nil
}

func writePong(w io.Writer, r *localapi.PingResult, asJSON bool) {
	if asJSON {
		json.NewEncoder(w).Encode(r)
		return
	}
	via := r.Endpoint
	if r.Path == "derp" {
		via = "DERP(" + r.DERPCode + ")"
	}
	fmt.Fprintf(w, "pong from %s (%s) via %s in %s\n", r.Peer, r.IP, via, formatLatency(r.LatencyMS))
}

func formatLatency(ms float64) string {
	if ms < 1 {
		return fmt.Sprintf("%.2fms", ms)
	}
	return fmt.Sprintf("%.0fms", ms)
}
