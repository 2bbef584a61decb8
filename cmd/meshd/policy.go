package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/peterbourgon/ff/v3/ffcli"

	"meshd.dev/meshd/control"
	"meshd.dev/meshd/policy"
)

// policyCmd is the offline policy toolkit: check, explain and diff work on
// files, need no coordinator, and are what GitOps pipelines run.
func (c *cli) policyCmd() *ffcli.Command {
	return &ffcli.Command{
		Name:       "policy",
		ShortUsage: "meshd policy <check|explain|diff> [flags] FILE...",
		ShortHelp:  "check, explain and diff tailnet policy files offline",
		LongHelp: `Offline tools for the huJSON tailnet policy file (the format Tailscale users
already write: groups, hosts, tagOwners, acls, grants, tests, ssh, autoApprovers,
nodeAttrs). Nothing here talks to a coordinator; put "meshd policy check" in CI.`,
		FlagSet:     flag.NewFlagSet("meshd policy", flag.ContinueOnError),
		Options:     envOptions,
		Subcommands: []*ffcli.Command{c.policyCheckCmd(), c.policyExplainCmd(), c.policyDiffCmd()},
		Exec:        func(context.Context, []string) error { return flag.ErrHelp },
	}
}

// parseInterspersed parses fs from args, allowing flags after positional
// arguments ("meshd policy explain FILE --src x"), which the flag package
// alone stops at.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		if fs.NArg() == 0 {
			return pos, nil
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
}

// loadPolicy reads and parses FILE. Problems are returned as an *policy.Error.
func loadPolicy(file string) (*policy.Policy, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("read policy: %w", err)
	}
	return policy.Parse(file, b)
}

// policyError prints each problem of a rejected policy as FILE:LINE:COL:
// message and returns the exit error for it (or for a read failure).
func (c *cli) policyError(err error) error {
	var perr *policy.Error
	if errors.As(err, &perr) {
		for _, p := range perr.Problems {
			fmt.Fprintln(c.stdout, p)
		}
		return &exitError{code: 1, msg: fmt.Sprintf("policy rejected: %d problem(s)", len(perr.Problems))}
	}
	return &exitError{code: 1, msg: err.Error()}
}

type jsonProblem struct {
	File     string `json:"file"`
	Line     int    `json:"line"`
	Col      int    `json:"col"`
	Severity string `json:"severity"`
	Message  string `json:"message"`
}

