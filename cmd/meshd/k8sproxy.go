package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"

	"meshd.dev/meshd/agent"
	"meshd.dev/meshd/agent/k8sproxy"
	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/agent/whois"
)

// defaultServiceAccountDir is where Kubernetes mounts a pod's service
// account token and the cluster CA.
const defaultServiceAccountDir = "/var/run/secrets/kubernetes.io/serviceaccount"

// k8sProxyFlags are `meshd k8s-proxy`'s own flags.
type k8sProxyFlags struct {
	mode      string
	upstream  string
	caFile    string
	tokenFile string
	saDir     string
	port      uint
}

func (c *cli) k8sProxyCmd() *ffcli.Command {
	fs := flag.NewFlagSet("k8s-proxy", flag.ContinueOnError)
	var af agentFlags
	af.register(fs)
	socket := fs.String("socket", localapi.DefaultSocket, "local API unix socket")
	var kf k8sProxyFlags
	var req localapi.UpRequest
	fs.StringVar(&req.AuthKey, "authkey", "", "auth key: join the tailnet in this process, as `meshd up --foreground --authkey` (MESHD_AUTHKEY from the environment is used only while the node must enrol); without it or --coordinator, run `meshd up` against --socket")
	fs.StringVar(&req.Coordinator, "coordinator", "", "coordinator URL, with --authkey")
	fs.StringVar(&req.Hostname, "hostname", "", "node name when it enrols (default: the system hostname)")
	fs.StringVar(&kf.mode, "mode", "auth", "auth: authenticate with the proxy's credentials and impersonate callers per the policy's kubernetes grants; noauth: pass callers' own credentials through")
	fs.StringVar(&kf.upstream, "upstream", "", "the API server's URL; default: the in-cluster one (KUBERNETES_SERVICE_HOST, KUBERNETES_SERVICE_PORT)")
	fs.StringVar(&kf.caFile, "upstream-ca-file", "", "PEM CA of the API server; default: the service account's ca.crt in cluster, else the system roots")
	fs.StringVar(&kf.tokenFile, "upstream-token-file", "", "auth mode: bearer token for the API server, re-read per request; default: the service account's token in cluster")
	fs.StringVar(&kf.saDir, "serviceaccount-dir", defaultServiceAccountDir, "where the pod's service account token and ca.crt are mounted")
	fs.UintVar(&kf.port, "listen-port", 443, "tailnet port of the proxy (HTTPS with the node's certificate from the tailnet CA)")
	return &ffcli.Command{
		Name:       "k8s-proxy",
		ShortUsage: "meshd k8s-proxy [--mode auth|noauth] [--upstream URL] [--listen-port 443] [--authkey KEY --coordinator URL [--hostname H]] [daemon flags]",
		ShortHelp:  "run the node agent with a Kubernetes API server proxy on the tailnet (then `meshd up`)",
		LongHelp: "k8s-proxy runs the whole node agent, like `meshd daemon`, and serves a proxy to the Kubernetes API server on the node's\n" +
			"tailnet addresses over HTTPS. In auth mode callers are impersonated as their login (tagged nodes: their name) in the\n" +
			"groups of their tailscale.com/cap/kubernetes or meshd.dev/cap/kubernetes grants; callers without one get 403.\n" +
			"See docs/k8s-proxy.md.",
		FlagSet: fs,
		Options: envOptions,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return &exitError{2, fmt.Sprintf("k8s-proxy: unexpected arguments %q", args)}
			}
			svc, err := kf.service(os.Getenv, c)
			if err != nil {
				return &exitError{2, err.Error()}
			}
			af.services = []agent.HTTPSService{svc}
			if req.Hostname != "" && req.AuthKey == "" && req.Coordinator == "" {
				return &exitError{2, "k8s-proxy: --hostname names the node when it enrols here: give --authkey and --coordinator too (or use meshd up --hostname)"}
			}
			if req.AuthKey != "" || req.Coordinator != "" {
				// Enrol (or, registered, just come up) in this process, as
				// `meshd up --foreground` does: one container, no second
				// command to run in it.
				onCommandLine := map[string]bool{}
				fs.Visit(func(f *flag.Flag) { onCommandLine[f.Name] = true })
				req.AuthKeyFromEnv = req.AuthKey != "" && !onCommandLine["authkey"]
				c.log.Info("meshd k8s-proxy started", "mode", kf.mode, "port", kf.port, "state_dir", af.stateDir, "tun", af.tun, "socket", *socket)
				return c.upForeground(ctx, &af, *socket, fs, req, 0)
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
			c.log.Info("meshd k8s-proxy started", "mode", kf.mode, "port", kf.port, "state_dir", af.stateDir, "tun", af.tun, "socket", *socket)
			return runAgent(ctx, a, ln, c.log, af.metricsListen)
		},
	}
}

