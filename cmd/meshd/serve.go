package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/peterbourgon/ff/v3/ffcli"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/agent/serve"
)

// servePort is a --http/--https/--tcp value: a tailnet port, remembered
// as given so that a missing flag and a bad port differ.
type servePort struct {
	port uint16
	set  bool
}

func (p *servePort) String() string {
	if p == nil || !p.set {
		return ""
	}
	return strconv.Itoa(int(p.port))
}

func (p *servePort) Set(s string) error {
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || n == 0 {
		return fmt.Errorf("want a tailnet TCP port 1-65535, got %q", s)
	}
	p.port, p.set = uint16(n), true
	return nil
}

const serveLongHelp = `Exposes a service on this machine to the tailnet, on this node's tailnet
addresses only (never the LAN, never 0.0.0.0), in kernel TUN and userspace
mode alike. The configuration is kept in the state dir and restored when
the daemon starts.

  meshd serve --http PORT --to URL     reverse proxy; URL is http(s)://localhost,
                                       127.0.0.1 or [::1] with a port and path,
                                       or a bare port (http://127.0.0.1:PORT)
  meshd serve --https PORT --to URL    the same over TLS with a certificate for
                                       this node's name from the tailnet CA
  meshd serve --tcp PORT --to ADDR     plain TCP relay to a local HOST:PORT
  meshd serve --http PORT off          stop serving PORT (likewise --https, --tcp)
  meshd serve reset                    stop serving everything
  meshd serve status [--json]          list what is served

HTTP and HTTPS requests reach the service with the caller's identity in
headers (Meshd-User-Login, Meshd-User-Name, Meshd-Node-Name, Meshd-Node-ID,
Meshd-Node-Tags, Meshd-App-Capabilities, and Tailscale-User-Login,
Tailscale-User-Name for apps written for tailscale serve); any Meshd-* or
Tailscale-* header the caller sent is removed first. Tagged callers get
tags and no user. TCP carries no identity. Only tailnet peers the policy
lets reach the port are served: the packet filter applies. Targets must
be on this machine (loopback). A change that would change nothing, such
as serving a port exactly as it is served, exits 1.`

func (c *cli) serveCmd() *ffcli.Command {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	// One socket variable for serve and its subcommands, so that both
	// `serve --socket S status` and `serve status --socket S` work.
	socket := new(string)
	fs.StringVar(socket, "socket", localapi.DefaultSocket, "local API unix socket of the daemon")
	var ports [3]servePort
	protos := [3]serve.Proto{serve.HTTP, serve.HTTPS, serve.TCP}
	fs.Var(&ports[0], "http", "serve HTTP with identity headers on tailnet `port`")
	fs.Var(&ports[1], "https", "serve HTTPS with identity headers on tailnet `port` (certificate from the tailnet CA)")
	fs.Var(&ports[2], "tcp", "relay TCP on tailnet `port`")
	to := fs.String("to", "", "where the service listens on this machine: http://127.0.0.1:PORT[/PATH] (or a port) for --http/--https, HOST:PORT (or a port) for --tcp")
	return &ffcli.Command{
		Name:       "serve",
		ShortUsage: "meshd serve --http|--https|--tcp PORT (--to TARGET | off) | reset | status [--json]",
		ShortHelp:  "expose a local service to the tailnet, with caller identity headers",
		LongHelp:   serveLongHelp,
		FlagSet:    fs,
		Options:    envOptions,
		Subcommands: []*ffcli.Command{
			c.serveStatusCmd(socket),
			c.serveResetCmd(socket),
		},
		Exec: func(ctx context.Context, args []string) error {
			var req localapi.ServeRequest
			n := 0
			for i, p := range ports {
				if p.set {
					n++
					req.Proto, req.Port = string(protos[i]), p.port
				}
			}
			if n != 1 {
				return &exitError{2, "serve: give exactly one of --http PORT, --https PORT, --tcp PORT (or serve status, serve reset)"}
			}
			off := len(args) == 1 && args[0] == "off"
			switch {
			case off && *to != "":
				return &exitError{2, "serve: --to and off together: off removes the port, --to serves it"}
			case !off && len(args) > 0:
				return &exitError{2, fmt.Sprintf("serve: unexpected arguments %q (the target goes in --to; `off` alone removes the port)", args)}
			case !off && *to == "":
				return &exitError{2, fmt.Sprintf("serve: --%s %d needs --to TARGET, or off to stop serving it", req.Proto, req.Port)}
			}
			lc := localapi.NewClient(*socket)
			if off {
				st, err := lc.ServeRemove(ctx, req)
				if err != nil {
					return serveErr(err, *socket)
				}
				fmt.Fprintf(c.stdout, "stopped serving %s on tailnet port %d\n", req.Proto, req.Port)
				writeServeStatus(c.stdout, st)
				return nil
			}
			// Check here too, for a usage error before the daemon is asked.
			e, err := serve.NewEntry(serve.Proto(req.Proto), req.Port, *to)
			if err != nil {
				return &exitError{2, err.Error()}
			}
			req.Target = e.Target
			st, err := lc.ServeAdd(ctx, req)
			if err != nil {
				return serveErr(err, *socket)
			}
			for _, es := range st.Entries {
				if es.Port == e.Port {
					fmt.Fprintf(c.stdout, "serving %s -> %s\n", serveURL(st.DNSName, es.Entry), es.Target)
				}
			}
			if st.Message != "" {
				fmt.Fprintf(c.stdout, "# %s\n", st.Message)
			}
			return nil
		},
	}
}

