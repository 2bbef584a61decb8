package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/time/rate"

	"meshd.dev/meshd/control"
	"meshd.dev/meshd/derp"
	"meshd.dev/meshd/derp/derpmetrics"
	"meshd.dev/meshd/internal/connlimit"
	"meshd.dev/meshd/internal/tlspin"
	"meshd.dev/meshd/nat/stun"
	"meshd.dev/meshd/netmap"
)

func (c *cli) derpCmd() *ffcli.Command {
	fs := flag.NewFlagSet("derp", flag.ContinueOnError)
	listen := fs.String("listen", ":443", "TCP `address` for the relay (TLS, HTTP upgrade on /derp)")
	stunListen := fs.String("stun-listen", ":3478", "UDP `address` for the STUN server; empty disables it")
	stateDir := fs.String("state-dir", "", "`directory` keeping the relay key and TLS certificate, so the fingerprint survives restarts; empty: ephemeral, new fingerprint each start")
	certHosts := fs.String("cert-hosts", "", "comma-separated host names and IPs for the self-signed certificate (default: the --listen host)")
	meshKeyFile := fs.String("mesh-key-file", "", "`file` holding the region's mesh key (64 hex digits); servers sharing it forward to each other")
	meshWith := fs.String("mesh-with", "", "comma-separated `URLs` of the other relays of this region, each https://HOST:PORT#FINGERPRINT")
	clientRate := fs.Float64("client-rate-mbit", 0, "per-client relay rate limit in Mbit/s (0: unlimited)")
	queue := fs.Int("client-queue", derp.DefaultSendQueueDepth, "packets queued per receiving client before new ones are dropped")
	coordinator := fs.String("coordinator", "", "coordinator `URL` (or its replicas', separated by commas: the next is asked when one cannot be reached); when set, only nodes it knows (registered, key not expired) may use the relay")
	coordTokenFile := fs.String("coordinator-token-file", "", "`file` with the coordinator's relay token (its DIR/relay.token); required with --coordinator")
	metricsListen := fs.String("metrics-listen", "", metricsFlagHelp)
	openRelay := fs.Bool("open-relay", false, "serve any node key, without asking a coordinator (labs, tests); without it --coordinator is required")
	conns := registerConnFlags(fs, "derp")
	return &ffcli.Command{
		Name:       "derp",
		ShortUsage: "meshd derp --listen ADDR (--coordinator URL --coordinator-token-file F | --open-relay) [--stun-listen ADDR] [--state-dir DIR] [--mesh-key-file F --mesh-with URL,..]",
		ShortHelp:  "run a DERP relay (and STUN server) for nodes that cannot reach each other directly",
		LongHelp: `Runs a relay that forwards WireGuard packets between nodes addressed by
their public key, over TLS on one TCP port, so it works where only outbound
TCP is open. Clients prove they hold the node key they claim; with
--coordinator they must also be nodes the coordinator knows, which the relay
asks it (authenticated by the coordinator's relay.token, whose fingerprint
pins the coordinator) and caches briefly: 30s for known keys, 5s for
unknown ones, and known keys stay accepted for up to 10 minutes while the
coordinator is unreachable. The check is made when a node connects, and the
relay also holds a stream from the coordinator that names every node key
revoked (node deleted, expired or re-keyed): that node's connection is
closed at once and its reconnect refused. Each time the stream (re)opens the
relay re-checks all of its clients in one batch. It prints its
certificate fingerprint and a DERP map node entry to paste into the
coordinator's --derp-map file.

Without --coordinator the relay would carry traffic for anyone who makes
up a key, so it refuses to start unless --open-relay says that is meant.

Limits: each source IP address (IPv6: each /64) may hold at most
--max-conns-per-ip connections and the relay --max-conns; a connection that
has not completed the relay handshake within 10s of connecting is closed.`,
		FlagSet: fs,
		Options: envOptions,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return &exitError{2, fmt.Sprintf("derp: unexpected arguments %q", args)}
			}
			if *clientRate < 0 || *queue <= 0 {
				return &exitError{2, "derp: --client-rate-mbit must be >= 0 and --client-queue > 0"}
			}
			var meshKey string
			if *meshKeyFile != "" {
				b, err := os.ReadFile(*meshKeyFile)
				if err != nil {
					return &exitError{2, fmt.Sprintf("derp: --mesh-key-file: %v", err)}
				}
				meshKey = strings.TrimSpace(string(b))
				if _, err := derp.ParseMeshKey(meshKey); err != nil {
					return &exitError{2, fmt.Sprintf("derp: %s: %v", *meshKeyFile, err)}
				}
			}
			peers, err := parseMeshWith(*meshWith)
			if err != nil {
				return &exitError{2, "derp: " + err.Error()}
			}
			if len(peers) > 0 && meshKey == "" {
				return &exitError{2, "derp: --mesh-with needs --mesh-key-file (the region's shared mesh key)"}
			}
			lim, err := conns.limits()
			if err != nil {
				return &exitError{2, "derp: " + err.Error()}
			}
			var verifier *control.RelayVerifier
			switch {
			case *coordinator == "" && *coordTokenFile == "" && !*openRelay:
				return &exitError{2, "derp: refusing to run an open relay that carries traffic for any node key: " +
					"pass --coordinator URL --coordinator-token-file FILE (the coordinator's DIR/relay.token) so that only the tailnet's nodes may use it, " +
					"or --open-relay if serving anyone is meant (labs, tests)"}
			case *coordinator != "" && *openRelay:
				return &exitError{2, "derp: --open-relay serves any node key, --coordinator only the tailnet's nodes: drop one of them"}
			case *coordinator != "" && *coordTokenFile == "":
				return &exitError{2, "derp: --coordinator needs --coordinator-token-file (the coordinator's DIR/relay.token)"}
			case *coordinator == "" && *coordTokenFile != "":
				return &exitError{2, "derp: --coordinator-token-file needs --coordinator URL"}
			case *coordinator != "":
				tok, err := os.ReadFile(*coordTokenFile)
				if err != nil {
					return &exitError{2, fmt.Sprintf("derp: --coordinator-token-file: %v", err)}
				}
				verifier, err = control.NewRelayVerifier(*coordinator, string(tok), control.RelayVerifierOptions{Logger: c.log})
				if err != nil {
					return &exitError{2, fmt.Sprintf("derp: %s: %v", *coordTokenFile, err)}
				}
				defer verifier.Close()
			}
			return c.runDERP(ctx, derpConfig{
				verifier: verifier, coordinator: *coordinator,
				listen: *listen, stunListen: *stunListen, stateDir: *stateDir, certHosts: *certHosts,
				meshKey: meshKey, meshWith: peers, clientRate: *clientRate, queue: *queue,
				limits: lim, metricsListen: *metricsListen,
			})
		},
	}
}

