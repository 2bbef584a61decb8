package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/peterbourgon/ff/v3"
	"github.com/peterbourgon/ff/v3/ffcli"

	"meshd.dev/meshd/agent/localapi"
)

func (c *cli) upCmd() *ffcli.Command {
	fs := flag.NewFlagSet("up", flag.ContinueOnError)
	var (
		req        localapi.UpRequest
		tags       string
		acceptDNS  bool
		sshOn      bool
		socket     = fs.String("socket", localapi.DefaultSocket, "local API unix socket of the daemon")
		foreground = fs.Bool("foreground", false, "run the whole agent in this process until SIGTERM (sidecar form; no daemon needed)")
		timeout    = fs.Duration("timeout", 0, "how long to wait for an admin to approve the node (coordinator --require-approval); 0 waits until approved")
		af         agentFlags
	)
	fs.StringVar(&req.AuthKey, "authkey", "", "auth key: enrols the node the first time, or again with --force-reauth or after the coordinator deleted or expired it; "+
		"on a registered node without --force-reauth it is an error (MESHD_AUTHKEY from the environment is ignored there instead, with a note)")
	fs.StringVar(&req.Coordinator, "coordinator", "", "coordinator URL, e.g. https://coord.example:8443; replicas of one coordinator as URLs separated by commas (the node fails over between them)")
	fs.StringVar(&req.Hostname, "hostname", "", "name of this node in the tailnet (default: the system hostname); a registered node is renamed only with --force-reauth")
	fs.StringVar(&tags, "advertise-tags", "", "tags for this node, comma-separated (tag:a,tag:b); on a registered node they replace its tags if its user or "+
		"current tags own them in the policy's tagOwners; --advertise-tags= asks for no tags (with --force-reauth and a user's key: back to the user)")
	fs.BoolVar(&req.ForceReauth, "force-reauth", false, "register this node again with --authkey (a new key, user or tags; same machine, same addresses)")
	fs.BoolVar(&acceptDNS, "accept-dns", true, "in kernel TUN mode, point the host's DNS at the tailnet resolver (MagicDNS) while up; "+
		"--accept-dns=false leaves it alone. Kept across restarts; on a registered node a value it already has is an error")
	fs.BoolVar(&sshOn, "ssh", false, "run the SSH server on this node's tailnet addresses, port 22; logins are decided by the policy's ssh rules "+
		"(docs/ssh.md). Kept across restarts; --ssh=false turns it off")
	var rf routeFlagValues
	rf.register(fs)
	af.register(fs)
	return &ffcli.Command{
		Name:       "up",
		ShortUsage: "meshd up [--authkey KEY --coordinator URL] [--hostname H] [--advertise-tags T,..] [--advertise-routes P,..] [--advertise-exit-node] [--accept-routes] [--exit-node X] [--accept-dns=false] [--ssh] [--force-reauth] [--timeout D] [--foreground]",
		ShortHelp:  "join the tailnet, or change this node's tags or registration",
		LongHelp: "Asks the running daemon to join the tailnet. The first time it registers with --authkey;\n" +
			"afterwards `meshd up` alone brings the node back. On a registered node, --advertise-tags\n" +
			"re-tags it, and --force-reauth --authkey KEY registers it again; a setting that would\n" +
			"change nothing (an --authkey without --force-reauth, the tags it already has, another\n" +
			"--hostname) is an error. With a coordinator run with --require-approval, up says\n" +
			"\"waiting for approval by an admin\" and waits (see --timeout) until the node is approved.\n" +
			"A kernel TUN node points the host's DNS at the tailnet resolver while it is up\n" +
			"(systemd-resolved per link, else /etc/resolv.conf with a backup; docs/osdns.md);\n" +
			"--accept-dns=false opts out.\n" +
			"With --foreground, runs the agent in this process instead (the daemon flags --state-dir,\n" +
			"--tun, --port, --socks5-server, --http-proxy and --forward then apply).",
		FlagSet: fs,
		// The environment is read in Exec, after noting which flags the
		// command line set: MESHD_AUTHKEY and MESHD_ADVERTISE_TAGS
		// describe the node a container wants on every start, where the
		// same flag typed on the command line asks for a change.
		Exec: func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return fmt.Errorf("up: unexpected arguments %q", args)
			}
			onCommandLine := map[string]bool{}
			fs.Visit(func(f *flag.Flag) { onCommandLine[f.Name] = true })
			if err := ff.Parse(fs, nil, envOptions...); err != nil {
				return fmt.Errorf("up: %w", err)
			}
			fs.Visit(func(f *flag.Flag) {
				switch f.Name {
				case "advertise-tags":
					req.SetTags = true
				case "accept-dns":
					req.AcceptDNS = &acceptDNS
				case "ssh":
					req.SSH = &sshOn
				}
			})
			req.AuthKeyFromEnv = req.AuthKey != "" && !onCommandLine["authkey"]
			req.TagsFromEnv = req.SetTags && !onCommandLine["advertise-tags"]
			req.AcceptDNSFromEnv = req.AcceptDNS != nil && !onCommandLine["accept-dns"]
			req.SSHFromEnv = req.SSH != nil && !onCommandLine["ssh"]
			req.Tags = splitList(tags)
			routing, err := rf.flags(fs, onCommandLine)
			if err != nil {
				return &exitError{2, "up: " + err.Error()}
			}
			req.Routing = routing
			if *timeout < 0 {
				return &exitError{2, fmt.Sprintf("up: --timeout %v: want a duration >= 0", *timeout)}
			}
			if *foreground {
				return c.upForeground(ctx, &af, *socket, fs, req, *timeout)
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
			if st.BackendState != localapi.StateNeedsApproval {
				return nil
			}
			return c.waitApproval(ctx, *timeout, func(ctx context.Context) (*localapi.Status, error) {
				return cl.WaitState(ctx, localapi.StateNeedsApproval)
			})
		},
	}
}

