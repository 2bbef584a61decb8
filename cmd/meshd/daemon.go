package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"

	"meshd.dev/meshd/agent"
	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/internal/logring"
)

// agentFlags are the flags shared by `meshd daemon` and `meshd up
// --foreground`, which both run the whole agent.
type agentFlags struct {
	stateDir  string
	tun       string
	port      portFlag
	mtu       int
	socks5    string
	httpProxy string
	forwards  forwardList
	loopback  bool
	peerIdle  time.Duration
	resolv    string
	flowLog   flowLogFlags
	// metricsListen is --metrics-listen; metricsTailnet --metrics-tailnet-port.
	metricsListen  string
	metricsTailnet uint
	// services are the daemon's own HTTPS services (meshd k8s-proxy); not
	// a flag.
	services []agent.HTTPSService
	// recorderDir runs the SSH session recorder (meshd recorder --dir).
	recorderDir string
}

// forwardList collects repeatable --forward flags.
type forwardList []agent.Forward

func (f *forwardList) String() string {
	var s []string
	for _, x := range *f {
		s = append(s, x.String())
	}
	return strings.Join(s, ",")
}

func (f *forwardList) Set(v string) error {
	fs, err := agent.ParseForwards(v)
	if err != nil {
		return err
	}
	*f = append(*f, fs...)
	return nil
}

// portFlag is --port. A port given explicitly (flag or MESHD_PORT) is kept
// apart from the default, which falls back to a random port when taken.
type portFlag struct {
	n   int
	set bool
}

func (p *portFlag) String() string {
	if p == nil || !p.set {
		return strconv.Itoa(agent.DefaultPort)
	}
	return strconv.Itoa(p.n)
}

func (p *portFlag) Set(s string) error {
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 || n > 65535 {
		return fmt.Errorf("want a UDP port 0-65535 (0: random), got %q", s)
	}
	p.n, p.set = n, true
	return nil
}

// option is the agent.Options.Port the flag asks for.
func (p *portFlag) option() int {
	if !p.set {
		return agent.AutoPort
	}
	return p.n
}

// defaultTUN is a kernel TUN where we can create one, else the netstack.
func defaultTUN() string {
	if runtime.GOOS == "linux" && os.Geteuid() == 0 {
		return "meshd0"
	}
	return agent.TUNUserspace
}

// isAgentFlag reports whether register defines the flag name.
func isAgentFlag(name string) bool {
	fs := flag.NewFlagSet("", flag.ContinueOnError)
	new(agentFlags).register(fs)
	return fs.Lookup(name) != nil
}

func (af *agentFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&af.stateDir, "state-dir", "/var/lib/meshd", "directory for keys, registration and the last network map")
	fs.StringVar(&af.tun, "tun", defaultTUN(), `kernel TUN interface name, or "userspace" for the netstack (no root needed)`)
	fs.Var(&af.port, "port", fmt.Sprintf("WireGuard UDP `port`; 0: a random one; by default %d, or a random one (logged) when another process holds it. A port given here that is taken is an error", agent.DefaultPort))
	fs.IntVar(&af.mtu, "mtu", 0, "tunnel MTU; 0: the smallest underlay interface MTU minus 80 for WireGuard (1420 on 1500, 8920 on 9000), 1280 if none is found")
	fs.StringVar(&af.socks5, "socks5-server", "", "serve a SOCKS5 proxy into the tailnet on this address (e.g. 127.0.0.1:1055)")
	fs.StringVar(&af.httpProxy, "http-proxy", "", "serve an HTTP CONNECT proxy into the tailnet on this address")
	fs.BoolVar(&af.loopback, "loopback-only", false, "report only loopback UDP endpoints (every node on this machine: tests, demos)")
	fs.DurationVar(&af.peerIdle, "peer-idle-timeout", agent.DefaultPeerIdleTimeout, "configure a peer in WireGuard on its first packet and remove it after this long without data (0: configure every peer up front)")
	fs.StringVar(&af.resolv, "resolv-conf", "", "kernel TUN mode: manage this resolver file for MagicDNS instead of systemd-resolved or /etc/resolv.conf "+
		"(an operations and test hook for network namespaces and containers, e.g. /etc/netns/NAME/resolv.conf; the original is restored on down and exit)")
	fs.StringVar(&af.metricsListen, "metrics-listen", "", metricsFlagHelp)
	fs.UintVar(&af.metricsTailnet, "metrics-tailnet-port", 0, "also serve metrics (totals only, no per-peer series) on this TCP port of the node's tailnet addresses, to the peers the policy lets reach it; 0: off. http://100.100.100.100/metrics serves this host's programs either way")
	fs.Var(&af.forwards, "forward", "forward inbound tailnet TCP PORT to LOCALADDR (PORT=LOCALADDR, repeatable or comma-separated)")
	af.flowLog.register(fs)
}

