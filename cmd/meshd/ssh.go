package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/peterbourgon/ff/v3/ffcli"
	"github.com/pkg/sftp"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/control"
)

func (c *cli) sshChecksListCmd() *ffcli.Command {
	var asJSON bool
	return c.adminLeaf("list", "meshd admin ssh list [--json]", "list check-mode SSH logins waiting for approval",
		func(fs *flag.FlagSet) { fs.BoolVar(&asJSON, "json", false, "print JSON") },
		func(ctx context.Context, ac *control.AdminClient, args []string) error {
			if len(args) > 0 {
				return &exitError{2, fmt.Sprintf("ssh list: unexpected arguments %q", args)}
			}
			cs, err := ac.SSHChecks(ctx)
			if err != nil {
				return fmt.Errorf("ssh list: %w", err)
			}
			if asJSON {
				return printJSON(c.stdout, cs)
			}
			rows := make([][]string, 0, len(cs))
			for _, ch := range cs {
				who := ch.Caller.User
				if who == "" {
					who = strings.Join(ch.Caller.Tags, ",")
				}
				state := "waiting"
				if ch.Approved {
					state = "approved"
				}
				rows = append(rows, []string{ch.ID, who + " (" + ch.Caller.Hostname + ")", ch.Hostname, ch.LocalUser, state, fmtTime(ch.Expires)})
			}
			return table(c.stdout, "ID\tCALLER\tNODE\tLOCAL-USER\tSTATE\tEXPIRES", rows)
		})
}

func (c *cli) sshApproveCmd() *ffcli.Command {
	return c.adminLeaf("approve", "meshd admin ssh approve ID", "let a check-mode SSH login waiting for approval in (and for the rule's checkPeriod)", nil,
		func(ctx context.Context, ac *control.AdminClient, args []string) error {
			if len(args) != 1 {
				return &exitError{2, "ssh approve: want one ID (see meshd admin ssh list)"}
			}
			if err := ac.ApproveSSH(ctx, args[0]); err != nil {
				return fmt.Errorf("ssh approve: %w", err)
			}
			fmt.Fprintf(c.stdout, "approved SSH login %s\n", args[0])
			return nil
		})
}

// sftpServerCmd is the sftp subsystem of the SSH server: the daemon runs
// it as the login user, speaking SFTP on stdin and stdout.
func (c *cli) sftpServerCmd() *ffcli.Command {
	return &ffcli.Command{
		Name:       "sftp-server",
		ShortUsage: "meshd sftp-server",
		ShortHelp:  "(internal) the SSH server's sftp subsystem, on stdin and stdout",
		FlagSet:    flag.NewFlagSet("sftp-server", flag.ContinueOnError),
		Exec: func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return &exitError{2, "sftp-server takes no arguments"}
			}
			srv, err := sftp.NewServer(struct {
				io.Reader
				io.WriteCloser
			}{os.Stdin, os.Stdout})
			if err != nil {
				return err
			}
			if err := srv.Serve(); err != nil && err != io.EOF {
				return fmt.Errorf("sftp-server: %w", err)
			}
			return nil
		},
	}
}

// sftpCommand is how the daemon runs the sftp subsystem: this binary.
func sftpCommand() []string {
	exe, err := os.Executable()
	if err != nil {
		return nil
	}
	return []string{exe, "sftp-server"}
}

func (c *cli) recorderCmd() *ffcli.Command {
	fs := flag.NewFlagSet("recorder", flag.ContinueOnError)
	var af agentFlags
	af.register(fs)
	socket := fs.String("socket", localapi.DefaultSocket, "local API unix socket")
	var req localapi.UpRequest
	fs.StringVar(&af.recorderDir, "dir", "", "directory for the session recordings (asciinema v2 .cast files, 0600); made if missing")
	fs.StringVar(&req.AuthKey, "authkey", "", "auth key: join the tailnet in this process, as `meshd up --foreground --authkey`; without it or --coordinator, run `meshd up` against --socket")
	fs.StringVar(&req.Coordinator, "coordinator", "", "coordinator URL, with --authkey")
	fs.StringVar(&req.Hostname, "hostname", "", "node name when it enrols (default: the system hostname)")
	var tags string
	fs.StringVar(&tags, "advertise-tags", "", "tags when it enrols, e.g. tag:recorder")
	return &ffcli.Command{
		Name:       "recorder",
		ShortUsage: "meshd recorder --dir DIR [--authkey KEY --coordinator URL [--hostname H] [--advertise-tags tag:recorder]] [daemon flags]",
		ShortHelp:  "run the node agent as an SSH session recorder on the tailnet",
		LongHelp: "recorder runs the whole node agent, like `meshd daemon`, and receives SSH session streams from nodes whose\n" +
			"policy ssh rules name it in \"recorder\", on its tailnet addresses port 8022. Each session becomes one\n" +
			"asciinema v2 cast file in --dir, written as it happens. See docs/ssh.md.",
		FlagSet: fs,
		Options: envOptions,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return &exitError{2, fmt.Sprintf("recorder: unexpected arguments %q", args)}
			}
			if af.recorderDir == "" {
				return &exitError{2, "recorder: --dir DIR is required"}
			}
			dir, err := filepath.Abs(af.recorderDir)
			if err != nil {
				return &exitError{2, fmt.Sprintf("recorder: --dir: %v", err)}
			}
			af.recorderDir = dir
			req.Tags = splitList(tags)
			req.SetTags = tags != ""
			if req.AuthKey != "" || req.Coordinator != "" {
				c.log.Info("meshd recorder started", "dir", dir, "state_dir", af.stateDir, "tun", af.tun)
				return c.upForeground(ctx, &af, *socket, fs, req, 0)
			}
			a, err := c.newAgent(&af)
			if err != nil {
				return err
			}
			defer a.Close()
			ln, err := localapi.Listen(*socket)
			if err != nil {
				return err
			}
			c.log.Info("meshd recorder started", "dir", dir, "state_dir", af.stateDir, "tun", af.tun, "socket", *socket)
			return runAgent(ctx, a, ln, c.log, af.metricsListen)
		},
	}
}
