// Package localapi is the daemon's local control API: JSON over HTTP on a
// unix socket, used by `meshd up/down/status/ip`. Only root and the daemon's
// own user may connect (checked with SO_PEERCRED), on top of the socket's
// 0600 mode.
package localapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"meshd.dev/meshd/agent/whois"
	"meshd.dev/meshd/internal/connlimit"
	"meshd.dev/meshd/netmap"
)

// DefaultSocket is where the daemon listens unless told otherwise.
const DefaultSocket = "/run/meshd/meshd.sock"

// UpRequest asks the daemon to join (or rejoin) the tailnet. On a node
// that is already registered, every setting must either match what the
// node is or change it; one that would change nothing is refused with an
// error saying why (see agent.Agent.Up).
type UpRequest struct {
	AuthKey     string   `json:"auth_key,omitempty"`
	Coordinator string   `json:"coordinator,omitempty"`
	Hostname    string   `json:"hostname,omitempty"`
	Tags        []string `json:"advertise_tags,omitempty"`
	// SetTags says Tags were given (--advertise-tags), even when empty: an
	// enrolled node then gets exactly these tags. Without it an empty Tags
	// leaves the node's tags alone.
	SetTags bool `json:"set_tags,omitempty"`
	// ForceReauth registers an enrolled node again with AuthKey (same
	// machine, same addresses), as for a new key or identity.
	ForceReauth bool `json:"force_reauth,omitempty"`
	// AuthKeyFromEnv says AuthKey came from the environment
	// (MESHD_AUTHKEY), not from --authkey: it is then used only when the
	// node must enrol (first start, node deleted or expired) and otherwise
	// ignored with a note, so that a container can pass it on every start.
	// An explicit --authkey that would change nothing is an error.
	AuthKeyFromEnv bool `json:"auth_key_from_env,omitempty"`
	// TagsFromEnv says Tags came from MESHD_ADVERTISE_TAGS: tags equal to
	// the node's are then fine, where an explicit --advertise-tags that
	// changes nothing is an error.
	TagsFromEnv bool `json:"tags_from_env,omitempty"`
	// AcceptDNS, when set, is `meshd up --accept-dns[=false]`: whether a
	// kernel TUN node points the host's DNS at the tailnet resolver
	// (default true, kept across restarts). nil leaves it as it is.
	AcceptDNS *bool `json:"accept_dns,omitempty"`
	// AcceptDNSFromEnv says AcceptDNS came from MESHD_ACCEPT_DNS: a value
	// equal to the node's is then fine, where an explicit flag that
	// changes nothing is an error.
	AcceptDNSFromEnv bool `json:"accept_dns_from_env,omitempty"`
	// SSH, when set, is `meshd up --ssh[=false]`: run the SSH server on
	// the tailnet addresses (kept across restarts). SSHFromEnv says it
	// came from MESHD_SSH, where a value the node has already is fine.
	SSH        *bool `json:"ssh,omitempty"`
	SSHFromEnv bool  `json:"ssh_from_env,omitempty"`
	// Routing holds the routing flags given (nil: none); the node's
	// routing preferences keep every field not given.
	Routing *RouteFlags `json:"routing,omitempty"`
}

// RouteFlags are the routing flags of `meshd up`; nil fields were not
// given.
type RouteFlags struct {
	AdvertiseRoutes        *[]netip.Prefix `json:"advertise_routes,omitempty"`
	AdvertiseExitNode      *bool           `json:"advertise_exit_node,omitempty"`
	AcceptRoutes           *bool           `json:"accept_routes,omitempty"`
	ExitNode               *string         `json:"exit_node,omitempty"`
	ExitNodeAllowLANAccess *bool           `json:"exit_node_allow_lan_access,omitempty"`
	SNATSubnetRoutes       *bool           `json:"snat_subnet_routes,omitempty"`
	// FromEnv says every given flag came from MESHD_* variables: values
	// equal to the node's are then fine, where flags typed on the
	// command line that change nothing are an error.
	FromEnv bool `json:"from_env,omitempty"`
}

