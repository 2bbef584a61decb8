package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"text/tabwriter"
	"unicode"

	"github.com/peterbourgon/ff/v3/ffcli"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/agent/magicbind"
)

func (c *cli) statusCmd() *ffcli.Command {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	socket := fs.String("socket", localapi.DefaultSocket, "local API unix socket of the daemon")
	asJSON := fs.Bool("json", false, "print JSON")
	return &ffcli.Command{
		Name:       "status",
		ShortUsage: "meshd status [--json] [--socket PATH]",
		ShortHelp:  "show this node and its peers; exits 1 unless the node is running",
		LongHelp: `Exit status: 0 when the node is running (backend_state Running, health
warnings or not: docs/health.md); 1 otherwise, with the reason on stderr
(stopped, logged out, expired, waiting for approval, starting, no daemon).`,
		FlagSet: fs,
		Options: envOptions,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return fmt.Errorf("status: unexpected arguments %q", args)
			}
			st, err := localapi.NewClient(*socket).Status(ctx)
			if err != nil {
				return noDaemonHint(err, *socket)
			}
			if *asJSON {
				enc := json.NewEncoder(c.stdout)
				enc.SetIndent("", "  ")
				if err := enc.Encode(st); err != nil {
					return err
				}
			} else {
				writeStatus(c.stdout, st)
			}
			return notRunning(st)
		},
	}
}

// writeStatus prints the table a Tailscale user knows: address, name,
// owner, and connection state, self first.
func writeStatus(w io.Writer, st *localapi.Status) {
	switch st.BackendState {
	case localapi.StateNeedsLogin:
		if st.Self == nil || st.Message == "" {
			fmt.Fprintln(w, "Logged out: run meshd up --authkey KEY --coordinator URL")
		} else {
			fmt.Fprintf(w, "Logged out: %s\n", st.Message)
		}
		return
	case localapi.StateStopped:
		fmt.Fprintln(w, "meshd is stopped: run meshd up")
	case localapi.StateNeedsApproval:
		if st.Self != nil {
			fmt.Fprintf(w, "Waiting for approval by an admin: meshd admin nodes approve %d\n", st.Self.ID)
		}
	}
	tw := tabwriter.NewWriter(w, 0, 4, 3, ' ', 0)
	if st.Self != nil {
		state := "-"
		switch {
		case st.BackendState == localapi.StateExpired:
			state = "expired (re-enrol: meshd up --authkey KEY)"
		case st.BackendState == localapi.StateNeedsApproval:
			state = "waiting for approval"
		case !st.Self.Online:
			state = "offline (coordinator unreachable; data plane on last map)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", firstIP(st.Self.IPs), st.Self.Hostname, owner(st.Self), state)
	}
	for _, p := range st.Peers {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", firstIP(p.IPs), p.Hostname, owner(&p.Node), peerState(&p))
	}
	tw.Flush()
	if st.Filter != nil {
		fmt.Fprintf(w, "# %s\n", filterLine(st.Filter))
	}
	if st.MTU != nil {
		fmt.Fprintf(w, "# %s\n", mtuLine(st.MTU))
	}
	if st.SSH {
		fmt.Fprintln(w, "# ssh: serving port 22 on the tailnet addresses (meshd up --ssh)")
	}
	if st.SSHError != "" {
		fmt.Fprintf(w, "# ssh: %s\n", printable(st.SSHError))
	}
	if st.Message != "" {
		fmt.Fprintf(w, "# %s\n", st.Message)
	}
	if st.Self != nil {
		for _, n := range st.Self.Notices {
			fmt.Fprintf(w, "# coordinator: %s\n", printable(n))
		}
		if r := routesLine(st.Self); r != "" {
			fmt.Fprintf(w, "# routes of %s: %s\n", st.Self.Hostname, r)
		}
	}
	for _, p := range st.Peers {
		if r := routesLine(&p.Node); r != "" {
			fmt.Fprintf(w, "# routes of %s: %s\n", p.Hostname, r)
		}
	}
	for _, h := range st.Health {
		// MTU problems get their own line per peer below; an
		// unreachable coordinator is the message above.
		if h.Code == localapi.HealthMTUProblem || (h.Code == localapi.HealthCoordinatorUnreachable && st.Message != "") {
			continue
		}
		fmt.Fprintf(w, "# health: %s: %s\n", h.Code, h.Message)
	}
	// Small packets cross such a path, so the peer looks fine in the table
	// while bulk transfers hang: say so, and what to do.
	for _, p := range st.Peers {
		if p.MTUProblem {
			fmt.Fprintf(w, "# warning: %s\n", magicbind.MTUProblemText(p.Hostname, p.PathMTU, p.OverlayMTU))
		}
	}
}

// mtuLine says which MTU the tunnel runs at and why.
func mtuLine(m *localapi.MTUStatus) string {
	if m.Interface == "" {
		return fmt.Sprintf("mtu %d: %s", m.MTU, m.Reason)
	}
	return fmt.Sprintf("mtu %d from %s (mtu %d): %s", m.MTU, m.Interface, m.UnderlayMTU, m.Reason)
}

// notRunning is the exit of `meshd status`: nil when the node is running,
// else an exit status 1 naming the state and why.
func notRunning(st *localapi.Status) error {
	if st.BackendState == localapi.StateRunning {
		return nil
	}
	msg := "not running: " + st.BackendState
	if st.Message != "" {
		msg += ": " + printable(st.Message)
	}
	return &exitError{code: 1, msg: msg}
}

// printable drops control characters from text the coordinator sent, so
// that it cannot drive the terminal.
func printable(text string) string {
	return strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return -1
		}
		return r
	}, text)
}

func firstIP(ips []netip.Addr) string {
	for _, ip := range ips {
		if ip.Is4() {
			return ip.String()
		}
	}
	if len(ips) > 0 {
		return ips[0].String()
	}
	return "-"
}

func owner(n *localapi.Node) string {
	if len(n.Tags) > 0 {
		return strings.Join(n.Tags, ",")
	}
	if n.User != "" {
		return n.User
	}
	return "-"
}

func peerState(p *localapi.Peer) string {
	var parts []string
	switch {
	case !p.Online:
		parts = append(parts, "offline")
	case p.Path == "direct" && p.Active:
		parts = append(parts, "active; direct "+p.Endpoint)
	case p.Path == "direct":
		parts = append(parts, "idle; direct "+p.Endpoint)
	case p.Path == "derp" && p.Active:
		// As tailscale shows it: active; relay "lab".
		parts = append(parts, fmt.Sprintf("active; relay %q", strings.TrimPrefix(p.Endpoint, "derp:")))
	case p.Path == "derp":
		parts = append(parts, fmt.Sprintf("idle; relay %q", strings.TrimPrefix(p.Endpoint, "derp:")))
	default:
		parts = append(parts, "idle")
	}
	if p.RxBytes > 0 || p.TxBytes > 0 {
		parts = append(parts, fmt.Sprintf("tx %d rx %d", p.TxBytes, p.RxBytes))
	}
	return strings.Join(parts, ", ")
}