func (c *cli) serveStatusCmd(socket *string) *ffcli.Command {
	fs := flag.NewFlagSet("serve status", flag.ContinueOnError)
	fs.StringVar(socket, "socket", localapi.DefaultSocket, "local API unix socket of the daemon")
	asJSON := fs.Bool("json", false, "print the status as JSON")
	return &ffcli.Command{
		Name:       "status",
		ShortUsage: "meshd serve status [--json]",
		ShortHelp:  "list what this node serves to the tailnet",
		FlagSet:    fs,
		Options:    envOptions,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return &exitError{2, fmt.Sprintf("serve status: unexpected arguments %q", args)}
			}
			st, err := localapi.NewClient(*socket).ServeStatus(ctx)
			if err != nil {
				return noDaemonHint(err, *socket)
			}
			if *asJSON {
				enc := json.NewEncoder(c.stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(st)
			}
			if len(st.Entries) == 0 {
				fmt.Fprintln(c.stdout, "nothing is served")
			}
			writeServeStatus(c.stdout, st)
			return nil
		},
	}
}

func (c *cli) serveResetCmd(socket *string) *ffcli.Command {
	fs := flag.NewFlagSet("serve reset", flag.ContinueOnError)
	fs.StringVar(socket, "socket", localapi.DefaultSocket, "local API unix socket of the daemon")
	return &ffcli.Command{
		Name:       "reset",
		ShortUsage: "meshd serve reset",
		ShortHelp:  "stop serving everything",
		FlagSet:    fs,
		Options:    envOptions,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return &exitError{2, fmt.Sprintf("serve reset: unexpected arguments %q", args)}
			}
			if _, err := localapi.NewClient(*socket).ServeReset(ctx); err != nil {
				return serveErr(err, *socket)
			}
			fmt.Fprintln(c.stdout, "nothing is served now")
			return nil
		},
	}
}

// serveErr is a daemon's refusal as exit status 1 with its message.
func serveErr(err error, socket string) error {
	if errors.Is(err, localapi.ErrNoDaemon) {
		return noDaemonHint(err, socket)
	}
	return &exitError{1, err.Error()}
}

// serveURL is how a tailnet caller reaches e: by the node's DNS name when
// there is one.
func serveURL(dnsName string, e serve.Entry) string {
	host := strings.TrimSuffix(dnsName, ".")
	if host == "" {
		host = "TAILNET-ADDRESS"
	}
	switch {
	case e.Proto == serve.TCP:
		return fmt.Sprintf("tcp %s", net.JoinHostPort(host, strconv.Itoa(int(e.Port))))
	case e.Proto == serve.HTTP && e.Port == 80, e.Proto == serve.HTTPS && e.Port == 443:
		return fmt.Sprintf("%s://%s/", e.Proto, host)
	}
	return fmt.Sprintf("%s://%s/", e.Proto, net.JoinHostPort(host, strconv.Itoa(int(e.Port))))
}

func writeServeStatus(w io.Writer, st *localapi.ServeStatus) {
	if len(st.Entries) > 0 {
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "URL\tTARGET\tSTATE")
		for _, e := range st.Entries {
			state := "not listening"
			switch {
			case e.Error != "":
				state = "failed: " + e.Error
			case len(e.Listening) > 0:
				addrs := make([]string, len(e.Listening))
				for i, a := range e.Listening {
					addrs[i] = a.String()
				}
				state = "listening on " + strings.Join(addrs, ", ")
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\n", serveURL(st.DNSName, e.Entry), e.Target, state)
		}
		tw.Flush()
	}
	if st.Message != "" {
		fmt.Fprintf(w, "# %s\n", st.Message)
	}
}