// RoutePrefs are a node's routing preferences, kept across restarts.
type RoutePrefs struct {
	// AdvertiseRoutes are the subnet routes offered (exit routes not
	// included: AdvertiseExitNode).
	AdvertiseRoutes   []netip.Prefix `json:"advertise_routes,omitempty"`
	AdvertiseExitNode bool           `json:"advertise_exit_node,omitempty"`
	AcceptRoutes      bool           `json:"accept_routes,omitempty"`
	// ExitNode is the peer (hostname, MagicDNS name or tailnet IP) whose
	// exit routes carry this node's default route; "" for none.
	ExitNode               string `json:"exit_node,omitempty"`
	ExitNodeAllowLANAccess bool   `json:"exit_node_allow_lan_access,omitempty"`
	// NoSNAT is --snat-subnet-routes=false: forwarded traffic keeps the
	// tailnet source address (the subnet must route it back).
	NoSNAT bool `json:"no_snat,omitempty"`
}

// Node is one node in a Status.
type Node struct {
	ID       netmap.NodeID `json:"id"`
	Hostname string        `json:"hostname"`
	// DNSName is the node's MagicDNS name (HOST.SUFFIX. with the trailing
	// dot); empty when the coordinator sends none.
	DNSName string       `json:"dns_name"`
	User    string       `json:"user,omitempty"`
	IPs     []netip.Addr `json:"ips"`
	Tags    []string     `json:"tags"`
	Online  bool         `json:"online"`
	NodeKey string       `json:"node_key,omitempty"`
	// Notices are the coordinator's messages about this node's identity
	// (tags a policy removed and why); self only.
	Notices []string `json:"notices,omitempty"`
	// AdvertisedRoutes, ApprovedRoutes and PrimaryRoutes are the node's
	// routes as the coordinator publishes them: offered, approved, and
	// carried now (an approved subnet route that is not primary is on
	// standby behind another router).
	AdvertisedRoutes []netip.Prefix `json:"advertised_routes"`
	ApprovedRoutes   []netip.Prefix `json:"approved_routes"`
	PrimaryRoutes    []netip.Prefix `json:"primary_routes"`
	// Routing are the node's routing preferences; self only.
	Routing *RoutePrefs `json:"routing,omitempty"`
}

// Peer is a peer in a Status with its data-plane state.
type Peer struct {
	Node
	// Endpoint is the UDP address WireGuard last used for the peer; empty
	// when none is known.
	Endpoint string `json:"endpoint"`
	// Path is "direct" once a handshake has happened over UDP, "derp" when
	// relayed, "none" otherwise.
	Path          string     `json:"path"`
	RxBytes       uint64     `json:"rx_bytes"`
	TxBytes       uint64     `json:"tx_bytes"`
	LastHandshake *time.Time `json:"last_handshake"`
	// PathMTU is the largest tunnel packet (inner IP packet) that crossed
	// the direct path in its last probe round; 0 when unknown (relayed,
	// idle since the path was found, or not even the smallest probe got
	// through).
	PathMTU int `json:"path_mtu,omitempty"`
	// MTUProblem: the direct path drops packets of the full overlay MTU
	// (typically a smaller link whose ICMP "fragmentation needed" is
	// filtered): small packets work, bulk transfers stall.
	MTUProblem bool `json:"mtu_problem,omitempty"`
	// OverlayMTU is the tunnel MTU the path was probed for; set with
	// PathMTU.
	OverlayMTU int `json:"overlay_mtu,omitempty"`
	// Active: the peer is configured in WireGuard now, i.e. it had traffic
	// within the daemon's --peer-idle-timeout (with a timeout of 0: it
	// handshook within the last 3 minutes). Idle peers have no session,
	// counters or handshake time until their next packet.
	Active bool `json:"active"`
}

// Backend states. The strings are part of `meshd status --json` and never
// change meaning.
const (
	// StateNeedsLogin: never registered, or the coordinator deleted the
	// node (then Message says so and Self is what it was).
	StateNeedsLogin = "NeedsLogin"
	StateStopped    = "Stopped"  // registered, taken down with `meshd down`
	StateStarting   = "Starting" // registered, no network map yet
	StateRunning    = "Running"
	// StateNeedsApproval: registered on a coordinator run with
	// --require-approval; the node comes up by itself once an admin runs
	// `meshd admin nodes approve`.
	StateNeedsApproval = "NeedsApproval"
	// StateExpired: the coordinator expired the node's key (by an admin or
	// over time); `meshd up --authkey KEY` enrols it again.
	StateExpired = "Expired"
)

