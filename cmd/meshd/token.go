package main

import (
	"context"
	"flag"
	"fmt"

	"github.com/peterbourgon/ff/v3/ffcli"

	"meshd.dev/meshd/control"
	"meshd.dev/meshd/internal/atomicfile"
)

// tokenRotateCmd is `meshd admin token rotate admin|relay`: a new token
// replaces the old one on every replica at once (control/tokens.go).
func (c *cli) tokenRotateCmd() *ffcli.Command {
	fs := flag.NewFlagSet("rotate", flag.ContinueOnError)
	var conn adminConn
	conn.register(fs)
	out := fs.String("out", "", "write the new token to this `file` (mode 0600); default for the admin token: the --token-file just used; for the relay token: print it")
	return &ffcli.Command{
		Name:       "rotate",
		ShortUsage: "meshd admin token rotate <admin|relay> [--out FILE] --coordinator URL --token-file FILE",
		ShortHelp:  "replace the admin or relay token; the old one stops working on every replica at once",
		FlagSet:    fs, Options: envOptions,
		Exec: func(ctx context.Context, args []string) error {
			args, err := parseInterspersed(fs, args)
			if err != nil {
				return &exitError{2, err.Error()}
			}
			if len(args) != 1 || args[0] != control.TokenAdmin && args[0] != control.TokenRelay {
				return &exitError{2, "token rotate: want admin or relay (which token to replace)"}
			}
			kind := args[0]
			dest := *out
			if dest == "" && kind == control.TokenAdmin {
				dest = conn.tokenFile
			}
			ac, err := conn.client()
			if err != nil {
				return err
			}
			rt, err := ac.RotateToken(ctx, kind)
			if err != nil {
				return fmt.Errorf("token rotate: %w", err)
			}
			fmt.Fprintf(c.stderr, "%s token rotated: the old one no longer works on any replica; the coordinator wrote the new one to %s\n", kind, rt.Path)
			if dest == "" {
				fmt.Fprintln(c.stdout, rt.Token)
				return nil
			}
			if err := atomicfile.Write(dest, []byte(rt.Token+"\n"), 0o600); err != nil {
				// The rotation happened: the token must not be lost.
				fmt.Fprintln(c.stdout, rt.Token)
				return fmt.Errorf("token rotate: the new token is above; writing it to %s failed: %w", dest, err)
			}
			fmt.Fprintf(c.stdout, "new %s token written to %s\n", kind, dest)
			if kind == control.TokenRelay {
				fmt.Fprintln(c.stdout, "give it to every standalone relay (meshd derp --coordinator-token-file) and restart them")
			}
			return nil
		},
	}
}