type meshPeer struct{ url, fingerprint string }

func parseMeshWith(s string) ([]meshPeer, error) {
	var peers []meshPeer
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		u, fp, _ := strings.Cut(f, "#")
		if !strings.HasPrefix(u, "https://") && !strings.HasPrefix(u, "http://") {
			return nil, fmt.Errorf("--mesh-with %q: want https://HOST:PORT#FINGERPRINT", f)
		}
		peers = append(peers, meshPeer{u, fp})
	}
	return peers, nil
}

type derpConfig struct {
	listen, stunListen, stateDir, certHosts string
	meshKey                                 string
	meshWith                                []meshPeer
	clientRate                              float64
	queue                                   int
	verifier                                *control.RelayVerifier
	coordinator                             string
	// limits bound the relay's connections (zero fields: connlimit
	// defaults). Clients are authenticated by the relay handshake.
	limits connlimit.Limits
	// metricsListen is where /metrics is served; empty: nowhere.
	metricsListen string
}

func (c *cli) runDERP(ctx context.Context, cfg derpConfig) error {
	ln, err := net.Listen("tcp", cfg.listen)
	if err != nil {
		return fmt.Errorf("derp: listen on %s: %w", cfg.listen, err)
	}
	defer ln.Close()
	hosts := splitList(cfg.certHosts)
	if len(hosts) == 0 {
		if h, _, err := net.SplitHostPort(cfg.listen); err == nil && h != "" {
			hosts = []string{h}
		}
	}
	var cert tls.Certificate
	var key netmap.NodePrivate
	if cfg.stateDir != "" {
		if cert, err = derp.LoadOrCreateCert(cfg.stateDir, hosts); err != nil {
			return err
		}
		if key, err = derp.LoadOrCreateServerKey(cfg.stateDir); err != nil {
			return err
		}
	} else {
		c.log.Warn("derp: no --state-dir: the certificate fingerprint changes on every start, so pinned DERP maps must be updated")
		if cert, err = derp.NewSelfSignedCert(hosts); err != nil {
			return err
		}
		key = netmap.NewNodePrivate()
	}
	opts := derp.ServerOptions{PrivateKey: key, MeshKey: cfg.meshKey, SendQueueDepth: cfg.queue, Logger: c.log}
	if cfg.verifier != nil {
		opts.Verify = cfg.verifier.Verify
		c.log.Info("derp: accepting only nodes the coordinator knows", "coordinator", cfg.coordinator)
	} else {
		c.log.Warn("derp: open relay (--open-relay): any node key may use it")
	}
	if cfg.clientRate > 0 {
		opts.ClientRate = rate.Limit(cfg.clientRate * 1e6 / 8)
	}
	srv, err := derp.NewServer(opts)
	if err != nil {
		return err
	}
	defer srv.Close()

	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	reg := prometheus.NewRegistry()
	reg.MustRegister(derpmetrics.New(srv), collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	waitMetrics, err := metricsServer(ctx, cfg.metricsListen, promhttp.HandlerFor(reg, promhttp.HandlerOpts{Timeout: 10 * time.Second}), c.log)
	if err != nil {
		return fmt.Errorf("derp: %w", err)
	}
	defer waitMetrics()

	stunPort := -1
	if cfg.stunListen != "" {
		st, err := stun.Listen(cfg.stunListen, c.log)
		if err != nil {
			return fmt.Errorf("derp: %w", err)
		}
		stunPort = int(st.AddrPort().Port())
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := st.Serve(ctx); err != nil {
				c.log.Error("derp: STUN server stopped", "err", err)
			}
		}()
	}
	if cfg.verifier != nil {
		wg.Add(1)
		go func() { defer wg.Done(); cfg.verifier.Watch(ctx, srv) }()
	}
	for _, p := range cfg.meshWith {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := srv.RunMeshPeer(ctx, p.url, p.fingerprint); err != nil {
				c.log.Error("derp: mesh peer disabled", "peer", p.url, "err", err)
			}
		}()
	}

	mux := http.NewServeMux()
	mux.Handle("/derp", srv)
	mux.HandleFunc("/derp/probe", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) })
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "meshd DERP relay; clients connect to /derp")
	})
	lim := cfg.limits
	lim.Name, lim.Logger = "relay", c.log
	hs := lim.Server(mux)
	// TLS handshake noise from scanners belongs at debug level.
	hs.ErrorLog = slog.NewLogLogger(c.log.Handler(), slog.LevelDebug)
	hs.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"http/1.1"}, MinVersion: tls.VersionTLS12}
	fp := tlspin.Fingerprint(cert.Leaf)
	addr := ln.Addr().(*net.TCPAddr)
	node := netmap.DERPNode{Name: "1a", Host: printableHost(cfg.listen, addr), DERPPort: addr.Port, STUNPort: stunPort, CertFingerprint: fp}
	nodeJSON, _ := json.Marshal(node)
	fmt.Fprintf(c.stdout, "derp listening on https://%s\nfingerprint: %s\nserver key: %s\nderp map node: %s\n", addr, fp, srv.PublicKey(), nodeJSON)

	errc := make(chan error, 1)
	go func() { errc <- hs.ServeTLS(lim.Listener(ln), "", "") }()
	select {
	case <-ctx.Done():
		c.log.Info("derp shutting down")
		sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
		hs.Shutdown(sctx)
		scancel()
		srv.Close()
		<-errc
		return nil
	case err := <-errc:
		if errors.Is(err, http.ErrServerClosed) {
			err = nil
		}
		return fmt.Errorf("derp: stopped serving: %w", err)
	}
}

// printableHost is the host to advertise in the printed DERP map entry: the
// --listen host, or the bound address when listening on all interfaces.
func printableHost(listen string, addr *net.TCPAddr) string {
	h, _, err := net.SplitHostPort(listen)
	if err == nil && h != "" {
		if ip := net.ParseIP(h); ip == nil || !ip.IsUnspecified() {
			return h
		}
	}
	if addr.IP.IsUnspecified() {
		return "HOST"
	}
	return addr.IP.String()
}
