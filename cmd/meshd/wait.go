package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"strings"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"

	"meshd.dev/meshd/agent/localapi"
)

func (c *cli) waitCmd() *ffcli.Command {
	fs := flag.NewFlagSet("wait", flag.ContinueOnError)
	socket := fs.String("socket", localapi.DefaultSocket, "local API unix socket of the daemon")
	timeout := fs.Duration("timeout", 0, "give up after this long (exit 1 with the reason); 0: wait as long as it takes")
	peer := fs.String("peer", "", "also wait until this peer (hostname, MagicDNS name or tailnet IP) answers a disco ping")
	return &ffcli.Command{
		Name:       "wait",
		ShortUsage: "meshd wait [--timeout D] [--peer NAME] [--socket PATH]",
		ShortHelp:  "block until the node is running (and a peer reachable): for scripts and a sidecar's app",
		LongHelp: `meshd wait returns 0 as soon as the node is running (meshd status would
exit 0) and, with --peer, the peer answers a disco ping over WireGuard's
path. It waits for a daemon that is not started yet too. After --timeout it
exits 1 with what it was still waiting for.`,
		FlagSet: fs,
		Options: envOptions,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return fmt.Errorf("wait: unexpected arguments %q", args)
			}
			if *timeout < 0 {
				return &exitError{2, fmt.Sprintf("wait: --timeout %v: want a duration >= 0", *timeout)}
			}
			cl := localapi.NewClient(*socket)
			w := waiter{status: cl.Status, peer: strings.TrimSpace(*peer), interval: 250 * time.Millisecond}
			if w.peer != "" {
				w.ping = func(ctx context.Context, peer string) error {
					_, err := cl.Ping(ctx, peer)
					return err
				}
			}
			if *timeout > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, *timeout)
				defer cancel()
			}
			why := w.wait(ctx)
			if why == "" {
				fmt.Fprintln(c.stdout, "meshd: ready")
				return nil
			}
			return &exitError{code: 1, msg: fmt.Sprintf("wait: not ready after %v: %s", *timeout, why)}
		},
	}
}

// waiter polls the daemon until the node runs and, if peer is set, the
// peer answers a ping. Time comes only from its context and interval, so
// tests run it in a synctest bubble.
type waiter struct {
	status   func(context.Context) (*localapi.Status, error)
	ping     func(ctx context.Context, peer string) error // nil unless peer is set
	peer     string
	interval time.Duration
}

// pingTimeout bounds one ping attempt: a peer that does not answer in that
// long is asked again at the next round.
const pingTimeout = 2 * time.Second

// wait returns "" once ready, or, when ctx ends first, what it was still
// waiting for.
func (w *waiter) wait(ctx context.Context) string {
	t := time.NewTicker(w.interval)
	defer t.Stop()
	for {
		why := w.check(ctx)
		if why == "" {
			return ""
		}
		select {
		case <-ctx.Done():
			return why
		case <-t.C:
		}
	}
}

// check is one round: "" when ready, else the reason it is not.
func (w *waiter) check(ctx context.Context) string {
	st, err := w.status(ctx)
	switch {
	case errors.Is(err, localapi.ErrNoDaemon):
		return "no daemon yet: " + err.Error()
	case err != nil:
		return err.Error()
	case st.BackendState != localapi.StateRunning:
		if err := notRunning(st); err != nil {
			return err.Error()
		}
	}
	if w.peer == "" {
		return ""
	}
	pctx, cancel := context.WithTimeout(ctx, pingTimeout)
	defer cancel()
	if err := w.ping(pctx, w.peer); err != nil {
		return fmt.Sprintf("peer %s not reachable: %v", w.peer, err)
	}
	return ""
}