// Status is the daemon's view of itself and its peers.
type Status struct {
	BackendState string `json:"backend_state"`
	Coordinator  string `json:"coordinator,omitempty"`
	// TUN is the interface name, or "userspace".
	TUN   string `json:"tun,omitempty"`
	Self  *Node  `json:"self"`
	Peers []Peer `json:"peers"`
	// Message explains a degraded state (coordinator unreachable, ...).
	Message string `json:"message,omitempty"`
	// Filter is the packet filter's state; nil before the node registered.
	Filter *FilterStatus `json:"filter,omitempty"`
	// MTU is the overlay MTU and what decided it; nil before the node
	// registered.
	MTU *MTUStatus `json:"mtu,omitempty"`
	// SSH is whether the node runs its SSH server (`meshd up --ssh`);
	// SSHError says why it does not listen on some address.
	SSH      bool   `json:"ssh"`
	SSHError string `json:"ssh_error,omitempty"`
	// Health lists what is wrong while the node runs (docs/health.md);
	// empty when nothing is.
	Health []HealthWarning `json:"health,omitempty"`
}

// MTUStatus is the tunnel's MTU and why it is what it is.
type MTUStatus struct {
	MTU int `json:"mtu"`
	// Auto is set when no --mtu was given: the MTU follows the underlay.
	Auto bool `json:"auto"`
	// Interface is the underlay interface whose MTU decided, and
	// UnderlayMTU its MTU; empty and 0 when none did.
	Interface   string `json:"interface,omitempty"`
	UnderlayMTU int    `json:"underlay_mtu,omitempty"`
	Reason      string `json:"reason"`
}

// HealthWarning is one problem of a node that is up, in status and as
// the meshd_health_warning metric.
type HealthWarning struct {
	// Code is one of HealthCodes.
	Code string `json:"code"`
	// Message says what is wrong and what to do.
	Message string `json:"message"`
}

// Health warning codes.
const (
	HealthCoordinatorUnreachable = "coordinator_unreachable"
	HealthNoRelay                = "no_relay"
	HealthMTUProblem             = "mtu_problem"
	HealthClockSkew              = "clock_skew"
	HealthKeyExpiring            = "key_expiring"
)

// HealthCodes are every health warning code, in the order status lists
// them.
var HealthCodes = []string{
	HealthCoordinatorUnreachable, HealthNoRelay, HealthMTUProblem, HealthClockSkew, HealthKeyExpiring,
}

// FilterStatus is the packet filter's rule count, flow table use and drop
// counters. DropsIn and DropsOut hold every drop reason ("no_rule",
// "not_local", "malformed", "fragment"), zero or not.
type FilterStatus struct {
	Rules     int               `json:"rules"`
	Flows     int               `json:"flows"`
	Fragments int               `json:"fragments"`
	DropsIn   map[string]uint64 `json:"drops_in"`
	DropsOut  map[string]uint64 `json:"drops_out"`
	// Bootstrap is set while the coordinator has no policy loaded and
	// serves its allow-all bootstrap rule.
	Bootstrap bool `json:"bootstrap,omitempty"`
	// Error says why the rules of the last network map were rejected (the
	// previous rules stay in force); empty when they are in force.
	Error string `json:"error,omitempty"`
}

// Drop is one packet the filter dropped.
type Drop struct {
	Time    time.Time  `json:"time"`
	Dir     string     `json:"dir"`    // "in" (from a peer) or "out"
	Reason  string     `json:"reason"` // a FilterStatus drop reason
	Proto   uint8      `json:"proto"`  // IP protocol number; 0 for unparsed packets
	Src     netip.Addr `json:"src,omitzero"`
	Dst     netip.Addr `json:"dst,omitzero"`
	SrcPort uint16     `json:"src_port,omitempty"`
	DstPort uint16     `json:"dst_port,omitempty"`
	Len     int        `json:"len"`
	// AllowedNowBy is the origin of a rule in force now that allows this
	// flow: the packet was dropped under earlier rules.
	AllowedNowBy string `json:"allowed_now_by,omitempty"`
}

// Drops are the last packets the filter dropped, oldest first.
type Drops struct {
	Drops []Drop `json:"drops"`
}

// Backend is what the server exposes; the agent implements it.
type Backend interface {
	Up(ctx context.Context, req UpRequest) (*Status, error)
	Down(ctx context.Context) error
	Status(ctx context.Context) (*Status, error)
	Drops(ctx context.Context) (*Drops, error)
}