// waitApproval waits (at most timeout, 0 = until it happens) for the node
// to leave NeedsApproval and says how it came up. It fails if the node
// ends in any state but running.
func (c *cli) waitApproval(ctx context.Context, timeout time.Duration, wait func(context.Context) (*localapi.Status, error)) error {
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	st, err := wait(ctx)
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return &exitError{1, fmt.Sprintf("still waiting for approval by an admin after %v; the node comes up by itself once approved (meshd status shows it)", timeout)}
	case err != nil:
		return err
	}
	c.printUp(st)
	if st.BackendState != localapi.StateRunning && st.BackendState != localapi.StateStarting {
		return &exitError{1, ""}
	}
	return nil
}

// noDaemonHint turns "no daemon" into the message that says how to start one.
func noDaemonHint(err error, socket string) error {
	if errors.Is(err, localapi.ErrNoDaemon) {
		return &exitError{code: 1, msg: fmt.Sprintf("no daemon at %s (start it with `systemctl start meshd` or run `meshd up --foreground`)", socket)}
	}
	return err
}

func (c *cli) printUp(st *localapi.Status) {
	switch {
	case st.BackendState == localapi.StateNeedsApproval && st.Self != nil:
		fmt.Fprintf(c.stdout, "meshd: registered as %s (node %d); waiting for approval by an admin: meshd admin nodes approve %d\n",
			st.Self.Hostname, st.Self.ID, st.Self.ID)
		return
	case st.Self == nil || (st.BackendState != localapi.StateRunning && st.BackendState != localapi.StateStarting):
		fmt.Fprintf(c.stdout, "meshd: %s\n", st.BackendState)
		if st.Message != "" {
			fmt.Fprintf(c.stdout, "meshd: %s\n", st.Message)
		}
		return
	}
	var ips []string
	for _, ip := range st.Self.IPs {
		ips = append(ips, ip.String())
	}
	fmt.Fprintf(c.stdout, "meshd: %s as %s (%s), %d peers\n", strings.ToLower(st.BackendState), st.Self.Hostname, strings.Join(ips, ", "), len(st.Peers))
	if len(st.Self.Tags) > 0 {
		fmt.Fprintf(c.stdout, "meshd: tags %s\n", strings.Join(st.Self.Tags, ","))
	}
	if st.Message != "" {
		fmt.Fprintf(c.stdout, "meshd: note: %s\n", st.Message)
	}
}

// upForeground runs the agent in this process, joins, and stays up until
// ctx ends (SIGTERM). The local API is served too, so status works; if the
// default socket path is not writable (a non-root sidecar) it is skipped
// with a warning, while an explicit --socket that fails is an error.
func (c *cli) upForeground(ctx context.Context, af *agentFlags, socket string, fs *flag.FlagSet, req localapi.UpRequest, approvalTimeout time.Duration) error {
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
	go func() { done <- runAgent(ctx, a, ln, c.log, af.metricsListen) }()
	upCtx, upCancel := context.WithTimeout(ctx, 60*time.Second)
	st, err := a.Up(upCtx, req)
	upCancel()
	if err != nil {
		cancel()
		<-done
		return err
	}
	c.printUp(st)
	if st.BackendState == localapi.StateNeedsApproval {
		// The agent keeps running; say when it comes up, or stop after
		// --timeout without an approval.
		if err := c.waitApproval(ctx, approvalTimeout, func(ctx context.Context) (*localapi.Status, error) {
			st, err := a.WaitState(ctx, localapi.StateNeedsApproval)
			if err == nil && ctx.Err() != nil {
				err = ctx.Err()
			}
			return st, err
		}); err != nil && ctx.Err() == nil {
			cancel()
			<-done
			return err
		}
	}
	return <-done
}
