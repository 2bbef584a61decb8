package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"

	"meshd.dev/meshd/agent/localapi"
)

func (c *cli) upCmd() *ffcli.Command {
	fs := flag.NewFlagSet("up", flag.ContinueOnError)
	var (
		req        localapi.UpRequest
		tags       string
		socket     = fs.String("socket", localapi.DefaultSocket, "local API unix socket of the daemon")
		foreground = fs.Bool("foreground", false, "run the whole agent in this process until SIGTERM (sidecar form; no daemon needed)")
		af         agentFlags
	)
	fs.StringVar(&req.AuthKey, "authkey", "", "auth key (only needed the first time)")
	fs.StringVar(&req.Coordinator, "coordinator", "", "coordinator URL, e.g. https://coord.example:8443")
	fs.StringVar(&req.Hostname, "hostname", "", "name of this node in the tailnet (default: the system hostname)")
	fs.StringVar(&tags, "advertise-tags", "", "tags to request for this node, comma-separated (tag:a,tag:b)")
	af.register(fs)
	return &ffcli.Command{
		Name:       "up",
		ShortUsage: "meshd up --authkey KEY --coordinator URL [--hostname H] [--advertise-tags T,..] [--foreground]",
		ShortHelp:  "join the tailnet",
		LongHelp: "Asks the running daemon to join the tailnet. With --foreground, runs the agent in this\n" +
			"process instead (the daemon flags --state-dir, --tun, --port, --socks5-server, --http-proxy\n" +
			"and --forward then apply).",
		FlagSet: fs,
		Options: envOptions,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return fmt.Errorf("up: unexpected arguments %q", args)
			}
			for _, t := range strings.Split(tags, ",") {
				if t = strings.TrimSpace(t); t != "" {
					req.Tags = append(req.Tags, t)
				}
			}
			if *foreground {
				return c.upForeground(ctx, &af, *socket, fs, req)
			}
			// The daemon flags configure an agent in this process; without
			// --foreground the running daemon has its own. Say so rather
			// than ignore them silently (they may come from MESHD_* in the
			// environment, so this is not an error).
			var ignored []string
			fs.Visit(func(f *flag.Flag) {
				if isAgentFlag(f.Name) {
					ignored = append(ignored, "--"+f.Name)
				}
			})
			if len(ignored) > 0 {
				fmt.Fprintf(c.stderr, "meshd: note: %s apply only with --foreground; the daemon keeps its own settings\n", strings.Join(ignored, ", "))
			}
			cl := localapi.NewClient(*socket)
			st, err := cl.Up(ctx, req)
			if err != nil {
				return noDaemonHint(err, *socket)
			}
			c.printUp(st)
			return nil
		},
	}
}

// noDaemonHint turns "no daemon" into the message that says how to start one.
func noDaemonHint(err error, socket string) error {
	if errors.Is(err, localapi.ErrNoDaemon) {
		return &exitError{code: 1, msg: fmt.Sprintf("no daemon at %s (start it with `systemctl start meshd` or run `meshd up --foreground`)", socket)}
	}
	return err
}

func (c *cli) printUp(st *localapi.Status) {
	if st.Self == nil {
		fmt.Fprintf(c.stdout, "meshd: %s\n", st.BackendState)
		return
	}
	var ips []string
	for _, ip := range st.Self.IPs {
		ips = append(ips, ip.String())
	}
	fmt.Fprintf(c.stdout, "meshd: %s as %s (%s), %d peers\n", strings.ToLower(st.BackendState), st.Self.Hostname, strings.Join(ips, ", "), len(st.Peers))
	if st.Message != "" {
		fmt.Fprintf(c.stdout, "meshd: note: %s\n", st.Message)
	}
}

// upForeground runs the agent in this process, joins, and stays up until
// ctx ends (SIGTERM). The local API is served too, so status works; if the
// default socket path is not writable (a non-root sidecar) it is skipped
// with a warning, while an explicit --socket that fails is an error.
func (c *cli) upForeground(ctx context.Context, af *agentFlags, socket string, fs *flag.FlagSet, req localapi.UpRequest) error {
	a, err := c.newAgent(af)
	if err != nil {
		return err
	}
	defer a.Close()
	socketSet := false
	fs.Visit(func(f *flag.Flag) { socketSet = socketSet || f.Name == "socket" })
	var ln net.Listener
	if l, err := localapi.Listen(socket); err == nil {
		ln = l
	} else if socketSet || localapi.DefaultSocket != socket {
		return err
	} else {
		c.log.Warn("local API disabled (meshd status will not reach this process); pass --socket PATH to enable it", "err", err)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- runAgent(ctx, a, ln, c.log) }()
	upCtx, upCancel := context.WithTimeout(ctx, 60*time.Second)
	st, err := a.Up(upCtx, req)
	upCancel()
	if err != nil {
		cancel()
		<-done
		return err
	}
	c.printUp(st)
	return <-done
}
