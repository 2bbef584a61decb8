package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"

	"meshd.dev/meshd/control"
)

func (c *cli) coordinatorCmd() *ffcli.Command {
	fs := flag.NewFlagSet("coordinator", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:8443", "TCP `address` to serve the control API on (TLS with a pinned self-signed key)")
	stateDir := fs.String("state-dir", "", "`directory` for the coordinator key, admin.token and the SQLite database (required)")
	db := fs.String("db", "", "database `URL`: empty for SQLite in --state-dir, or sqlite:PATH")
	ephemeral := fs.Duration("ephemeral-timeout", 5*time.Minute, "delete ephemeral nodes this long after their last map stream closes")
	keyExpiry := fs.Duration("node-key-expiry", 180*24*time.Hour, "how long a user's node key is valid after it registers (tagged nodes never expire)")
	approval := fs.Bool("require-approval", false, "nodes enrolled with keys that are not --preauthorized wait for `meshd admin nodes approve`")
	return &ffcli.Command{
		Name:       "coordinator",
		ShortUsage: "meshd coordinator --listen ADDR --state-dir DIR [--db URL] [--ephemeral-timeout D]",
		ShortHelp:  "run the coordinator: node registry, auth keys and network maps",
		LongHelp: `Runs the coordinator. On first start it creates its key and an admin token
(DIR/admin.token, mode 0600) that ` + "`meshd admin`" + ` uses. Auth keys carry the
coordinator's fingerprint, so nodes verify it with nothing else given.`,
		FlagSet: fs,
		Options: envOptions,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return &exitError{2, fmt.Sprintf("coordinator: unexpected arguments %q", args)}
			}
			if *stateDir == "" {
				return &exitError{2, "coordinator: --state-dir is required (or MESHD_STATE_DIR)"}
			}
			s, err := control.NewServer(ctx, control.ServerOptions{
				StateDir: *stateDir, DBURL: *db, Logger: c.log,
				EphemeralTimeout: *ephemeral, NodeKeyExpiry: *keyExpiry, RequireApproval: *approval,
			})
			if err != nil {
				return err
			}
			ln, err := net.Listen("tcp", *listen)
			if err != nil {
				s.Close()
				return fmt.Errorf("coordinator: listen on %s: %w", *listen, err)
			}
			fmt.Fprintf(c.stdout, "coordinator listening on https://%s\nfingerprint: %s\nadmin token: %s\n",
				ln.Addr(), s.Fingerprint(), s.AdminTokenPath())
			errc := make(chan error, 1)
			go func() { errc <- s.Serve(ln) }()
			select {
			case <-ctx.Done():
				c.log.Info("coordinator shutting down")
				s.Close()
				<-errc
				return nil
			case err := <-errc:
				s.Close()
				if err == nil {
					err = errors.New("coordinator stopped serving")
				}
				return err
			}
		},
	}
}
