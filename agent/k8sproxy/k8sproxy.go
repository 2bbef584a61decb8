// Package k8sproxy is the Kubernetes API server proxy (`meshd k8s-proxy`):
// an HTTP handler, served on the node's tailnet addresses over HTTPS, that
// forwards tailnet callers' requests to an API server.
//
// In auth mode the proxy authenticates to the API server with its own
// credentials and impersonates the caller: Impersonate-User is the
// caller's login (the node's name for a tagged node, which acts for no
// user) and Impersonate-Group the union of the impersonate.groups of the
// caller's Kubernetes capabilities (kubecap) plus, for tagged callers,
// their tags. Whatever the caller sends in Authorization or Impersonate-*
// headers is removed first. A caller without the capability gets 403.
//
// In noauth mode the caller's own credentials pass through unchanged: the
// tailnet only gives reach, and the API server authenticates the caller.
package k8sproxy

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"net/url"
	"os"
	"strings"
	"time"

	"golang.org/x/time/rate"

	"meshd.dev/meshd/agent/whois"
	"meshd.dev/meshd/kubecap"
)

// Mode is how the proxy authenticates to the API server.
type Mode string

// The modes.
const (
	// ModeAuth: the proxy's own credentials, impersonating the caller.
	ModeAuth Mode = "auth"
	// ModeNoAuth: the caller's own credentials, passed through.
	ModeNoAuth Mode = "noauth"
)

// ParseMode parses --mode.
func ParseMode(s string) (Mode, error) {
	switch m := Mode(s); m {
	case ModeAuth, ModeNoAuth:
		return m, nil
	}
	return "", fmt.Errorf("mode %q: want auth or noauth", s)
}

// Options configure a Proxy.
type Options struct {
	Mode Mode
	// Upstream is the API server's base URL (https://HOST:PORT).
	Upstream *url.URL
	// Transport reaches Upstream (its TLS configuration trusts the API
	// server's CA). It must not use HTTP/2: upgrades (exec, attach,
	// port-forward) need HTTP/1.1.
	Transport http.RoundTripper
	// TokenFile holds the bearer token the proxy presents in auth mode;
	// it is read for every request, so a rotated service account token
	// is used as soon as the kubelet writes it. Empty: no token (the
	// Transport authenticates, with a client certificate).
	TokenFile string
	// WhoIs says who holds a tailnet address (agent.Agent.WhoIs).
	WhoIs func(netip.Addr) (*whois.Response, bool)
	// Logger receives the audit log: one line per request.
	Logger *slog.Logger
}

// Proxy is the handler. It is safe for concurrent use.
type Proxy struct {
	opts Options
	rp   *httputil.ReverseProxy
}

