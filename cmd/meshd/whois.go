package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/peterbourgon/ff/v3/ffcli"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/agent/whois"
)

func (c *cli) whoisCmd() *ffcli.Command {
	fs := flag.NewFlagSet("whois", flag.ContinueOnError)
	socket := fs.String("socket", localapi.DefaultSocket, "local API unix socket of the daemon")
	asJSON := fs.Bool("json", false, "print the answer as JSON")
	return &ffcli.Command{
		Name:       "whois",
		ShortUsage: "meshd whois [--json] IP[:PORT]",
		ShortHelp:  "show which node and user hold a tailnet address",
		LongHelp: `Looks IP up in this node's network map and prints the node that holds it
(id, name, MagicDNS name, addresses, tags, OS), its owner's login unless the
node is tagged (tagged nodes act for no user), and the app capabilities the
tailnet policy's grants give that node when it connects to this one (the
"app" field of grants, by capability name, values as written in the policy).
An address inside a peer's approved subnet route answers with that router.
Exits 1 when no node holds the address.`,
		FlagSet: fs,
		Options: envOptions,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) != 1 {
				return &exitError{2, "whois: want exactly one IP or IP:PORT"}
			}
			if _, err := localapi.ParseWhoIsAddr(args[0]); err != nil {
				return &exitError{2, err.Error()}
			}
			res, err := localapi.NewClient(*socket).WhoIs(ctx, args[0])
			if errors.Is(err, localapi.ErrNoSuchNode) {
				return &exitError{1, err.Error()}
			}
			if err != nil {
				return noDaemonHint(err, *socket)
			}
			if *asJSON {
				enc := json.NewEncoder(c.stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(res)
			}
			writeWhois(c.stdout, res)
			return nil
		},
	}
}

func writeWhois(w io.Writer, r *whois.Response) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "Machine:")
	fmt.Fprintf(tw, "  Name:\t%s\n", strings.TrimSuffix(r.Node.DNSName, "."))
	fmt.Fprintf(tw, "  Hostname:\t%s\n", r.Node.Hostname)
	fmt.Fprintf(tw, "  ID:\t%d\n", r.Node.ID)
	ips := make([]string, len(r.Node.IPs))
	for i, ip := range r.Node.IPs {
		ips[i] = ip.String()
	}
	fmt.Fprintf(tw, "  Addresses:\t%s\n", strings.Join(ips, ", "))
	if len(r.Node.Tags) > 0 {
		fmt.Fprintf(tw, "  Tags:\t%s\n", strings.Join(r.Node.Tags, ", "))
	}
	if r.Node.OS != "" {
		fmt.Fprintf(tw, "  OS:\t%s\n", r.Node.OS)
	}
	if r.Self {
		fmt.Fprintln(tw, "  (this node)")
	}
	if r.User != "" {
		fmt.Fprintln(tw, "User:")
		fmt.Fprintf(tw, "  Login:\t%s\n", r.User)
	}
	if len(r.Capabilities) > 0 {
		fmt.Fprintln(tw, "Capabilities:")
		names := make([]string, 0, len(r.Capabilities))
		for name := range r.Capabilities {
			names = append(names, name)
		}
		slices.Sort(names)
		for _, name := range names {
			vals, _ := json.Marshal(r.Capabilities[name])
			fmt.Fprintf(tw, "  %s:\t%s\n", name, vals)
		}
	}
	tw.Flush()
}