// LogoutResult is what `meshd logout` did.
type LogoutResult struct {
	NodeID netmap.NodeID `json:"node_id"`
	// Deleted: the node was ephemeral and is gone from the tailnet.
	Deleted bool `json:"deleted,omitempty"`
	// Expired: the node's key expired; it keeps its id and addresses and
	// comes back with `meshd up --authkey`.
	Expired bool `json:"expired,omitempty"`
	// AlreadyGone: the coordinator had deleted or expired the node
	// already; the daemon forgot its registration.
	AlreadyGone bool `json:"already_gone,omitempty"`
}

// LogoutBackend is implemented by backends that can log the node out; the
// API serves /v0/logout for them (`meshd logout`).
type LogoutBackend interface {
	Logout(ctx context.Context) (*LogoutResult, error)
}

// StateWaiter is implemented by backends that can wait for their state to
// change; the API serves /v0/watch for them (`meshd up` waiting for an
// admin's approval).
type StateWaiter interface {
	// WaitState returns the status as soon as its BackendState is not
	// from, or the current status when ctx ends.
	WaitState(ctx context.Context, from string) (*Status, error)
}

// maxWatch bounds one /v0/watch request; clients ask again.
const maxWatch = 25 * time.Second

// PingResult is one disco ping's answer (`meshd ping`).
type PingResult struct {
	Peer string     `json:"peer"`
	IP   netip.Addr `json:"ip"`
	// Path is "direct" (Endpoint is the peer's ip:port that answered) or
	// "derp" (through DERPRegion/DERPCode).
	Path       string  `json:"path"`
	Endpoint   string  `json:"endpoint,omitempty"`
	DERPRegion int     `json:"derp_region,omitempty"`
	DERPCode   string  `json:"derp_code,omitempty"`
	LatencyMS  float64 `json:"latency_ms"`
}

// Pinger is implemented by backends that can disco-ping peers; the API
// serves /v0/ping for them.
type Pinger interface {
	Ping(ctx context.Context, peer string) (*PingResult, error)
}

// MetricsBackend is implemented by backends with Prometheus metrics; the
// API serves them at /v0/metrics (`meshd metrics`).
type MetricsBackend interface {
	MetricsHandler() http.Handler
}

// WhoIser is implemented by backends that can say who holds a tailnet
// address; the API serves /v0/whois for them.
type WhoIser interface {
	WhoIs(ip netip.Addr) (*whois.Response, bool)
}

// Logs are the daemon's recent log lines (`meshd bugreport`), secrets
// masked.
type Logs struct {
	Lines []string `json:"lines"`
	// Dropped is how many older lines the daemon no longer holds.
	Dropped uint64 `json:"dropped"`
}

// LogReader is implemented by backends that keep their recent log lines;
// the API serves /v0/logs for them.
type LogReader interface {
	RecentLogs() (*Logs, bool)
}

// ErrNoSuchNode is what Client.WhoIs returns for an address no node in the
// daemon's network map holds.
var ErrNoSuchNode = errors.New("no node in this node's network map holds that address")

// ParseWhoIsAddr accepts what `meshd whois` does: an IP, or IP:PORT (the
// port is ignored: identity belongs to the address).
func ParseWhoIsAddr(s string) (netip.Addr, error) {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap.Addr().Unmap(), nil
	}
	ip, err := netip.ParseAddr(strings.Trim(s, "[]"))
	if err != nil {
		return netip.Addr{}, fmt.Errorf("whois %q: want IP or IP:PORT", s)
	}
	return ip.Unmap(), nil
}

// statusError is the daemon's refusal of a request: its message and the
// HTTP status it came with.
type statusError struct {
	code int
	msg  string
}

func (e *statusError) Error() string { return e.msg }

type errorBody struct {
	Error string `json:"error"`
}

// maxRequest bounds a request body; the API has only small requests.
const maxRequest = 64 << 10