func (c *cli) newAgent(af *agentFlags) (*agent.Agent, error) {
	opts, err := c.agentOptions(af)
	if err != nil {
		return nil, err
	}
	return agent.New(opts)
}

// agentOptions are the agent's options from the shared flags.
func (c *cli) agentOptions(af *agentFlags) (agent.Options, error) {
	if af.peerIdle < 0 {
		return agent.Options{}, fmt.Errorf("--peer-idle-timeout %v: want a duration >= 0 (0 configures every peer up front)", af.peerIdle)
	}
	if af.metricsTailnet > 65535 {
		return agent.Options{}, fmt.Errorf("--metrics-tailnet-port %d: want a TCP port 1-65535 (0: off)", af.metricsTailnet)
	}
	if af.resolv != "" && !filepath.IsAbs(af.resolv) {
		return agent.Options{}, fmt.Errorf("--resolv-conf %q: want an absolute path", af.resolv)
	}
	opts := agent.Options{
		StateDir: af.stateDir, TUN: af.tun, Port: af.port.option(), MTU: af.mtu,
		Forwards: af.forwards, SOCKS5Addr: af.socks5, HTTPProxyAddr: af.httpProxy, LoopbackOnly: af.loopback,
		PeerIdleTimeout: peerIdleOption(af.peerIdle), ResolvConf: af.resolv, Logger: c.log, HTTPSServices: af.services,
		SFTPCommand: sftpCommand(), RecorderDir: af.recorderDir, MetricsTailnetPort: uint16(af.metricsTailnet),
	}
	// The daemon keeps its recent log lines for `meshd bugreport`.
	opts.LogRing = logring.New(0, 0)
	opts.Logger = slog.New(logring.Handler(c.log.Handler(), opts.LogRing, slog.LevelInfo))
	if err := af.flowLog.apply(&opts, c.stdout); err != nil {
		return agent.Options{}, err
	}
	return opts, nil
}

// peerIdleOption maps the flag (0 = eager) to agent.Options (negative =
// eager, 0 = default).
func peerIdleOption(d time.Duration) time.Duration {
	if d == 0 {
		return -1
	}
	return d
}

func (c *cli) daemonCmd() *ffcli.Command {
	fs := flag.NewFlagSet("daemon", flag.ContinueOnError)
	var af agentFlags
	af.register(fs)
	socket := fs.String("socket", localapi.DefaultSocket, "local API unix socket")
	return &ffcli.Command{
		Name:       "daemon",
		ShortUsage: "meshd daemon --state-dir DIR [--tun NAME|userspace] [--socket PATH] [--port N]",
		ShortHelp:  "run the node agent (then use `meshd up` to join a tailnet)",
		FlagSet:    fs,
		Options:    envOptions,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return fmt.Errorf("daemon: unexpected arguments %q", args)
			}
			a, err := c.newAgent(&af)
			if err != nil {
				return err
			}
			defer a.Close()
			ln, err := localapi.Listen(*socket)
			if err != nil {
				return err
			}
			c.log.Info("meshd daemon started", "state_dir", af.stateDir, "tun", af.tun, "socket", *socket)
			return runAgent(ctx, a, ln, c.log, af.metricsListen)
		},
	}
}

// runAgent runs a and, if ln is not nil, the local API on ln (refused
// connections logged to log), until ctx ends or the agent fails.
func runAgent(ctx context.Context, a *agent.Agent, ln net.Listener, log *slog.Logger, metricsAddr string) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	waitMetrics, err := metricsServer(ctx, metricsAddr, a.MetricsHandler(), log)
	if err != nil {
		if ln != nil {
			ln.Close()
		}
		return err
	}
	defer waitMetrics()
	apiDone := make(chan error, 1)
	if ln != nil {
		lim := localapi.DefaultLimits()
		lim.Logger = log
		go func() { apiDone <- localapi.ServeLimits(ctx, ln, a, lim) }()
	} else {
		apiDone <- nil
	}
	err = a.Run(ctx)
	cancel()
	if aerr := <-apiDone; aerr != nil && err == nil {
		err = fmt.Errorf("local api: %w", aerr)
	}
	return err
}
