// Command meshd is the meshd mesh VPN: the per-node daemon and its CLI, the
// coordinator, the DERP relay, and offline policy tools, in one binary.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/peterbourgon/ff/v3"
	"github.com/peterbourgon/ff/v3/ffcli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// cli carries what every command needs; there is no global state.
type cli struct {
	stdout, stderr io.Writer
	log            *slog.Logger
}

// exitError ends the process with a specific status after printing msg (if
// any). Commands use it where the status is part of the contract, such as
// `policy check` exiting 1 after listing problems.
type exitError struct {
	code int
	msg  string
}

func (e *exitError) Error() string { return e.msg }

// envOptions makes every flag settable as MESHD_<FLAG_NAME>.
var envOptions = []ff.Option{ff.WithEnvVarPrefix("MESHD")}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	c := &cli{stdout: stdout, stderr: stderr, log: slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))}
	root := &ffcli.Command{
		Name:       "meshd",
		ShortUsage: "meshd <command> [flags]",
		ShortHelp:  "userspace WireGuard mesh for GPU server fleets",
		FlagSet:    flag.NewFlagSet("meshd", flag.ContinueOnError),
		Subcommands: []*ffcli.Command{
			c.demoCmd(),
			c.coordinatorCmd(),
			c.adminCmd(),
			c.daemonCmd(),
			c.upCmd(),
			c.downCmd(),
			c.logoutCmd(),
			c.statusCmd(),
			c.waitCmd(),
			c.metricsCmd(),
			c.pingCmd(),
			c.whoisCmd(),
			c.serveCmd(),
			c.k8sProxyCmd(),
			c.recorderCmd(),
			c.sftpServerCmd(),
			c.configureCmd(),
			c.ipCmd(),
			c.certCmd(),
			c.policyCmd(),
			c.derpCmd(),
			c.netcheckCmd(),
			c.bugreportCmd(),
			c.debugCmd(),
		},
		Exec: func(context.Context, []string) error { return flag.ErrHelp },
	}
	setOutput(root, stderr)
	err := root.ParseAndRun(ctx, args)
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 2
	}
	var ee *exitError
	if errors.As(err, &ee) {
		if ee.msg != "" {
			fmt.Fprintln(stderr, "meshd:", ee.msg)
		}
		return ee.code
	}
	fmt.Fprintln(stderr, "meshd:", err)
	return 1
}

func setOutput(cmd *ffcli.Command, w io.Writer) {
	if cmd.FlagSet != nil {
		cmd.FlagSet.SetOutput(w)
	}
	for _, s := range cmd.Subcommands {
		setOutput(s, w)
	}
}