// Handler serves the API for b.
func Handler(b Backend) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v0/up", func(w http.ResponseWriter, r *http.Request) {
		var req UpRequest
		if err := netmap.DecodeJSON(r.Body, maxRequest, &req); err != nil {
			writeJSON(w, http.StatusBadRequest, errorBody{"bad request: " + err.Error()})
			return
		}
		st, err := b.Up(r.Context(), req)
		if err != nil {
			writeJSON(w, http.StatusBadRequest, errorBody{err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, st)
	})
	mux.HandleFunc("POST /v0/down", func(w http.ResponseWriter, r *http.Request) {
		if err := b.Down(r.Context()); err != nil {
			writeJSON(w, http.StatusInternalServerError, errorBody{err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, struct{}{})
	})
	if lb, ok := b.(LogoutBackend); ok {
		mux.HandleFunc("POST /v0/logout", func(w http.ResponseWriter, r *http.Request) {
			res, err := lb.Logout(r.Context())
			if err != nil {
				writeJSON(w, http.StatusBadRequest, errorBody{err.Error()})
				return
			}
			writeJSON(w, http.StatusOK, res)
		})
	}
	mux.HandleFunc("GET /v0/status", func(w http.ResponseWriter, r *http.Request) {
		st, err := b.Status(r.Context())
		if err != nil {
			writeJSON(w, http.StatusInternalServerError, errorBody{err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, st)
	})
	mux.HandleFunc("GET /v0/drops", func(w http.ResponseWriter, r *http.Request) {
		d, err := b.Drops(r.Context())
		if err != nil {
			writeJSON(w, http.StatusInternalServerError, errorBody{err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, d)
	})
	// Profiles of the running daemon (`curl --unix-socket SOCK
	// http://x/debug/pprof/heap`): the socket is root-only, and a daemon
	// moving tens of Gbit/s is where the cycles and bytes must be found.
	mux.HandleFunc("GET /debug/pprof/", pprof.Index)
	mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	if sw, ok := b.(StateWaiter); ok {
		mux.HandleFunc("GET /v0/watch", func(w http.ResponseWriter, r *http.Request) {
			ctx, cancel := context.WithTimeout(r.Context(), maxWatch)
			defer cancel()
			st, err := sw.WaitState(ctx, r.URL.Query().Get("from"))
			if err != nil {
				writeJSON(w, http.StatusInternalServerError, errorBody{err.Error()})
				return
			}
			writeJSON(w, http.StatusOK, st)
		})
	}
	certRoutes(mux, b)
	if wb, ok := b.(WhoIser); ok {
		mux.HandleFunc("GET /v0/whois", func(w http.ResponseWriter, r *http.Request) {
			ip, err := ParseWhoIsAddr(r.URL.Query().Get("addr"))
			if err != nil {
				writeJSON(w, http.StatusBadRequest, errorBody{err.Error()})
				return
			}
			res, ok := wb.WhoIs(ip)
			if !ok {
				writeJSON(w, http.StatusNotFound, errorBody{fmt.Sprintf("whois %v: %v", ip, ErrNoSuchNode)})
				return
			}
			writeJSON(w, http.StatusOK, res)
		})
	}
	if sb, ok := b.(ServeBackend); ok {
		handleServe(mux, sb)
	}
	if lr, ok := b.(LogReader); ok {
		mux.HandleFunc("GET /v0/logs", func(w http.ResponseWriter, r *http.Request) {
			logs, ok := lr.RecentLogs()
			if !ok {
				writeJSON(w, http.StatusNotFound, errorBody{"this daemon keeps no log lines in memory"})
				return
			}
			writeJSON(w, http.StatusOK, logs)
		})
	}
	if m, ok := b.(MetricsBackend); ok {
		mux.Handle("GET /v0/metrics", m.MetricsHandler())
	}
	if p, ok := b.(Pinger); ok {
		mux.HandleFunc("POST /v0/ping", func(w http.ResponseWriter, r *http.Request) {
			peer := r.URL.Query().Get("peer")
			if peer == "" {
				writeJSON(w, http.StatusBadRequest, errorBody{"ping: no peer given"})
				return
			}
			res, err := p.Ping(r.Context(), peer)
			if err != nil {
				writeJSON(w, http.StatusBadRequest, errorBody{err.Error()})
				return
			}
			writeJSON(w, http.StatusOK, res)
		})
	}
	return mux
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

// Listen creates the unix socket at path (mode 0600, its directory 0755 if
// missing), replacing a stale socket left by a crashed daemon but refusing
// to take over one a live daemon is serving.
func Listen(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("local api socket dir: %w (pass --socket PATH somewhere writable)", err)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("another meshd daemon is already listening on %s (stop it, or pass a different --socket)", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove stale socket %s: %w", path, err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("local api: %w (pass --socket PATH somewhere writable)", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("local api: chmod socket: %w", err)
	}
	return &credListener{UnixListener: ln.(*net.UnixListener), uid: os.Getuid()}, nil
}

// credListener drops connections from users other than root and the
// daemon's own user. The socket mode already keeps others out; this is the
// second lock, and it survives a mistaken chmod.
type credListener struct {
	*net.UnixListener
	uid int
}

func (l *credListener) Accept() (net.Conn, error) {
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			return nil, err
		}
		cred, err := peerCred(c)
		if err == nil && (cred.Uid == 0 || int(cred.Uid) == l.uid) {
			return c, nil
		}
		c.Close()
	}
}

func peerCred(c *net.UnixConn) (*syscall.Ucred, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	var (
		cred *syscall.Ucred
		cerr error
	)
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	}); err != nil {
		return nil, err
	}
	if cerr != nil {
		return nil, cerr
	}
	return cred, nil
}

// peerProcess is the local API's connlimit source: the client's process,
// from SO_PEERCRED. Every client is root or the daemon's user, so the
// process is what tells one (stuck or hostile) client from the others.
func peerProcess(c net.Conn) (string, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return "", fmt.Errorf("local api: %T is not a unix socket connection", c)
	}
	cred, err := peerCred(uc)
	if err != nil {
		return "", fmt.Errorf("local api: SO_PEERCRED: %w", err)
	}
	return "pid " + strconv.Itoa(int(cred.Pid)), nil
}

// DefaultLimits are the local API's connection limits: 16 connections per
// client process and 128 in all (a CLI command holds one or two), a
// request's header and body within 10s each, idle connections closed after
// a minute. The SO_PEERCRED check at accept is the authentication, so no
// handshake deadline applies.
func DefaultLimits() connlimit.Limits {
	return connlimit.Limits{
		PerSource: 16, Total: 128, AuthenticatedAtAccept: true,
		HeaderTimeout: 10 * time.Second, BodyTimeout: 10 * time.Second, IdleTimeout: time.Minute,
		Source: peerProcess, Name: "local api",
	}
}

// Serve serves the API for b on ln until ctx ends, with DefaultLimits.
func Serve(ctx context.Context, ln net.Listener, b Backend) error {
	return ServeLimits(ctx, ln, b, DefaultLimits())
}

// ServeLimits serves the API for b on ln until ctx ends, with lim (zero
// fields: connlimit defaults; a nil Source: the client's process).
func ServeLimits(ctx context.Context, ln net.Listener, b Backend, lim connlimit.Limits) error {
	if lim.Source == nil {
		lim.Source = peerProcess
	}
	srv := lim.Server(Handler(b))
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(lim.Listener(ln)) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
		return nil
	}
}

