package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"

	"meshd.dev/meshd/control"
	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
)

// adminConn holds the flags every admin subcommand accepts, so they can be
// given after the subcommand (meshd admin keys list --coordinator URL).
type adminConn struct {
	url, tokenFile, token string
}

func (a *adminConn) register(fs *flag.FlagSet) {
	fs.StringVar(&a.url, "coordinator", "", "coordinator `URL` (https://HOST:PORT; also MESHD_COORDINATOR)")
	fs.StringVar(&a.tokenFile, "token-file", "", "`file` holding the admin token (the coordinator's admin.token)")
	fs.StringVar(&a.token, "admin-token", "", "the admin token itself (prefer --token-file or MESHD_ADMIN_TOKEN: flags are visible in ps)")
}

func (a *adminConn) client() (*control.AdminClient, error) {
	if a.url == "" {
		return nil, &exitError{2, "admin: pass --coordinator https://HOST:PORT or set MESHD_COORDINATOR"}
	}
	tok := a.token
	if a.tokenFile != "" {
		b, err := os.ReadFile(a.tokenFile)
		if err != nil {
			return nil, fmt.Errorf("admin: read token file: %w", err)
		}
		tok = strings.TrimSpace(string(b))
	}
	if tok == "" {
		return nil, &exitError{2, "admin: pass --token-file DIR/admin.token (from the coordinator's state dir) or set MESHD_ADMIN_TOKEN"}
	}
	return control.NewAdminClient(a.url, tok)
}

// adminLeaf builds an admin subcommand with the shared connection flags.
func (c *cli) adminLeaf(name, usage, help string, setup func(fs *flag.FlagSet), run func(ctx context.Context, ac *control.AdminClient, args []string) error) *ffcli.Command {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	var conn adminConn
	conn.register(fs)
	if setup != nil {
		setup(fs)
	}
	return &ffcli.Command{
		Name: name, ShortUsage: usage, ShortHelp: help, FlagSet: fs, Options: envOptions,
		Exec: func(ctx context.Context, args []string) error {
			// "admin policy set FILE --coordinator URL": flags may follow
			// the positional arguments.
			args, err := parseInterspersed(fs, args)
			if err != nil {
				return &exitError{2, err.Error()}
			}
			ac, err := conn.client()
			if err != nil {
				return err
			}
			return run(ctx, ac, args)
		},
	}
}

func (c *cli) adminCmd() *ffcli.Command {
	group := func(name, help string, subs ...*ffcli.Command) *ffcli.Command {
		return &ffcli.Command{
			Name: name, ShortUsage: "meshd admin " + name + " <command> [flags]", ShortHelp: help,
			FlagSet: flag.NewFlagSet(name, flag.ContinueOnError), Subcommands: subs,
			Exec: func(context.Context, []string) error { return flag.ErrHelp },
		}
	}
	return &ffcli.Command{
		Name:       "admin",
		ShortUsage: "meshd admin <keys|nodes|users|routes|policy|ssh|audit|token> <command> --coordinator URL --token-file FILE",
		ShortHelp:  "manage auth keys, nodes, users, routes, the policy and SSH check approvals on a coordinator; read its audit log; rotate its tokens",
		FlagSet:    flag.NewFlagSet("admin", flag.ContinueOnError),
		Subcommands: []*ffcli.Command{
			group("keys", "create, list and revoke auth keys", c.keysCreateCmd(), c.keysListCmd(), c.keysRevokeCmd()),
			group("nodes", "list, delete, expire, tag and approve nodes", c.nodesListCmd(), c.nodesDeleteCmd(), c.nodesExpireCmd(), c.nodesTagCmd(), c.nodesApproveCmd()),
			group("users", "list users", c.usersListCmd()),
			group("routes", "list, approve and reject subnet routes and exit nodes", c.routesCmds()...),
			group("policy", "show or replace the tailnet policy in force", c.policyGetCmd(), c.policySetCmd()),
			group("ssh", "list and approve check-mode SSH logins", c.sshChecksListCmd(), c.sshApproveCmd()),
			c.adminAuditCmd(),
			group("token", "rotate the admin or relay token", c.tokenRotateCmd()),
		},
		Exec: func(context.Context, []string) error { return flag.ErrHelp },
	}
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func table(w io.Writer, header string, rows [][]string) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, header)
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	return tw.Flush()
}

