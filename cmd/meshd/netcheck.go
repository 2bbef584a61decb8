package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"

	"meshd.dev/meshd/agent"
	"meshd.dev/meshd/control"
	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/nat/netcheck"
	"meshd.dev/meshd/netmap"
)

// Files the agent keeps in its state dir (agent/state.go): its last
// network map (a full MapResponse) and its login (coordinator URL and pin).
const (
	savedNetmapFile = "netmap.json"
	savedLoginFile  = "login.json"
)

func (c *cli) netcheckCmd() *ffcli.Command {
	fs := flag.NewFlagSet("netcheck", flag.ContinueOnError)
	derpMap := fs.String("derp-map", "", "DERP map `file` (huJSON, as the coordinator's --derp-map) to measure against")
	coordinator := fs.String("coordinator", "", "coordinator `URL` whose DERP map to fetch and measure against")
	fingerprint := fs.String("fingerprint", "", "the coordinator's key `fingerprint` (printed at its start; the last part of every auth key); default: the pin in --state-dir when that node is registered with --coordinator")
	stateDir := fs.String("state-dir", "/var/lib/meshd", "the node's state `directory`: the DERP map of its last network map is used when neither --derp-map nor --coordinator is given")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	timeout := fs.Duration("timeout", 3*time.Second, "how long to wait for STUN answers")
	return &ffcli.Command{
		Name:       "netcheck",
		ShortUsage: "meshd netcheck [--derp-map FILE | --coordinator URL [--fingerprint FP] | --state-dir DIR] [--json]",
		ShortHelp:  "report what the network allows: UDP, public endpoints, NAT type, DERP latency",
		LongHelp: `Probes the STUN servers of every DERP region from this machine and reports
whether UDP gets out, the public IPv4/IPv6 address and port the NAT maps to,
whether that mapping varies by destination (a symmetric NAT, which defeats
direct connections), the latency to each region and the preferred one.

It runs standalone (no daemon needed). The DERP map comes from --derp-map
FILE; or from the coordinator with --coordinator URL, fetched from its public
/derpmap/default over TLS pinned to its key: --fingerprint FP, or the pin a
node registered with that coordinator keeps in --state-dir; or else from the
node's last network map in --state-dir (written by meshd up / meshd daemon).`,
		FlagSet: fs,
		Options: envOptions,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return &exitError{2, fmt.Sprintf("netcheck: unexpected arguments %q", args)}
			}
			if *timeout <= 0 {
				return &exitError{2, "netcheck: --timeout must be positive"}
			}
			if *derpMap != "" && *coordinator != "" {
				return &exitError{2, "netcheck: --derp-map and --coordinator both name a DERP map: pass one"}
			}
			if *fingerprint != "" && *coordinator == "" {
				return &exitError{2, "netcheck: --fingerprint pins the --coordinator: pass --coordinator URL too"}
			}
			var m *netmap.DERPMap
			var err error
			switch {
			case *derpMap != "":
				m, err = control.LoadDERPMap(*derpMap)
			case *coordinator != "":
				fp := *fingerprint
				if fp == "" {
					if fp, err = savedPin(*stateDir, *coordinator); err != nil {
						return &exitError{2, "netcheck: " + err.Error()}
					}
				}
				m, err = control.FetchDERPMap(ctx, *coordinator, fp)
			default:
				m, err = savedDERPMap(*stateDir)
			}
			if err != nil {
				return &exitError{1, "netcheck: " + err.Error()}
			}
			r, err := netcheck.Run(ctx, netcheck.Options{DERPMap: m, Timeout: *timeout, Logger: c.log})
			if err != nil {
				return &exitError{1, err.Error()}
			}
			if *asJSON {
				enc := json.NewEncoder(c.stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(newNetcheckJSON(m, r))
			}
			printNetcheck(c.stdout, m, r)
			return nil
		},
	}
}

// savedDERPMap reads the DERP map from the agent's saved network map. The
// file is read directly, not through the agent's state store, because the
// running daemon holds that store's lock.
func savedDERPMap(dir string) (*netmap.DERPMap, error) {
	path := filepath.Join(dir, savedNetmapFile)
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("no saved network map at %s: run `meshd up` first, pass --state-dir of the node, or --derp-map FILE", path)
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var resp netmap.MapResponse
	if err := netmap.DecodeJSON(f, netmap.MaxMessageSize, &resp); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if resp.DERPMap == nil || len(resp.DERPMap.Regions) == 0 {
		return nil, fmt.Errorf("%s has no DERP map (the coordinator sent none): pass --derp-map FILE", path)
	}
	if err := resp.DERPMap.Validate(); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return resp.DERPMap, nil
}