// New returns a proxy for opts.
func New(opts Options) (*Proxy, error) {
	if _, err := ParseMode(string(opts.Mode)); err != nil {
		return nil, err
	}
	if opts.Upstream == nil || opts.Upstream.Host == "" || (opts.Upstream.Scheme != "https" && opts.Upstream.Scheme != "http") {
		return nil, fmt.Errorf("k8s-proxy: upstream %v: want https://HOST[:PORT]", opts.Upstream)
	}
	if opts.WhoIs == nil || opts.Transport == nil {
		return nil, fmt.Errorf("k8s-proxy: WhoIs and Transport are required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	p := &Proxy{opts: opts}
	failures := rate.Sometimes{Interval: 10 * time.Second}
	p.rp = &httputil.ReverseProxy{
		Transport: opts.Transport,
		// Watches and log streams are written to the caller as they come.
		FlushInterval: -1,
		// Rewrite, not Director: hop-by-hop headers, and any header a
		// Connection header names, are gone before it runs, so a caller
		// cannot make the proxy drop what Rewrite sets.
		Rewrite: p.rewrite,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			if r.Context().Err() == nil {
				failures.Do(func() {
					opts.Logger.Warn("k8s-proxy: the API server did not answer (logged at most every 10s)", "upstream", opts.Upstream.String(), "err", err)
				})
			}
			http.Error(w, "502 bad gateway: meshd k8s-proxy could not reach the Kubernetes API server", http.StatusBadGateway)
		},
	}
	return p, nil
}

// identity is what the proxy decided for a request, carried from
// ServeHTTP to rewrite.
type identity struct {
	user   string
	groups []string
	token  string
}

type identityKey struct{}

func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	log := p.opts.Logger
	who, ip, err := whois.Peer(p.opts.WhoIs, r.RemoteAddr)
	if err != nil {
		log.Info("k8s-proxy: denied", "caller_addr", ip, "method", r.Method, "path", r.URL.Path, "reason", err)
		http.Error(w, fmt.Sprintf("403 forbidden: meshd k8s-proxy answers tailnet peers only, and %v is none", ip), http.StatusForbidden)
		return
	}
	node := who.Node.Name()
	if p.opts.Mode == ModeNoAuth {
		log.Info("k8s-proxy: request", "mode", "noauth", "caller_node", node, "caller_user", who.User, "caller_addr", ip,
			"method", r.Method, "path", r.URL.Path, "query", r.URL.RawQuery)
		p.rp.ServeHTTP(w, r)
		return
	}
	grant, gerr := kubecap.FromCapabilities(who.Capabilities)
	if gerr != nil {
		log.Warn("k8s-proxy: ignored a malformed capability value", "caller_node", node, "err", gerr)
	}
	if !grant.Granted {
		log.Info("k8s-proxy: denied", "caller_node", node, "caller_user", who.User, "caller_addr", ip, "method", r.Method, "path", r.URL.Path,
			"reason", "no kubernetes capability")
		http.Error(w, fmt.Sprintf("403 forbidden: meshd k8s-proxy: the tailnet policy grants %s no %s (or %s) capability on this node",
			callerDesc(who, node), kubecap.Names[0], kubecap.Names[1]), http.StatusForbidden)
		return
	}
	if grant.EnforceRecorder && isSession(r) {
		log.Info("k8s-proxy: denied", "caller_node", node, "caller_user", who.User, "method", r.Method, "path", r.URL.Path,
			"reason", "session recording required, no recorder")
		http.Error(w, "403 forbidden: meshd k8s-proxy: the policy requires session recording (enforceRecorder) for exec, attach and port-forward, and meshd cannot record sessions", http.StatusForbidden)
		return
	}
	id := &identity{user: who.User, groups: grant.Groups}
	if len(who.Node.Tags) > 0 || who.User == "" {
		// A tagged node acts for no user: it is itself, in the groups of
		// its tags (as Tailscale's proxy does).
		id.user = node
		id.groups = append(append([]string(nil), grant.Groups...), who.Node.Tags...)
	}
	if p.opts.TokenFile != "" {
		b, err := os.ReadFile(p.opts.TokenFile)
		if err != nil || strings.TrimSpace(string(b)) == "" {
			log.Error("k8s-proxy: no upstream token", "file", p.opts.TokenFile, "err", err)
			http.Error(w, "502 bad gateway: meshd k8s-proxy has no credentials for the API server", http.StatusBadGateway)
			return
		}
		id.token = strings.TrimSpace(string(b))
	}
	log.Info("k8s-proxy: request", "mode", "auth", "caller_node", node, "caller_user", who.User, "caller_addr", ip,
		"impersonate_user", id.user, "impersonate_groups", id.groups, "method", r.Method, "path", r.URL.Path, "query", r.URL.RawQuery)
	p.rp.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), identityKey{}, id)))
}

func (p *Proxy) rewrite(pr *httputil.ProxyRequest) {
	// SetURL also clears Out.Host: the API server sees its own name, not
	// the node's.
	pr.SetURL(p.opts.Upstream)
	if p.opts.Mode == ModeNoAuth {
		return
	}
	id := pr.In.Context().Value(identityKey{}).(*identity)
	StripCredentials(pr.Out.Header)
	StripCredentials(pr.Out.Trailer)
	SetImpersonation(pr.Out.Header, id.user, id.groups)
	if id.token != "" {
		pr.Out.Header.Set("Authorization", "Bearer "+id.token)
	}
}

// StripCredentials removes from h everything with which a caller could
// speak as someone else: Authorization, every Impersonate-* header
// (Impersonate-User, -Group, -Uid, -Extra-*), and the X-Remote-* headers
// of the API server's front-proxy authentication. Names match in any case
// and with '_' read as '-', since h may hold names Go did not canonicalise.
func StripCredentials(h http.Header) {
	for k := range h {
		n := strings.ToLower(strings.ReplaceAll(k, "_", "-"))
		if n == "authorization" || n == "proxy-authorization" || strings.HasPrefix(n, "impersonate-") || strings.HasPrefix(n, "x-remote-") {
			delete(h, k)
		}
	}
}

// SetImpersonation sets the Impersonate-User and one Impersonate-Group
// per group; it replaces any previous values.
func SetImpersonation(h http.Header, user string, groups []string) {
	h.Set("Impersonate-User", user)
	h.Del("Impersonate-Group")
	for _, g := range groups {
		h.Add("Impersonate-Group", g)
	}
}

// isSession reports requests that open an interactive session: the ones
// session recording is about.
func isSession(r *http.Request) bool {
	p := r.URL.Path
	return strings.HasSuffix(p, "/exec") || strings.HasSuffix(p, "/attach") || strings.HasSuffix(p, "/portforward")
}

func callerDesc(who *whois.Response, node string) string {
	if who.User != "" && len(who.Node.Tags) == 0 {
		return fmt.Sprintf("%s (node %s)", who.User, node)
	}
	return fmt.Sprintf("node %s (tags %s)", node, strings.Join(who.Node.Tags, ","))
}