// ErrNoDaemon is returned by the client when no daemon listens on the socket.
var ErrNoDaemon = errors.New("no daemon")

// Client talks to a daemon.
type Client struct {
	path string
	hc   *http.Client
}

// NewClient returns a client for the daemon at socket path.
func NewClient(path string) *Client {
	return &Client{path: path, hc: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
		// A connection per request: a program that makes a client per
		// call (a poll loop, a test harness) would otherwise keep an idle
		// connection per client open for good, and the daemon refuses a
		// source's connections beyond Limits.PerSource. Dialing a unix
		// socket costs microseconds.
		DisableKeepAlives: true,
	}}}
}

// Up asks the daemon to join the tailnet.
func (c *Client) Up(ctx context.Context, req UpRequest) (*Status, error) {
	var st Status
	return &st, c.do(ctx, "POST", "/v0/up", req, &st)
}

// Down takes the node off the tailnet, keeping its state.
func (c *Client) Down(ctx context.Context) error {
	return c.do(ctx, "POST", "/v0/down", struct{}{}, nil)
}

// Logout logs the node out of the tailnet (LogoutResult says how).
func (c *Client) Logout(ctx context.Context) (*LogoutResult, error) {
	var res LogoutResult
	return &res, c.do(ctx, "POST", "/v0/logout", struct{}{}, &res)
}

// Status returns the daemon's status.
func (c *Client) Status(ctx context.Context) (*Status, error) {
	var st Status
	return &st, c.do(ctx, "GET", "/v0/status", nil, &st)
}

// WaitState waits until the daemon's BackendState is not from and returns
// that status; it returns ctx's error when ctx ends first.
func (c *Client) WaitState(ctx context.Context, from string) (*Status, error) {
	for {
		var st Status
		if err := c.do(ctx, "GET", "/v0/watch?from="+url.QueryEscape(from), nil, &st); err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, err
		}
		if st.BackendState != from {
			return &st, nil
		}
	}
}