func toJSONProblems(ps []policy.Problem) []jsonProblem {
	out := []jsonProblem{}
	for _, p := range ps {
		out = append(out, jsonProblem{File: p.Pos.File, Line: p.Pos.Line, Col: p.Pos.Col, Severity: p.Severity.String(), Message: p.Msg})
	}
	return out
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func (c *cli) policyCheckCmd() *ffcli.Command {
	fs := flag.NewFlagSet("meshd policy check", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "print the result as JSON")
	strict := fs.Bool("strict", false, "also exit 1 on warnings (sections meshd does not enforce: nodeAttrs; Tailscale settings it ignores: disableIPv4, randomizeClientPort, OneCGNATRoute; wide rules, unowned tags, unused groups, shadowed rules)")
	return &ffcli.Command{
		Name:       "check",
		ShortUsage: "meshd policy check [--json] [--strict] FILE",
		ShortHelp:  "parse, validate, run the policy's tests and lint it",
		LongHelp: `Parses FILE, validates every section, runs its "tests" and lints it.
Each problem is printed to stdout as FILE:LINE:COL: message.

Sections meshd parses but does not enforce yet ("ssh", "nodeAttrs") are
warnings at the section's line: such rules are not in force.

Exit status: 0 when the policy is valid and its tests pass (warnings are
printed but do not fail the check unless --strict); 1 when it is invalid, a
test fails, or --strict is set and there are warnings.`,
		FlagSet: fs,
		Options: envOptions,
		Exec: func(_ context.Context, args []string) error {
			pos, err := parseInterspersed(fs, args)
			if err != nil {
				return err
			}
			if len(pos) != 1 {
				return &exitError{code: 2, msg: "policy check: name one policy file: meshd policy check FILE"}
			}
			file := pos[0]
			pol, err := loadPolicy(file)
			var perr *policy.Error
			if err != nil && !errors.As(err, &perr) {
				return &exitError{code: 1, msg: err.Error()}
			}
			var errs, warns []policy.Problem
			if perr != nil {
				errs = perr.Problems
			} else {
				warns = pol.Lint()
			}
			failed := len(errs) > 0 || *strict && len(warns) > 0
			if *asJSON {
				res := struct {
					File     string        `json:"file"`
					Valid    bool          `json:"valid"`
					Rules    int           `json:"rules"`
					Tests    int           `json:"tests"`
					Errors   []jsonProblem `json:"errors"`
					Warnings []jsonProblem `json:"warnings"`
				}{File: file, Valid: len(errs) == 0, Errors: toJSONProblems(errs), Warnings: toJSONProblems(warns)}
				if pol != nil {
					res.Rules, res.Tests = pol.NumRules(), pol.NumTests()
				}
				if err := writeJSON(c.stdout, res); err != nil {
					return err
				}
			} else {
				for _, p := range errs {
					fmt.Fprintln(c.stdout, p)
				}
				for _, p := range warns {
					fmt.Fprintln(c.stdout, p)
				}
				if len(errs) == 0 {
					fmt.Fprintf(c.stdout, "%s: valid: %d rule(s), %d test(s) pass, %d warning(s)\n", file, pol.NumRules(), pol.NumTests(), len(warns))
				}
			}
			switch {
			case len(errs) > 0:
				return &exitError{code: 1, msg: fmt.Sprintf("%s: policy rejected: %d problem(s)", file, len(errs))}
			case failed:
				return &exitError{code: 1, msg: fmt.Sprintf("%s: %d warning(s) and --strict is set", file, len(warns))}
			}
			return nil
		},
	}
}

func (c *cli) policyExplainCmd() *ffcli.Command {
	fs := flag.NewFlagSet("meshd policy explain", flag.ContinueOnError)
	src := fs.String("src", "", "source: a user email, group:NAME, tag:NAME, host alias or IP")
	dst := fs.String("dst", "", "destination HOST:PORT: tag:NAME:PORT, USER:PORT, autogroup:self:PORT (the source user's own device), a host alias or an IP with one port")
	proto := fs.String("proto", "", "protocol name or number (default tcp)")
	sshUser := fs.String("ssh-user", "", "explain an SSH login as this local user instead: --dst names the device (no port)")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	return &ffcli.Command{
		Name:       "explain",
		ShortUsage: "meshd policy explain FILE --src SEL --dst HOST:PORT [--proto P] [--json]\n  meshd policy explain FILE --src SEL --dst HOST --ssh-user USER [--json]",
		ShortHelp:  "say whether a flow is allowed and which rule decides it",
		LongHelp: `Reads the source and destination as the policy's tests do: a user is one of
their untagged devices, a tag a device carrying only that tag, a group every
member (allowed only if every member is). With --ssh-user it says which "ssh"
rule lets the source log in to the device as that user (accept or check) and
which rule lets it reach TCP port 22 (ssh rules open no network access).

Exit status: 0 allowed; 1 denied, or the policy or the arguments are invalid.`,
		FlagSet: fs,
		Options: envOptions,
		Exec: func(_ context.Context, args []string) error {
			pos, err := parseInterspersed(fs, args)
			if err != nil {
				return err
			}
			if len(pos) != 1 || *src == "" || *dst == "" {
				return &exitError{code: 2, msg: "policy explain: usage: meshd policy explain FILE --src SEL --dst HOST:PORT [--proto P]"}
			}
			pol, err := loadPolicy(pos[0])
			if err != nil {
				return c.policyError(err)
			}
			if *sshUser != "" {
				return c.explainSSH(pol, *src, *dst, *sshUser, *proto, *asJSON)
			}
			ex, err := pol.Explain(*src, *dst, *proto)
			if err != nil {
				return &exitError{code: 1, msg: "policy explain: " + err.Error()}
			}
			if *asJSON {
				if err := writeJSON(c.stdout, ex); err != nil {
					return err
				}
			} else {
				for _, v := range ex.Verdicts {
					if v.Allowed {
						fmt.Fprintf(c.stdout, "allowed: %s -> %s (%s) by the rule at %s\n", v.Src, ex.Dst, ex.Proto, v.Rule)
					} else {
						fmt.Fprintf(c.stdout, "denied:  %s -> %s (%s): no rule allows it (deny by default)\n", v.Src, ex.Dst, ex.Proto)
					}
				}
				if r := ex.Routed; r != nil {
					fmt.Fprintf(c.stdout, "routed:  %s is outside the tailnet: it is reached through the primary subnet router approved for a route containing it (meshd admin routes list), else the source's exit node; that router's filter applies the rule above\n", ex.Dst)
					for _, a := range r.AutoApprovers {
						fmt.Fprintf(c.stdout, "routed:  autoApprovers approve routes %s\n", a)
					}
					for _, a := range r.ExitNode {
						fmt.Fprintf(c.stdout, "routed:  autoApprovers approve exit nodes of %s\n", a)
					}
					if len(r.AutoApprovers) == 0 {
						fmt.Fprintln(c.stdout, "routed:  no autoApprovers entry covers it: an administrator must approve the route (meshd admin routes approve NODE PREFIX)")
					}
					if r.Internet {
						fmt.Fprintln(c.stdout, "routed:  it is in autogroup:internet: an exit node forwards it only for sources granted autogroup:internet (\"*\" does not include it) or its CIDR")
					}
					for _, v := range r.Via {
						fmt.Fprintf(c.stdout, "routed:  only these routers forward it (via): %s\n", v)
					}
				}
			}
			if !ex.Allowed {
				return &exitError{code: 1}
			}
			return nil
		},
	}
}

func (c *cli) explainSSH(pol *policy.Policy, src, dst, user, proto string, asJSON bool) error {
	if proto != "" {
		return &exitError{code: 2, msg: "policy explain: --proto does not apply with --ssh-user (SSH is TCP port 22)"}
	}
	ex, err := pol.ExplainSSH(src, dst, user)
	if err != nil {
		return &exitError{code: 1, msg: "policy explain: " + err.Error()}
	}
	if asJSON {
		if err := writeJSON(c.stdout, ex); err != nil {
			return err
		}
	} else {
		for _, v := range ex.Verdicts {
			switch {
			case v.Action == "":
				fmt.Fprintf(c.stdout, "denied:  ssh %s -> %s as %q: no ssh rule allows it\n", v.Src, ex.Dst, ex.User)
			case v.Port22Rule == "":
				fmt.Fprintf(c.stdout, "denied:  ssh %s -> %s as %q: the ssh rule at %s would %s it, but no acl or grant lets it reach tcp:22\n", v.Src, ex.Dst, ex.User, v.Rule, v.Action)
			default:
				fmt.Fprintf(c.stdout, "%s: ssh %s -> %s as %q by the ssh rule at %s (tcp:22 by the rule at %s)\n", v.Action, v.Src, ex.Dst, ex.User, v.Rule, v.Port22Rule)
			}
		}
	}
	if !ex.Allowed {
		return &exitError{code: 1}
	}
	return nil
}

func (c *cli) policyDiffCmd() *ffcli.Command {
	fs := flag.NewFlagSet("meshd policy diff", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "print the result as JSON")
	live := fs.Bool("live", false, "compare the policy in force on the coordinator with NEW, and list the access between nodes connected now that NEW would cut (needs --coordinator and --token-file, as meshd admin)")
	var conn adminConn
	conn.register(fs)
	return &ffcli.Command{
		Name:       "diff",
		ShortUsage: "meshd policy diff [--json] OLD NEW | meshd policy diff --live [--json] --coordinator URL --token-file FILE NEW",
		ShortHelp:  "list the flows NEW opens and closes compared with OLD",
		LongHelp: `Compares two policy files by what they allow, not by their text: each line is
a flow (source, destination, ports, protocols) that NEW opens or closes, with
the rule responsible. Groups are expanded to their members, so a membership
change shows as the flows it opens or closes. Rewording a rule without
changing what it allows shows nothing.

With --live, OLD is the policy in force on the coordinator, and the coordinator
also lists, for every pair of nodes connected to it now, what the source may
open to the destination today and could not under NEW: the connections NEW
would cut if they are open, and new ones it would refuse. The coordinator sees
who may connect, not which connections are open (meshd debug drops on a node
shows what its filter dropped after the change). Nothing is changed.

Exit status: 0 when both policies are valid (whether or not they differ); 1
when either is invalid.`,
		FlagSet: fs,
		Options: envOptions,
		Exec: func(ctx context.Context, args []string) error {
			pos, err := parseInterspersed(fs, args)
			if err != nil {
				return err
			}
			if *live {
				if len(pos) != 1 {
					return &exitError{code: 2, msg: "policy diff --live: usage: meshd policy diff --live --coordinator URL --token-file FILE NEW"}
				}
				return c.policyDiffLive(ctx, &conn, pos[0], *asJSON)
			}
			// The connection flags serve --live only. From the
			// environment (MESHD_COORDINATOR, ...) they are the admin's
			// standing settings; typed on the command line without
			// --live they would do nothing, which is an error.
			for _, f := range []struct{ flag, val, env string }{
				{"--coordinator", conn.url, "MESHD_COORDINATOR"},
				{"--token-file", conn.tokenFile, "MESHD_TOKEN_FILE"},
				{"--admin-token", conn.token, "MESHD_ADMIN_TOKEN"},
			} {
				if f.val != "" && f.val != os.Getenv(f.env) {
					return &exitError{code: 2, msg: fmt.Sprintf("policy diff: %s is used only with --live (compare the policy in force with a file)", f.flag)}
				}
			}
			if len(pos) != 2 {
				return &exitError{code: 2, msg: "policy diff: usage: meshd policy diff OLD NEW (or --live NEW)"}
			}
			oldP, err := loadPolicy(pos[0])
			if err != nil {
				return c.policyError(err)
			}
			newP, err := loadPolicy(pos[1])
			if err != nil {
				return c.policyError(err)
			}
			d := policy.Diff(oldP, newP)
			if *asJSON {
				return writeJSON(c.stdout, d)
			}
			c.printDiff(d, pos[0], pos[1])
			return nil
		},
	}
}

func (c *cli) printDiff(d policy.PolicyDiff, oldName, newName string) {
	if len(d.Opened) == 0 && len(d.Closed) == 0 {
		fmt.Fprintf(c.stdout, "no change in allowed flows between %s and %s\n", oldName, newName)
		return
	}
	printFlows := func(title, sign string, fl []policy.Flow) {
		if len(fl) == 0 {
			return
		}
		fmt.Fprintf(c.stdout, "%s (%d):\n", title, len(fl))
		for _, f := range fl {
			fmt.Fprintf(c.stdout, "  %s %s\n", sign, f)
		}
	}
	printFlows("opened by "+newName, "+", d.Opened)
	printFlows("closed by "+newName, "-", d.Closed)
}

// policyDiffLive is `meshd policy diff --live NEW`: the policy in force
// against NEW, and what NEW would cut between the nodes connected now.
func (c *cli) policyDiffLive(ctx context.Context, conn *adminConn, file string, asJSON bool) error {
	ac, err := conn.client()
	if err != nil {
		return err
	}
	newP, err := loadPolicy(file)
	if err != nil {
		return c.policyError(err)
	}
	data, err := readPolicyFile(file)
	if err != nil {
		return &exitError{1, err.Error()}
	}
	cur, err := ac.Policy(ctx)
	if err != nil {
		return fmt.Errorf("policy diff --live: %w", err)
	}
	oldP, oldName := policy.Bootstrap(), "the bootstrap default"
	if !cur.Bootstrap {
		if oldP, err = policy.Parse(cur.File, []byte(cur.Text)); err != nil {
			return fmt.Errorf("policy diff --live: the policy in force does not parse here (a newer coordinator?): %w", err)
		}
		oldName = cur.File + " (in force)"
	}
	rep, err := ac.PolicyCuts(ctx, file, data)
	if err != nil {
		return fmt.Errorf("policy diff --live: %w", err)
	}
	d := policy.Diff(oldP, newP)
	if asJSON {
		return writeJSON(c.stdout, struct {
			policy.PolicyDiff
			Live control.PolicyCutReport `json:"live"`
		}{d, rep})
	}
	c.printDiff(d, oldName, file)
	if len(rep.Cuts) == 0 {
		fmt.Fprintf(c.stdout, "no access in use-able now is cut: %d node(s) connected\n", rep.Connected)
		return nil
	}
	fmt.Fprintf(c.stdout, "access cut between the %d node(s) connected now (open connections among these would be cut):\n", rep.Connected)
	for _, cut := range rep.Cuts {
		fmt.Fprintf(c.stdout, "  - %s\n", cut)
	}
	if more := rep.Total - len(rep.Cuts); more > 0 {
		fmt.Fprintf(c.stdout, "  ... and %d more pairs (the flows closed above say which)\n", more)
	}
	return nil
}