// service checks the flags and builds the proxy service; getenv is
// os.Getenv (the in-cluster API server's address).
func (kf *k8sProxyFlags) service(getenv func(string) string, c *cli) (agent.HTTPSService, error) {
	mode, err := k8sproxy.ParseMode(kf.mode)
	if err != nil {
		return agent.HTTPSService{}, fmt.Errorf("k8s-proxy: --%w", err)
	}
	if kf.port == 0 || kf.port > 65535 {
		return agent.HTTPSService{}, fmt.Errorf("k8s-proxy: --listen-port %d: want 1-65535", kf.port)
	}
	raw, caFile, tokenFile := kf.upstream, kf.caFile, kf.tokenFile
	if raw == "" {
		host, port := getenv("KUBERNETES_SERVICE_HOST"), getenv("KUBERNETES_SERVICE_PORT")
		if host == "" || port == "" {
			return agent.HTTPSService{}, errors.New("k8s-proxy: no --upstream, and not in a cluster (KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT unset)")
		}
		raw = "https://" + net.JoinHostPort(host, port)
		if caFile == "" {
			caFile = filepath.Join(kf.saDir, "ca.crt")
		}
		if tokenFile == "" && mode == k8sproxy.ModeAuth {
			tokenFile = filepath.Join(kf.saDir, "token")
		}
	}
	u, err := url.Parse(raw)
	if err != nil || u.Scheme != "https" || u.Host == "" || u.User != nil || u.RawQuery != "" || (u.Path != "" && u.Path != "/") {
		return agent.HTTPSService{}, fmt.Errorf("k8s-proxy: --upstream %q: want https://HOST[:PORT]", raw)
	}
	u.Path = ""
	switch {
	case mode == k8sproxy.ModeNoAuth && kf.tokenFile != "":
		return agent.HTTPSService{}, errors.New("k8s-proxy: --upstream-token-file is for auth mode: in noauth mode callers bring their own credentials")
	case mode == k8sproxy.ModeAuth && tokenFile == "":
		return agent.HTTPSService{}, errors.New("k8s-proxy: auth mode needs the proxy's own credentials: --upstream-token-file (in cluster: the service account's token)")
	}
	if tokenFile != "" {
		if b, err := os.ReadFile(tokenFile); err != nil || len(b) == 0 {
			return agent.HTTPSService{}, fmt.Errorf("k8s-proxy: upstream token %s: unreadable or empty (%v)", tokenFile, err)
		}
	}
	tlsConf := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return agent.HTTPSService{}, fmt.Errorf("k8s-proxy: upstream CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return agent.HTTPSService{}, fmt.Errorf("k8s-proxy: upstream CA %s: no PEM certificate", caFile)
		}
		tlsConf.RootCAs = pool
	}
	// HTTP/1.1 only (a TLSClientConfig without ForceAttemptHTTP2):
	// exec, attach and port-forward upgrade the connection, which HTTP/2
	// cannot. The daemon's HTTP_PROXY environment is not used: the API
	// server is reached directly.
	tr := &http.Transport{
		TLSClientConfig:       tlsConf,
		DialContext:           (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConnsPerHost:   32,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: time.Second,
	}
	return agent.HTTPSService{
		Name: "meshd k8s-proxy",
		Port: uint16(kf.port),
		NewHandler: func(whoIs func(netip.Addr) (*whois.Response, bool)) http.Handler {
			p, err := k8sproxy.New(k8sproxy.Options{Mode: mode, Upstream: u, Transport: tr, TokenFile: tokenFile, WhoIs: whoIs, Logger: c.log})
			if err != nil { // checked above: cannot happen
				return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
					http.Error(w, "k8s-proxy: "+err.Error(), http.StatusInternalServerError)
				})
			}
			return p
		},
	}, nil
}