// Drops returns the last packets the daemon's filter dropped.
func (c *Client) Drops(ctx context.Context) (*Drops, error) {
	var d Drops
	return &d, c.do(ctx, "GET", "/v0/drops", nil, &d)
}

// Ping sends one disco ping to peer (a hostname or tailnet IP).
func (c *Client) Ping(ctx context.Context, peer string) (*PingResult, error) {
	var res PingResult
	return &res, c.do(ctx, "POST", "/v0/ping?peer="+url.QueryEscape(peer), struct{}{}, &res)
}

// WhoIs asks the daemon who holds addr (IP or IP:PORT). An address no node
// holds is ErrNoSuchNode.
func (c *Client) WhoIs(ctx context.Context, addr string) (*whois.Response, error) {
	var res whois.Response
	err := c.do(ctx, "GET", "/v0/whois?addr="+url.QueryEscape(addr), nil, &res)
	var se *statusError
	if errors.As(err, &se) && se.code == http.StatusNotFound {
		return nil, fmt.Errorf("whois %s: %w", addr, ErrNoSuchNode)
	}
	if err != nil {
		return nil, err
	}
	return &res, nil
}

// Logs returns the daemon's recent log lines.
func (c *Client) Logs(ctx context.Context) (*Logs, error) {
	var l Logs
	if err := c.do(ctx, "GET", "/v0/logs", nil, &l); err != nil {
		return nil, err
	}
	return &l, nil
}

// Get writes the body of a GET of path (such as /v0/metrics) to w; a
// status other than 200 is an error.
func (c *Client) Get(ctx context.Context, path string, w io.Writer) error {
	resp, err := c.send(ctx, "GET", path, nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		return fmt.Errorf("GET %s: %s: %s", path, resp.Status, strings.TrimSpace(string(msg)))
	}
	if _, err := io.Copy(w, resp.Body); err != nil {
		return fmt.Errorf("GET %s: %w", path, err)
	}
	return nil
}

// Profile writes the daemon's named runtime/pprof profile (heap, goroutine,
// allocs, profile for CPU, ...) to w; params are its query parameters
// (seconds=N for CPU profiles, debug=1 for text).
func (c *Client) Profile(ctx context.Context, name string, params url.Values, w io.Writer) error {
	if name == "" || strings.ContainsAny(name, "/?#") {
		return fmt.Errorf("profile name %q: want one of heap, allocs, goroutine, profile, mutex, block, threadcreate", name)
	}
	resp, err := c.send(ctx, "GET", "/debug/pprof/"+name+"?"+params.Encode(), nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		return fmt.Errorf("profile %s: %s: %s", name, resp.Status, strings.TrimSpace(string(msg)))
	}
	if _, err := io.Copy(w, resp.Body); err != nil {
		return fmt.Errorf("profile %s: %w", name, err)
	}
	return nil
}

// Metrics writes the daemon's metrics in the Prometheus text format to w.
func (c *Client) Metrics(ctx context.Context, w io.Writer) error {
	resp, err := c.send(ctx, "GET", "/v0/metrics", nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		return fmt.Errorf("metrics: %s: %s", resp.Status, strings.TrimSpace(string(msg)))
	}
	if _, err := io.Copy(w, resp.Body); err != nil {
		return fmt.Errorf("metrics: %w", err)
	}
	return nil
}

// send makes one request to the daemon, telling a missing daemon apart
// from other failures.
func (c *Client) send(ctx context.Context, method, path string, body io.Reader) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, "http://meshd"+path, body)
	if err != nil {
		return nil, err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("%w at %s", ErrNoDaemon, c.path)
		}
		return nil, fmt.Errorf("local api %s: %w", c.path, err)
	}
	return resp, nil
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		pr, pw := io.Pipe()
		go func() { pw.CloseWithError(json.NewEncoder(pw).Encode(in)) }()
		body = pr
	}
	resp, err := c.send(ctx, method, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var eb errorBody
		if err := netmap.DecodeJSON(resp.Body, maxRequest, &eb); err != nil || eb.Error == "" {
			return &statusError{resp.StatusCode, fmt.Sprintf("local api %s: %s", path, resp.Status)}
		}
		return &statusError{resp.StatusCode, eb.Error}
	}
	if out == nil {
		return nil
	}
	if err := netmap.DecodeJSON(resp.Body, netmap.MaxMessageSize, out); err != nil {
		return fmt.Errorf("local api %s: decode response: %w", path, err)
	}
	return nil
}
