package main

import (
	"context"
	"crypto/sha256"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"

	"meshd.dev/meshd/control"
	"meshd.dev/meshd/netmap"
	"meshd.dev/meshd/policy"
)

func (c *cli) coordinatorCmd() *ffcli.Command {
	fs := flag.NewFlagSet("coordinator", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:8443", "TCP `address` to serve the control API on (TLS with a pinned self-signed key)")
	metricsListen := fs.String("metrics-listen", "", metricsFlagHelp)
	stateDir := fs.String("state-dir", "", "`directory` for the coordinator key, admin.token and the SQLite database (required)")
	db := fs.String("db", "", "database `URL`: empty for SQLite in --state-dir, sqlite:PATH, or postgres://USER@HOST/DB for several coordinator replicas sharing one PostgreSQL database (docs/ha.md)")
	ephemeral := fs.Duration("ephemeral-timeout", 5*time.Minute, "delete ephemeral nodes this long after their last map stream closes")
	keyExpiry := fs.Duration("node-key-expiry", 180*24*time.Hour, "how long a user's node key is valid after it registers (tagged nodes never expire)")
	approval := fs.Bool("require-approval", false, "nodes enrolled with keys that are not --preauthorized wait for `meshd admin nodes approve`")
	policyFile := fs.String("policy", "", "tailnet policy `file` (huJSON) to load at start; it must validate, and it replaces (and is stored over) the policy last set with meshd admin policy set")
	policyStrict := fs.Bool("policy-strict", false, "refuse to start when the policy in force (--policy FILE, else the stored one) has warnings: constructs meshd accepts but does not enforce, settings it ignores, wide or shadowed rules (as `meshd policy check --strict`)")
	initState := fs.Bool("init-state", false, "start over with an empty database when the existing one is missing, empty, not meshd's or another coordinator's (it is moved aside, never deleted); every node must enrol again and a new admin token is issued. Refused when the database is intact")
	newCA := fs.Bool("new-ca", false, "replace the tailnet CA (DIR/ca.key, DIR/ca.crt; moved aside, never deleted) with a new one, as when it is lost or --dns-suffix changes: every host that trusted the old CA must then trust the new one (meshd cert --install-ca)")
	dnsSuffix := fs.String("dns-suffix", netmap.DefaultDNSSuffix, "MagicDNS `domain`: every node is HOSTNAME.DOMAIN (the tailnet CA is constrained to it: changing it needs --new-ca)")
	dnsSearch := fs.String("dns-search", "", "comma-separated search `domains` nodes configure (default: the --dns-suffix)")
	var dnsRoutes dnsRouteFlag
	fs.Var(&dnsRoutes, "dns-route", "split DNS: `DOMAIN=IP[:PORT][,IP[:PORT]...]` sends queries for names under DOMAIN to those resolvers (repeatable)")
	derpFlags := registerCoordDERPFlags(fs)
	conns := registerConnFlags(fs, "coordinator")
	return &ffcli.Command{
		Name:       "coordinator",
		ShortUsage: "meshd coordinator --listen ADDR --state-dir DIR [--db URL] [--policy FILE] [--init-state] [--new-ca] [--derp-map FILE | --derp-host H --derp-listen ADDR --stun-listen ADDR]",
		ShortHelp:  "run the coordinator: node registry, auth keys and network maps",
		LongHelp: `Runs the coordinator. On first start it creates its key and an admin token
(DIR/admin.token, mode 0600) that ` + "`meshd admin`" + ` uses. Auth keys carry the
coordinator's fingerprint, so nodes verify it with nothing else given.

State: once DIR/coordinator.key exists, a database that is missing, empty
(0 bytes), not a meshd database or made for another coordinator key stops the
start with what to do: restore it from a backup, or start once with
--init-state to move it aside and begin an empty tailnet under the same key.
The coordinator never silently starts over (that would issue a new admin
token and the allow-all bootstrap policy). A node or auth key row that fails
to decode is logged and moved to the database's quarantine table; the rest
loads.

TLS: on first start the coordinator also creates the tailnet CA (DIR/ca.key,
DIR/ca.crt, ECDSA P-256, valid 10 years), whose certificate is constrained
(critical X.509 name constraints) to --dns-suffix and the tailnet's address
ranges. Nodes learn it from their map and get 14-day certificates for their
own DNS name from it (meshd cert). A CA the database records that is
missing, damaged, replaced or made for another --dns-suffix stops the start;
--new-ca makes a new one (every host must then trust it again).

Policy: with --policy FILE the coordinator loads FILE (refusing to start if it
does not validate), stores it and puts it in force, replacing whatever was set
before with ` + "`meshd admin policy set`" + `. Without --policy it uses the policy
last set (stored in its database), or, if none ever was, the bootstrap
default: every node may reach every node.

Relays: with --derp-map FILE (huJSON, {"regions": [{"id": 1, "code": "lab",
"nodes": [{"name": "1a", "host": "198.18.1.2", "derp_port": 443,
"stun_port": 3478, "cert_fingerprint": "..."}]}]}) nodes get that map.
Without it the coordinator is its own relay: DERP on /derp of its listener
(or --derp-listen), STUN on the same port over UDP (or --stun-listen), and a
one-region map pointing at --derp-host (default: the --listen host), pinned
by the coordinator's fingerprint. Only registered, unexpired nodes may use
it, and a node deleted, expired or re-keyed is disconnected at once.
Standalone relays (meshd derp --coordinator URL) check nodes with the
token in DIR/relay.token and are told of revocations the same way. The map
is also served, unauthenticated, at /derpmap/default for meshd netcheck
--coordinator.

Limits: each source IP address (IPv6: each /64) may hold at most
--max-conns-per-ip connections and the listener --max-conns; a connection
that has not authenticated (registered machine key, auth key, admin or relay
token, DERP handshake) within 10s is closed, and every request body must
arrive within 30s. A node holds at most 4 map streams; a newer one replaces
the oldest.`,
		FlagSet: fs,
		Options: envOptions,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return &exitError{2, fmt.Sprintf("coordinator: unexpected arguments %q", args)}
			}
			if *stateDir == "" {
				return &exitError{2, "coordinator: --state-dir is required (or MESHD_STATE_DIR)"}
			}
			lim, err := conns.limits()
			if err != nil {
				return &exitError{2, "coordinator: " + err.Error()}
			}
			opts := control.ServerOptions{
				StateDir: *stateDir, DBURL: *db, Logger: c.log,
				EphemeralTimeout: *ephemeral, NodeKeyExpiry: *keyExpiry, RequireApproval: *approval,
				Limits:    lim,
				InitState: *initState,
				NewCA:     *newCA,
				DNS:       netmap.DNSConfig{Suffix: strings.TrimSuffix(*dnsSuffix, "."), Routes: dnsRoutes.routes},
			}
			if *dnsSearch != "" {
				for d := range strings.SplitSeq(*dnsSearch, ",") {
					opts.DNS.SearchDomains = append(opts.DNS.SearchDomains, strings.TrimSuffix(strings.TrimSpace(d), "."))
				}
			}
			if err := opts.DNS.Validate(); err != nil {
				return &exitError{2, "coordinator: " + err.Error()}
			}
			if *policyFile != "" {
				data, err := readPolicyFile(*policyFile)
				if err != nil {
					return &exitError{1, fmt.Sprintf("coordinator: --policy: %v", err)}
				}
				opts.Policy, opts.PolicyFile = data, *policyFile
				if *policyStrict {
					// Checked before the server stores the file: a refused
					// policy must not become the stored one.
					if p, err := policy.Parse(*policyFile, data); err == nil {
						var warns []string
						for _, w := range p.Lint() {
							warns = append(warns, w.String())
						}
						if err := c.strictPolicy(warns); err != nil {
							return err
						}
					}
				}
			}
			derpMap, err := derpFlags.loadMap()
			if err != nil {
				return &exitError{2, fmt.Sprintf("coordinator: --derp-map: %v", err)}
			}
			opts.DERPMap = derpMap
			s, err := control.NewServer(ctx, opts)
			var perr *control.PolicyError
			if errors.As(err, &perr) {
				for _, p := range perr.Problems {
					fmt.Fprintln(c.stderr, p)
				}
				// The problems are printed above; the message says whose.
				msg := strings.TrimSuffix(strings.TrimSuffix(err.Error(), perr.Error()), ": ")
				return &exitError{1, msg + ": policy rejected, not starting"}
			}
			var serr *control.StateError
			if errors.As(err, &serr) {
				return &exitError{1, serr.Msg}
			}
			if err != nil {
				return err
			}
			if p := s.CurrentPolicy(); *policyStrict && len(p.Warnings) > 0 {
				s.Close()
				return c.strictPolicy(p.Warnings)
			}
			ln, err := net.Listen("tcp", *listen)
			if err != nil {
				s.Close()
				return fmt.Errorf("coordinator: listen on %s: %w", *listen, err)
			}
			tokPath := s.AdminTokenPath()
			if _, err := os.Stat(tokPath); err != nil {
				tokPath = "in the state dir of the replica that initialised the database (this replica holds no copy)"
			}
			fmt.Fprintf(c.stdout, "coordinator listening on https://%s\nfingerprint: %s\nadmin token: %s\n",
				ln.Addr(), s.Fingerprint(), tokPath)
			if p := s.CurrentPolicy(); p.Bootstrap {
				fmt.Fprintln(c.stdout, "policy: none loaded, bootstrap default in force (every node may reach every node)")
			} else {
				fmt.Fprintf(c.stdout, "policy: %s (%d rules, %d tests, set %s)\n", p.File, p.Rules, p.Tests, fmtTime(p.Updated))
				for _, w := range p.Warnings {
					fmt.Fprintln(c.stderr, w)
				}
			}
			fmt.Fprintf(c.stdout, "tailnet CA: %s (sha256 %x)\n", s.TLSCAPath(), sha256.Sum256(s.TLSCA().Raw))
			stopRelays, err := c.startCoordDERP(ctx, s, *listen, ln, derpFlags, *stateDir)
			if err != nil {
				ln.Close()
				s.Close()
				return &exitError{1, "coordinator: " + err.Error()}
			}
			defer stopRelays()
			waitMetrics, err := metricsServer(ctx, *metricsListen, s.MetricsHandler(), c.log)
			if err != nil {
				ln.Close()
				s.Close()
				return &exitError{1, "coordinator: " + err.Error()}
			}
			defer waitMetrics()
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

// strictPolicy prints a policy's warnings and refuses to start on any
// (--policy-strict).
func (c *cli) strictPolicy(warns []string) error {
	if len(warns) == 0 {
		return nil
	}
	for _, w := range warns {
		fmt.Fprintln(c.stderr, w)
	}
	return &exitError{1, fmt.Sprintf("coordinator: %d policy warning(s) and --policy-strict is set: not starting", len(warns))}
}

// readPolicyFile reads a policy file, refusing one over the policy size
// limit before reading it whole.
func readPolicyFile(file string) ([]byte, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, policy.MaxSize+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", file, err)
	}
	if len(data) > policy.MaxSize {
		return nil, fmt.Errorf("%s: policy is larger than the %d byte (4 MiB) limit", file, policy.MaxSize)
	}
	return data, nil
}

// dnsRouteFlag collects --dns-route DOMAIN=IP[:PORT],... values.
type dnsRouteFlag struct{ routes map[string][]netip.AddrPort }

func (f *dnsRouteFlag) String() string { return "" }

func (f *dnsRouteFlag) Set(v string) error {
	domain, list, ok := strings.Cut(v, "=")
	if !ok || list == "" {
		return fmt.Errorf("%q: want DOMAIN=IP[:PORT][,IP[:PORT]...]", v)
	}
	domain = strings.TrimSuffix(strings.ToLower(strings.TrimSpace(domain)), ".")
	if err := netmap.CheckDomain(domain); err != nil {
		return err
	}
	if _, dup := f.routes[domain]; dup {
		return fmt.Errorf("%q: route for %s given twice; list all its resolvers in one flag", v, domain)
	}
	var rs []netip.AddrPort
	for r := range strings.SplitSeq(list, ",") {
		r = strings.TrimSpace(r)
		if ap, err := netip.ParseAddrPort(r); err == nil {
			rs = append(rs, ap)
			continue
		}
		a, err := netip.ParseAddr(strings.Trim(r, "[]"))
		if err != nil {
			return fmt.Errorf("%q: resolver %q is not an IP or IP:PORT", v, r)
		}
		rs = append(rs, netip.AddrPortFrom(a, 53))
	}
	if f.routes == nil {
		f.routes = make(map[string][]netip.AddrPort)
	}
	f.routes[domain] = rs
	return nil
}
