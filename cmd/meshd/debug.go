package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"

	"meshd.dev/meshd/agent/localapi"
)

func (c *cli) debugCmd() *ffcli.Command {
	return &ffcli.Command{
		Name:        "debug",
		ShortUsage:  "meshd debug <subcommand>",
		ShortHelp:   "inspect the running daemon",
		FlagSet:     flag.NewFlagSet("debug", flag.ContinueOnError),
		Subcommands: []*ffcli.Command{c.debugDropsCmd(), c.debugPprofCmd()},
		Exec:        func(context.Context, []string) error { return flag.ErrHelp },
	}
}

func (c *cli) debugDropsCmd() *ffcli.Command {
	fs := flag.NewFlagSet("debug drops", flag.ContinueOnError)
	socket := fs.String("socket", localapi.DefaultSocket, "local API unix socket of the daemon")
	asJSON := fs.Bool("json", false, "print JSON")
	return &ffcli.Command{
		Name:       "drops",
		ShortUsage: "meshd debug drops [--json] [--socket PATH]",
		ShortHelp:  "show the last packets the packet filter dropped, and why",
		LongHelp: "Lists the packets the daemon's packet filter dropped most recently, oldest first:\n" +
			"time, direction (in: from a peer, out: to a peer), reason, protocol and addresses.\n" +
			"A drop that the rules in force now would allow names the rule (it was dropped\n" +
			"under an earlier policy). Counters of all drops are in `meshd status --json`.",
		FlagSet: fs,
		Options: envOptions,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return fmt.Errorf("debug drops: unexpected arguments %q", args)
			}
			d, err := localapi.NewClient(*socket).Drops(ctx)
			if err != nil {
				return noDaemonHint(err, *socket)
			}
			if *asJSON {
				enc := json.NewEncoder(c.stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(d)
			}
			writeDrops(c.stdout, d)
			return nil
		},
	}
}

func (c *cli) debugPprofCmd() *ffcli.Command {
	fs := flag.NewFlagSet("debug pprof", flag.ContinueOnError)
	socket := fs.String("socket", localapi.DefaultSocket, "local API unix socket of the daemon")
	seconds := fs.Int("seconds", 10, "how long a CPU profile (profile) or trace records")
	out := fs.String("o", "", "write the profile to this file (default: standard output)")
	debug := fs.Int("debug", 0, "1 or 2: text instead of the binary pprof format (heap, goroutine, ...)")
	return &ffcli.Command{
		Name:       "pprof",
		ShortUsage: "meshd debug pprof [--seconds N] [-o FILE] heap|allocs|goroutine|profile|mutex|block|trace",
		ShortHelp:  "fetch a Go runtime profile of the running daemon",
		LongHelp: "Fetches a runtime/pprof profile from the daemon's local API, for `go tool pprof`:\n" +
			"  meshd debug pprof -o heap.pb.gz heap\n" +
			"  meshd debug pprof --seconds 30 -o cpu.pb.gz profile\n" +
			"  go tool pprof -top heap.pb.gz",
		FlagSet: fs,
		Options: envOptions,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) != 1 {
				return fmt.Errorf("debug pprof: want one profile name (heap, allocs, goroutine, profile, mutex, block, trace), got %q", args)
			}
			if *seconds < 1 {
				return fmt.Errorf("debug pprof: --seconds %d: want at least 1", *seconds)
			}
			params := url.Values{}
			switch args[0] {
			case "profile", "trace":
				params.Set("seconds", strconv.Itoa(*seconds))
			}
			if *debug != 0 {
				params.Set("debug", strconv.Itoa(*debug))
			}
			w := c.stdout
			if *out != "" {
				f, err := os.Create(*out)
				if err != nil {
					return fmt.Errorf("debug pprof: %w", err)
				}
				defer f.Close()
				w = f
			}
			if err := localapi.NewClient(*socket).Profile(ctx, args[0], params, w); err != nil {
				return noDaemonHint(err, *socket)
			}
			if f, ok := w.(*os.File); ok && f != c.stdout {
				return f.Close()
			}
			return nil
		},
	}
}

// writeDrops prints one line per dropped packet.
func writeDrops(w io.Writer, d *localapi.Drops) {
	if len(d.Drops) == 0 {
		fmt.Fprintln(w, "no packets dropped")
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "TIME\tDIR\tREASON\tPROTO\tSRC\tDST\tLEN\tNOTE")
	for _, p := range d.Drops {
		note := ""
		if p.AllowedNowBy != "" {
			note = "allowed now by " + p.AllowedNowBy
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\n", p.Time.Local().Format(time.TimeOnly+".000"), p.Dir, p.Reason,
			protoName(p.Proto, p.Src.IsValid()), hostPort(p.Src, p.SrcPort), hostPort(p.Dst, p.DstPort), p.Len, note)
	}
	tw.Flush()
}

func protoName(p uint8, parsed bool) string {
	if !parsed {
		return "-"
	}
	switch p {
	case 1:
		return "icmp"
	case 6:
		return "tcp"
	case 17:
		return "udp"
	case 58:
		return "icmpv6"
	case 132:
		return "sctp"
	}
	return "proto-" + strconv.Itoa(int(p))
}

func hostPort(a netip.Addr, port uint16) string {
	switch {
	case !a.IsValid():
		return "-"
	case port == 0:
		return a.String()
	}
	return netip.AddrPortFrom(a, port).String()
}

// filterLine summarises the packet filter for the human status: rules,
// flows and the non-zero drop counters.
func filterLine(f *localapi.FilterStatus) string {
	var dirs []string
	for _, dir := range []struct {
		name   string
		counts map[string]uint64
	}{{"in", f.DropsIn}, {"out", f.DropsOut}} {
		var parts []string
		for _, reason := range slices.Sorted(maps.Keys(dir.counts)) {
			if n := dir.counts[reason]; n > 0 {
				parts = append(parts, fmt.Sprintf("%s %d", reason, n))
			}
		}
		if len(parts) > 0 {
			dirs = append(dirs, dir.name+": "+strings.Join(parts, ", "))
		}
	}
	s := fmt.Sprintf("filter: %d rules, %d flows; ", f.Rules, f.Flows)
	if f.Bootstrap {
		s = fmt.Sprintf("filter: allow all (the coordinator has no policy: meshd admin policy set FILE), %d flows; ", f.Flows)
	}
	if len(dirs) == 0 {
		s += "no drops"
	} else {
		s += "dropped " + strings.Join(dirs, "; ") + " (see meshd debug drops)"
	}
	if f.Error != "" {
		s += "; rules of the last map rejected, previous ones in force: " + f.Error
	}
	return s
}