func fmtTime(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.Local().Format("2006-01-02 15:04")
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func oneArg(cmd string, args []string, what string) (string, error) {
	if len(args) != 1 {
		return "", &exitError{2, fmt.Sprintf("%s: want exactly one %s, got %d arguments", cmd, what, len(args))}
	}
	return args[0], nil
}

func nodeArg(cmd string, args []string) (netmap.NodeID, error) {
	s, err := oneArg(cmd, args, "node ID")
	if err != nil {
		return 0, err
	}
	id, err := strconv.ParseUint(s, 10, 64)
	if err != nil || id == 0 {
		return 0, &exitError{2, fmt.Sprintf("%s: node ID %q is not a positive number (see meshd admin nodes list)", cmd, s)}
	}
	return netmap.NodeID(id), nil
}

func (c *cli) keysCreateCmd() *ffcli.Command {
	var o control.AuthKeyOptions
	var tags string
	var asJSON bool
	return c.adminLeaf("create", "meshd admin keys create [--reusable] [--ephemeral] [--preauthorized] [--tags tag:a,tag:b | --user LOGIN] [--expiry D] [--json]",
		"create an auth key (printed once)",
		func(fs *flag.FlagSet) {
			fs.BoolVar(&o.Reusable, "reusable", false, "the key can enrol any number of machines (default: one)")
			fs.BoolVar(&o.Ephemeral, "ephemeral", false, "nodes are deleted soon after they go offline")
			fs.BoolVar(&o.Preauthorized, "preauthorized", false, "nodes need no approval on a coordinator run with --require-approval")
			fs.StringVar(&tags, "tags", "", "comma-separated tags; nodes become tagged services with no user and no key expiry")
			fs.StringVar(&o.User, "user", "", "`login` owning the enrolled devices (e.g. alice@example.com), for a key without tags")
			fs.DurationVar(&o.Expiry, "expiry", 90*24*time.Hour, "how long the key can be used; 0 means never expires")
			fs.BoolVar(&asJSON, "json", false, "print JSON")
		},
		func(ctx context.Context, ac *control.AdminClient, args []string) error {
			if len(args) > 0 {
				return &exitError{2, fmt.Sprintf("keys create: unexpected arguments %q", args)}
			}
			o.Tags = splitList(tags)
			k, err := ac.CreateAuthKey(ctx, o)
			if err != nil {
				return fmt.Errorf("keys create: %w", err)
			}
			if asJSON {
				return printJSON(c.stdout, k)
			}
			// The key alone on stdout, so KEY=$(meshd admin keys create ...) works.
			fmt.Fprintln(c.stdout, k.Key)
			who := "user " + k.User
			if len(k.Tags) > 0 {
				who = "tags " + strings.Join(k.Tags, ",")
			}
			fmt.Fprintf(c.stderr, "created auth key %s for %s (reusable=%v ephemeral=%v preauthorized=%v, expires %s); it is not shown again\n",
				k.ID, who, k.Reusable, k.Ephemeral, k.Preauthorized, fmtTime(k.Expires))
			return nil
		})
}

func (c *cli) keysListCmd() *ffcli.Command {
	var asJSON bool
	return c.adminLeaf("list", "meshd admin keys list [--json]", "list auth keys",
		func(fs *flag.FlagSet) { fs.BoolVar(&asJSON, "json", false, "print JSON") },
		func(ctx context.Context, ac *control.AdminClient, args []string) error {
			ks, err := ac.AuthKeys(ctx)
			if err != nil {
				return fmt.Errorf("keys list: %w", err)
			}
			if asJSON {
				return printJSON(c.stdout, ks)
			}
			rows := make([][]string, 0, len(ks))
			for _, k := range ks {
				owner := k.User
				if len(k.Tags) > 0 {
					owner = strings.Join(k.Tags, ",")
				}
				rows = append(rows, []string{k.ID, k.State, owner, strconv.FormatBool(k.Reusable), strconv.FormatBool(k.Ephemeral),
					strconv.FormatBool(k.Preauthorized), strconv.Itoa(k.Uses), fmtTime(k.Expires), fmtTime(k.Created)})
			}
			return table(c.stdout, "ID\tSTATE\tOWNER\tREUSABLE\tEPHEMERAL\tPREAUTH\tUSES\tEXPIRES\tCREATED", rows)
		})
}

func (c *cli) keysRevokeCmd() *ffcli.Command {
	return c.adminLeaf("revoke", "meshd admin keys revoke ID", "revoke an auth key (enrolled nodes stay)", nil,
		func(ctx context.Context, ac *control.AdminClient, args []string) error {
			id, err := oneArg("keys revoke", args, "key ID")
			if err != nil {
				return err
			}
			if err := ac.RevokeAuthKey(ctx, id); err != nil {
				return fmt.Errorf("keys revoke: %w", err)
			}
			fmt.Fprintf(c.stdout, "revoked auth key %s\n", id)
			return nil
		})
}

func (c *cli) nodesListCmd() *ffcli.Command {
	var asJSON bool
	return c.adminLeaf("list", "meshd admin nodes list [--json]", "list nodes",
		func(fs *flag.FlagSet) { fs.BoolVar(&asJSON, "json", false, "print JSON") },
		func(ctx context.Context, ac *control.AdminClient, args []string) error {
			ns, err := ac.Nodes(ctx)
			if err != nil {
				return fmt.Errorf("nodes list: %w", err)
			}
			if asJSON {
				return printJSON(c.stdout, ns)
			}
			rows := make([][]string, 0, len(ns))
			for _, n := range ns {
				owner := n.User
				if len(n.Tags) > 0 {
					owner = strings.Join(n.Tags, ",")
				}
				addrs := make([]string, 0, len(n.Addresses))
				for _, a := range n.Addresses {
					addrs = append(addrs, a.Addr().String())
				}
				state := "offline"
				switch {
				case !n.Authorized:
					state = "needs-approval"
				case n.Expired:
					state = "expired"
				case n.Online:
					state = "online"
				}
				expiry := "never"
				if !n.KeyExpiry.IsZero() {
					expiry = fmtTime(n.KeyExpiry)
				}
				rows = append(rows, []string{strconv.FormatUint(uint64(n.ID), 10), n.Hostname, strings.Join(addrs, ","), owner, state, fmtTime(n.LastSeen), expiry})
			}
			return table(c.stdout, "ID\tHOSTNAME\tADDRESSES\tOWNER\tSTATE\tLAST-SEEN\tKEY-EXPIRY", rows)
		})
}

func (c *cli) nodeOpCmd(name, help, done string, op func(*control.AdminClient, context.Context, netmap.NodeID) error) *ffcli.Command {
	return c.adminLeaf(name, "meshd admin nodes "+name+" ID", help, nil,
		func(ctx context.Context, ac *control.AdminClient, args []string) error {
			id, err := nodeArg("nodes "+name, args)
			if err != nil {
				return err
			}
			if err := op(ac, ctx, id); err != nil {
				return fmt.Errorf("nodes %s: %w", name, err)
			}
			fmt.Fprintf(c.stdout, "%s node %d\n", done, id)
			return nil
		})
}

func (c *cli) nodesDeleteCmd() *ffcli.Command {
	return c.nodeOpCmd("delete", "delete a node; peers drop it at once", "deleted", (*control.AdminClient).DeleteNode)
}

func (c *cli) nodesExpireCmd() *ffcli.Command {
	return c.nodeOpCmd("expire", "expire a node's key now; it must re-authenticate with an auth key", "expired", (*control.AdminClient).ExpireNode)
}

func (c *cli) nodesApproveCmd() *ffcli.Command {
	return c.nodeOpCmd("approve", "approve a node waiting for approval (coordinator --require-approval)", "approved", (*control.AdminClient).ApproveNode)
}

func (c *cli) nodesTagCmd() *ffcli.Command {
	var user string
	return c.adminLeaf("tag", "meshd admin nodes tag ID tag:a,tag:b | meshd admin nodes tag ID --user LOGIN",
		"replace a node's tags (a tagged node's key never expires), or return it to a user (the key then expires like a user's device); it keeps its addresses",
		func(fs *flag.FlagSet) {
			fs.StringVar(&user, "user", "", "return the node to this `login` instead of tagging it: it loses its tags and its key expires like a device enrolled with the user's key")
		},
		func(ctx context.Context, ac *control.AdminClient, args []string) error {
			if user != "" {
				if len(args) != 1 {
					return &exitError{2, "nodes tag: with --user, want only the node ID, e.g. meshd admin nodes tag 7 --user alice@example.com"}
				}
				id, err := nodeArg("nodes tag", args)
				if err != nil {
					return err
				}
				if err := ac.UntagNode(ctx, id, user); err != nil {
					return fmt.Errorf("nodes tag: %w", err)
				}
				fmt.Fprintf(c.stdout, "node %d returned to %s\n", id, user)
				return nil
			}
			if len(args) != 2 {
				return &exitError{2, "nodes tag: want ID and a comma-separated tag list, e.g. meshd admin nodes tag 7 tag:gpu,tag:prod (or ID --user LOGIN to return it to a user)"}
			}
			id, err := nodeArg("nodes tag", args[:1])
			if err != nil {
				return err
			}
			tags := splitList(args[1])
			if err := ac.TagNode(ctx, id, tags); err != nil {
				return fmt.Errorf("nodes tag: %w", err)
			}
			fmt.Fprintf(c.stdout, "tagged node %d: %s\n", id, strings.Join(tags, ","))
			return nil
		})
}

func (c *cli) usersListCmd() *ffcli.Command {
	var asJSON bool
	return c.adminLeaf("list", "meshd admin users list [--json]", "list users",
		func(fs *flag.FlagSet) { fs.BoolVar(&asJSON, "json", false, "print JSON") },
		func(ctx context.Context, ac *control.AdminClient, args []string) error {
			us, err := ac.Users(ctx)
			if err != nil {
				return fmt.Errorf("users list: %w", err)
			}
			if asJSON {
				return printJSON(c.stdout, us)
			}
			rows := make([][]string, 0, len(us))
			for _, u := range us {
				rows = append(rows, []string{strconv.FormatInt(u.ID, 10), u.Login, fmtTime(u.Created)})
			}
			return table(c.stdout, "ID\tLOGIN\tCREATED", rows)
		})
}

func (c *cli) policyGetCmd() *ffcli.Command {
	var asJSON bool
	return c.adminLeaf("get", "meshd admin policy get [--json]", "print the policy file in force (or the bootstrap default)",
		func(fs *flag.FlagSet) {
			fs.BoolVar(&asJSON, "json", false, "print JSON: file, text, sha256, updated, rules, tests, bootstrap")
		},
		func(ctx context.Context, ac *control.AdminClient, args []string) error {
			if len(args) > 0 {
				return &exitError{2, fmt.Sprintf("policy get: unexpected arguments %q", args)}
			}
			p, err := ac.Policy(ctx)
			if err != nil {
				return fmt.Errorf("policy get: %w", err)
			}
			if asJSON {
				return printJSON(c.stdout, p)
			}
			// The text alone on stdout, so that get > FILE, edit, set FILE
			// round-trips; what it is goes to stderr.
			if p.Bootstrap {
				fmt.Fprintln(c.stderr, control.BootstrapNotice)
			} else {
				fmt.Fprintf(c.stderr, "policy %s, set %s: %d rules, %d tests, sha256 %s\n", p.File, fmtTime(p.Updated), p.Rules, p.Tests, p.SHA256)
			}
			_, err = io.WriteString(c.stdout, p.Text)
			return err
		})
}

func (c *cli) policySetCmd() *ffcli.Command {
	var asJSON, strict bool
	return c.adminLeaf("set", "meshd admin policy set FILE [--strict] [--json]",
		"validate FILE on the coordinator and put it in force for every node, or reject it and keep the previous one",
		func(fs *flag.FlagSet) {
			fs.BoolVar(&asJSON, "json", false, "print the applied policy as JSON")
			fs.BoolVar(&strict, "strict", false, "reject the policy if it has warnings (sections meshd does not enforce: nodeAttrs; settings it ignores; wide rules, ...), as meshd policy check --strict does")
		},
		func(ctx context.Context, ac *control.AdminClient, args []string) error {
			file, err := oneArg("policy set", args, "policy FILE")
			if err != nil {
				return err
			}
			name := filepath.Base(file)
			data, err := readPolicyFile(file)
			if err != nil {
				return &exitError{1, fmt.Sprintf("policy set: %v; the policy in force is unchanged", err)}
			}
			set := ac.SetPolicy
			if strict {
				set = ac.SetPolicyStrict
			}
			p, err := set(ctx, file, data)
			if errors.Is(err, controlclient.ErrPolicyInvalid) {
				msg := err.Error()
				var ae *controlclient.APIError
				if errors.As(err, &ae) {
					msg = ae.Message
				}
				fmt.Fprintln(c.stderr, msg)
				return &exitError{1, "policy set: " + name + " rejected; the previous policy stays in force"}
			}
			if err != nil {
				return fmt.Errorf("policy set: %w", err)
			}
			for _, w := range p.Warnings {
				fmt.Fprintln(c.stderr, w)
			}
			if asJSON {
				return printJSON(c.stdout, p)
			}
			fmt.Fprintf(c.stdout, "policy %s in force: %d rules, %d tests passed; pushed to %d connected nodes\n", p.File, p.Rules, p.Tests, p.ConnectedNodes)
			for _, r := range p.TagsRemoved {
				fmt.Fprintf(c.stdout, "node %d (%s): removed %s, which it gave itself: %s\n", r.Node, r.Hostname, strings.Join(r.Tags, ","), r.Reason)
			}
			return nil
		})
}