// savedPin returns the coordinator key pin of the node registered in dir,
// if it is registered with the coordinator at rawURL: the same trust
// `meshd up` established from its auth key.
func savedPin(dir, rawURL string) (string, error) {
	want, err := controlclient.ParseURL(rawURL)
	if err != nil {
		return "", err
	}
	hint := fmt.Sprintf("pass --fingerprint (printed by `meshd coordinator` at start; the last part of every auth key), or --state-dir of a node registered with %s", want)
	path := filepath.Join(dir, savedLoginFile)
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("the coordinator's key is not known (%v): %s", err, hint)
	}
	var login agent.Login
	if err := json.Unmarshal(b, &login); err != nil {
		return "", fmt.Errorf("%s: %v: %s", path, err, hint)
	}
	got, err := controlclient.ParseURL(login.CoordinatorURL)
	if err != nil || got.String() != want.String() || login.ServerPin == "" {
		return "", fmt.Errorf("the node in %s is registered with %q, not %s: %s", dir, login.CoordinatorURL, want, hint)
	}
	return login.ServerPin, nil
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func printNetcheck(w io.Writer, m *netmap.DERPMap, r *netcheck.Report) {
	fmt.Fprintln(w, "Report:")
	fmt.Fprintf(w, "\tUDP: %s\n", yesNo(r.UDP))
	fmt.Fprintf(w, "\tIPv4: %s\n", endpointDesc(r.IPv4, r.GlobalV4))
	fmt.Fprintf(w, "\tIPv6: %s\n", endpointDesc(r.IPv6, r.GlobalV6))
	switch {
	case r.MappingVariesByDest == nil:
		fmt.Fprintln(w, "\tMappingVariesByDestIP: unknown (fewer than two STUN servers answered over IPv4)")
	case *r.MappingVariesByDest:
		fmt.Fprintln(w, "\tMappingVariesByDestIP: yes (symmetric NAT: direct paths need the peer to be reachable; expect DERP)")
	default:
		fmt.Fprintln(w, "\tMappingVariesByDestIP: no")
	}
	if r.PreferredDERP != 0 {
		fmt.Fprintf(w, "\tNearest DERP: %s\n", regionName(m, r.PreferredDERP))
	} else {
		fmt.Fprintln(w, "\tNearest DERP: none reachable")
	}
	fmt.Fprintln(w, "\tDERP latency:")
	width := 0
	for _, reg := range m.Regions {
		width = max(width, len(fmt.Sprint(reg.ID))+2+len(reg.Code))
	}
	for _, reg := range sortedRegions(m) {
		d, ok := r.RegionLatency[reg.ID]
		lat := "unreachable"
		if ok {
			lat = fmtLatency(d)
			if slices.Contains(r.RegionLatencyTCP, reg.ID) {
				lat += " (TCP)"
			}
		}
		fmt.Fprintf(w, "\t\t- %-*s  %s\n", width, fmt.Sprintf("%d  %s", reg.ID, reg.Code), lat)
	}
}

func endpointDesc(ok bool, ap netip.AddrPort) string {
	if !ok {
		return "no"
	}
	if !ap.IsValid() {
		return "yes"
	}
	return "yes, " + ap.String()
}

func fmtLatency(d time.Duration) string {
	return fmt.Sprintf("%.1fms", float64(d)/float64(time.Millisecond))
}

func regionName(m *netmap.DERPMap, id int) string {
	for _, r := range m.Regions {
		if r.ID == id {
			return fmt.Sprintf("%d (%s)", id, r.Code)
		}
	}
	return fmt.Sprint(id)
}

func sortedRegions(m *netmap.DERPMap) []netmap.DERPRegion {
	regs := slices.Clone(m.Regions)
	slices.SortFunc(regs, func(a, b netmap.DERPRegion) int { return a.ID - b.ID })
	return regs
}

// netcheckJSON is the --json form: latencies in milliseconds and regions
// listed with their codes, unlike the Go report's nanosecond map.
type netcheckJSON struct {
	UDP                 bool           `json:"udp"`
	IPv4                bool           `json:"ipv4"`
	IPv6                bool           `json:"ipv6"`
	GlobalV4            netip.AddrPort `json:"global_v4,omitzero"`
	GlobalV6            netip.AddrPort `json:"global_v6,omitzero"`
	MappingVariesByDest *bool          `json:"mapping_varies_by_dest,omitempty"`
	PreferredDERP       int            `json:"preferred_derp"`
	Regions             []regionJSON   `json:"regions"`
}

type regionJSON struct {
	ID   int    `json:"id"`
	Code string `json:"code"`
	// LatencyMS is absent when the region was unreachable.
	LatencyMS *float64 `json:"latency_ms,omitempty"`
	// Via is "udp" (STUN) or "tcp" (a TCP connect to the DERP port).
	Via string `json:"via,omitempty"`
}

func newNetcheckJSON(m *netmap.DERPMap, r *netcheck.Report) netcheckJSON {
	out := netcheckJSON{
		UDP: r.UDP, IPv4: r.IPv4, IPv6: r.IPv6, GlobalV4: r.GlobalV4, GlobalV6: r.GlobalV6,
		MappingVariesByDest: r.MappingVariesByDest, PreferredDERP: r.PreferredDERP,
		Regions: []regionJSON{},
	}
	for _, reg := range sortedRegions(m) {
		rj := regionJSON{ID: reg.ID, Code: reg.Code}
		if d, ok := r.RegionLatency[reg.ID]; ok {
			ms := float64(d) / float64(time.Millisecond)
			rj.LatencyMS = &ms
			rj.Via = "udp"
			if slices.Contains(r.RegionLatencyTCP, reg.ID) {
				rj.Via = "tcp"
			}
		}
		out.Regions = append(out.Regions, rj)
	}
	return out
}
