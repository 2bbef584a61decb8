package agent

import (
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"meshd.dev/meshd/agent/certs"
	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/agent/proxy"
	"meshd.dev/meshd/agent/serve"
	"meshd.dev/meshd/agent/whois"
	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/flowlog"
	"meshd.dev/meshd/internal/backoff"
	"meshd.dev/meshd/internal/logring"
	"meshd.dev/meshd/netmap"
)

// DefaultPort is WireGuard's UDP port unless --port says otherwise.
const DefaultPort = 41641

// AutoPort, as Options.Port, asks for DefaultPort and falls back to a
// random port when DefaultPort is taken; `meshd daemon` without --port.
const AutoPort = -1

// ControlClient is the agent's view of the coordinator client
// (controlclient.Client satisfies it).
type ControlClient interface {
	Register(ctx context.Context, req netmap.RegisterRequest) (*netmap.RegisterResponse, error)
	// SetTags replaces the registered node's tags on its own request.
	SetTags(ctx context.Context, req netmap.SetTagsRequest) (*netmap.SetTagsResponse, error)
	// Cert asks the tailnet CA to sign a certificate request for the
	// node's own DNS name.
	Cert(ctx context.Context, req netmap.CertRequest) (*netmap.CertResponse, error)
	ServerPin() string
	// Logout takes the node off the tailnet: an ephemeral node is
	// deleted, any other has its key expired.
	Logout(ctx context.Context) (*netmap.LogoutResponse, error)
	Update(ctx context.Context, req netmap.MapRequest) error
	Follow(ctx context.Context, req netmap.MapRequest, fn func(*netmap.NetworkMap)) error
	// Close releases the client's connections.
	Close()
}

// ControlConfig is what a ControlClient is built from.
type ControlConfig struct {
	URL        string
	MachineKey ed25519.PrivateKey
	// ServerPin is the coordinator fingerprint to require; "" on first
	// registration (the client pins from the auth key).
	ServerPin string
	// NodeKey is the node's WireGuard private key, with which the client
	// proves to the coordinator that it holds the node key it registers.
	NodeKey netmap.NodePrivate
	Logger  *slog.Logger
	// DialContext, when set, opens the connections to the coordinator
	// (kernel TUN mode: marked to bypass an exit node's default route).
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)
}

// Options configure an Agent.
type Options struct {
	StateDir string
	// TUN is a kernel interface name, or TUNUserspace for gVisor's netstack.
	TUN string
	// Port is WireGuard's UDP listen port; 0 picks a random one, and
	// AutoPort DefaultPort or, if that is taken, a random one. A port
	// given here that is taken is an error.
	Port int
	// MTU is the tunnel's MTU; 0 derives it from the underlay (see autoMTU).
	MTU int
	// Forwards expose local TCP services on the node's tailnet addresses.
	Forwards []Forward
	// SOCKS5Addr and HTTPProxyAddr, when set, are where the outbound
	// proxies into the tailnet listen.
	SOCKS5Addr    string
	HTTPProxyAddr string
	// LoopbackOnly reports only loopback endpoints (127.0.0.1, ::1), for
	// meshes whose nodes all run on this machine (meshd demo, tests): no
	// traffic then leaves the machine.
	LoopbackOnly bool
	// NewControlClient builds the coordinator client. Defaults to
	// controlclient.NewClient.
	NewControlClient func(ControlConfig) (ControlClient, error)
	// EndpointInterval is how often local endpoints are re-checked and
	// reported when changed. Defaults to 30s.
	EndpointInterval time.Duration
	// PeerIdleTimeout is how long a peer without data traffic stays
	// configured in WireGuard: peers enter the device on their first
	// packet and leave after this long idle, so an idle node with
	// thousands of peers holds WireGuard state only for the ones in use.
	// 0 takes DefaultPeerIdleTimeout; a negative value configures every
	// peer up front.
	PeerIdleTimeout time.Duration
	// ResolvConf, when set, is the resolver file meshd points at its
	// resolver in kernel TUN mode, instead of systemd-resolved or
	// /etc/resolv.conf (`meshd daemon --resolv-conf`, a hook for network
	// namespaces, containers and tests; see docs/osdns.md).
	ResolvConf string
	// ApprovalPoll is the longest wait between two attempts to open the map
	// stream while the coordinator says the node waits for an admin's
	// approval (the first retries come sooner). Defaults to 5s.
	ApprovalPoll time.Duration
	Logger       *slog.Logger

	// GetCertificate supplies the certificates of `meshd serve --https`
	// entries; nil uses the node's own from the tailnet CA
	// (Agent.GetCertificate). Tests set it.
	GetCertificate func(*tls.ClientHelloInfo) (*tls.Certificate, error)

	// HTTPSServices are the daemon's own HTTPS services on the tailnet
	// addresses (`meshd k8s-proxy`); serve refuses their ports.
	HTTPSServices []HTTPSService

	// FlowLog, when set, receives the flow log: one JSON line per flow
	// per FlowLogInterval (flowlog.DefaultInterval if 0), from a table of
	// FlowLogMaxFlows flows (flowlog.DefaultMaxFlows if 0). See
	// docs/flowlog.md.
	FlowLog         io.Writer
	FlowLogInterval time.Duration
	FlowLogMaxFlows int

	// LogRing, when set, holds the recent lines of Logger, served on the
	// local API for `meshd bugreport`.
	LogRing *logring.Ring
	// SFTPCommand runs the SSH server's sftp subsystem as the login user
	// (the meshd binary's hidden `sftp-server`); empty refuses sftp.
	SFTPCommand []string
	// RecorderDir, when set, runs the SSH session recorder (`meshd
	// recorder --dir`) on the tailnet addresses, writing casts there.
	RecorderDir string
	// MetricsTailnetPort, if not 0, serves the node's metrics (totals
	// only) on that port of its tailnet addresses, reachable by the peers
	// the policy lets in (`meshd daemon --metrics-tailnet-port`).
	MetricsTailnetPort uint16
}

// Agent is one node's daemon. Its methods are safe for concurrent use.
type Agent struct {
	opts  Options
	log   *slog.Logger
	store *Store
	id    *Identity
	disco netmap.DiscoPrivate
	pf    *packetFilter // guarded by mu; its Filter is safe for concurrent use
	dns   *magicDNS     // MagicDNS (dns.go); safe for concurrent use

	certs *certs.Manager // the TLS certificate of the node's DNS name; safe for concurrent use

	// upMu serialises Up and Down, so that two concurrent `meshd up` cannot
	// both register (spending two keys, creating two nodes).
	upMu sync.Mutex

	mu       sync.Mutex
	memPeers int // peers in the map when memory was last released
	login    *Login
	nm       *netmap.NetworkMap
	eng      *engine
	// mtuAuto: no --mtu; the overlay MTU follows the underlay (mtu is the
	// latest choice, mtu_agent.go).
	mtuAuto  bool
	mtu      mtuChoice
	engErr   error // why the data plane is not up, for status
	sess     *session
	mapSeen  chan struct{} // closed when this session applied its first map
	ctlState string        // human-readable control connection state
	ctlErr   error         // why the control loop ended, if it did
	// ctlReachErr is the last failure to reach the coordinator, nil after
	// a success.
	ctlReachErr error
	// skew reads the coordinator's clock, from the running control
	// client; nil without one.
	skew clockSkewer
	// approvalPending: the coordinator refuses the map stream until an
	// admin approves the node; the control loop keeps asking.
	approvalPending bool
	// changed is closed (and replaced) whenever the state Up and status
	// report changes: a map, the end of a session, approval news.
	changed chan struct{}
	// pathsChanged is signalled by the magic bind when our home DERP or
	// public endpoints change, to report them at once.
	pathsChanged chan struct{}
	// exitMissing: the --exit-node is not in the map (logged on change).
	exitMissing bool
	// keyConflicts are the key conflicts last dropped from a map, to log
	// a change once rather than every map.
	keyConflicts string
	// whois answers who holds a tailnet address, from the current map;
	// read without a.mu.
	whois whois.Table
	// namesFrom is the map whois and MagicDNS were last built from.
	namesFrom *netmap.NetworkMap

	hostDNS osDNS // the host's DNS configuration (hostdns.go)

	// flows is the data path's flow table and flowLog its writer, when
	// Options.FlowLog is set (flowlog.go); both safe for concurrent use.
	flows   *flowlog.Table
	flowLog *flowlog.Logger

	// serve runs `meshd serve` (agent/serve.go); safe for concurrent use,
	// taken after a.mu when both are. serveNote (a.mu) says why the saved
	// configuration was not loaded.
	serve     *serve.Server
	services  services // a.opts.HTTPSServices; a.mu
	serveNote string

	ssh     sshState      // `meshd up --ssh` and the recorder (ssh.go); a.mu
	metrics *agentMetrics // metrics.go; immutable
}

// session is a running control loop; it owns the data plane it starts.
type session struct {
	cancel context.CancelFunc
	done   chan struct{}
}

// New opens the state dir and loads (or creates) the node's identity. It
// fails on a state dir that is not writable or holds a corrupt identity or
// login; a corrupt saved map is moved aside and the node starts without it.
func New(opts Options) (*Agent, error) {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	// With no --mtu, this first choice (from the interfaces alone) sizes
	// the start-up check of the TUN; the data plane's MTU is chosen from
	// the routes to the coordinator and peers when it starts, and kernel
	// mode follows them after (mtu_agent.go).
	var firstMTU mtuChoice
	mtuAuto := opts.MTU == 0
	if mtuAuto {
		firstMTU = chooseMTU(systemLinks(), opts.TUN, nil, nil)
		opts.MTU = firstMTU.mtu
	}
	if opts.MTU < 576 || opts.MTU > 65535 {
		return nil, fmt.Errorf("--mtu %d out of range (576-65535)", opts.MTU)
	}
	if opts.Port < AutoPort || opts.Port > 65535 {
		return nil, fmt.Errorf("--port %d out of range (0-65535)", opts.Port)
	}
	if opts.TUN == "" {
		opts.TUN = TUNUserspace
	}
	if opts.NewControlClient == nil {
		opts.NewControlClient = defaultControlClient
	}
	if opts.EndpointInterval == 0 {
		opts.EndpointInterval = 30 * time.Second
	}
	if opts.ApprovalPoll <= 0 {
		opts.ApprovalPoll = 5 * time.Second
	}
	st, err := OpenStore(opts.StateDir)
	if err != nil {
		return nil, err
	}
	id, login, nm, err := loadState(st, opts.Logger)
	if err != nil {
		st.Close()
		return nil, err
	}
	a := &Agent{
		opts: opts, log: opts.Logger, store: st, id: id, disco: netmap.NewDiscoPrivate(),
		login: login, nm: nm, ctlState: "not connected", pf: newPacketFilter(opts.Logger),
		pathsChanged: make(chan struct{}, 1), changed: make(chan struct{}),
		certs:   certs.New(opts.StateDir, opts.Logger),
		mtuAuto: mtuAuto, mtu: firstMTU,
	}
	a.dns = newMagicDNS(opts.Logger, a.DNSUpstreams)
	a.metrics = newAgentMetrics(a)
	if nm != nil {
		// A map saved by an older version may hold peers that share a key.
		a.dropKeyConflicts(nm)
		a.certs.SetSelf(certs.SelfOf(nm))
		a.setNamesLocked(nm)
	}
	if err := a.initSSH(); err != nil {
		st.Close()
		return nil, err
	}
	if err := a.initServe(); err != nil {
		st.Close()
		return nil, err
	}
	if err := a.newFlowLog(); err != nil {
		st.Close()
		return nil, err
	}
	return a, nil
}

// WhoIs reports who holds ip in the tailnet as the current network map
// says (see package whois): the node, its owner unless tagged, and the app
// capabilities it has on this node. The response is shared: do not modify
// it. Cheap enough to call per request.
func (a *Agent) WhoIs(ip netip.Addr) (*whois.Response, bool) { return a.whois.Lookup(ip) }

// Close releases the state dir. Call it after Run has returned.
func (a *Agent) Close() error { return a.store.Close() }

// NodeKey returns the node's WireGuard public key.
func (a *Agent) NodeKey() netmap.NodePublic { return a.id.NodeKey.Public() }

// Run runs the agent until ctx ends: it brings the node back up if it was
// up before (from the saved map, even with the coordinator down) and serves
// the proxies. It returns after everything it started has stopped.
func (a *Agent) Run(ctx context.Context) error {
	a.recoverOSDNS()
	if a.opts.TUN != TUNUserspace {
		// Fail at start, not at the first network map, when the TUN
		// cannot be created (no privileges, name taken).
		dev, _, err := createKernelTUN(a.opts.TUN, a.opts.MTU, nil)
		if err != nil {
			return err
		}
		dev.Close()
	}
	var wg sync.WaitGroup
	errc := make(chan error, 2)
	ps := &proxy.Server{Dial: a.Dial, Log: a.log}
	for _, p := range []struct {
		addr  string
		name  string
		serve func(context.Context, net.Listener) error
	}{
		{a.opts.SOCKS5Addr, "--socks5-server", ps.ServeSOCKS5},
		{a.opts.HTTPProxyAddr, "--http-proxy", ps.ServeHTTPConnect},
	} {
		if p.addr == "" {
			continue
		}
		ln, err := net.Listen("tcp", p.addr)
		if err != nil {
			return fmt.Errorf("%s %s: %w", p.name, p.addr, err)
		}
		a.log.Info("proxy listening", "proxy", strings.TrimPrefix(p.name, "--"), "addr", ln.Addr().String())
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := p.serve(ctx, ln); err != nil {
				errc <- err
			}
		}()
	}
	if a.flowLog != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			a.flowLog.Run(ctx)
		}()
	}
	a.mu.Lock()
	if a.login != nil && a.login.WantRunning {
		a.startLocked()
	}
	a.mu.Unlock()
	var err error
	select {
	case <-ctx.Done():
		a.logoutEphemeral()
	case err = <-errc:
	}
	a.stop()
	wg.Wait()
	return err
}

// ephemeralLogoutTimeout bounds the logout of an ephemeral node as its
// daemon stops: a stop must not hang on an unreachable coordinator, which
// then deletes the node at its ephemeral timeout instead.
const ephemeralLogoutTimeout = 5 * time.Second

// logoutEphemeral logs an ephemeral node out as its daemon stops, as
// Tailscale does: the node is deleted at once rather than at the
// coordinator's ephemeral timeout, so its peers drop it (one change each,
// not an offline one now and a removal later) and its hostname is free
// for the pod or job that replaces it. A node taken down with `meshd
// down` is left as it is.
func (a *Agent) logoutEphemeral() {
	a.mu.Lock()
	eph := a.login != nil && a.login.Ephemeral && a.login.WantRunning
	a.mu.Unlock()
	if !eph {
		return
	}
	// An up in flight (one waiting for an admin's approval may wait long)
	// holds upMu: a stop does not wait for it.
	if !a.upMu.TryLock() {
		a.log.Warn("ephemeral node: not logged out as the daemon stops, an up is in progress; the coordinator deletes the node at its ephemeral timeout")
		return
	}
	defer a.upMu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), ephemeralLogoutTimeout)
	defer cancel()
	if _, err := a.logoutLocked(ctx); err != nil {
		a.log.Warn("ephemeral node: logout as the daemon stops failed; the coordinator deletes the node at its ephemeral timeout", "err", err)
		return
	}
	a.log.Info("ephemeral node logged out as the daemon stops: deleted from the tailnet")
}

// Logout takes the node off the tailnet for good (`meshd logout`): the
// coordinator deletes an ephemeral node and expires any other's key, the
// data plane stops, and the daemon forgets the registration (its login
// and saved map; the identity stays), so the next `meshd up` needs an auth
// key. A node the coordinator no longer has (deleted or expired there) is
// forgotten here too. When the coordinator cannot be reached nothing
// changes, and the error says so.
func (a *Agent) Logout(ctx context.Context) (*localapi.LogoutResult, error) {
	a.upMu.Lock()
	defer a.upMu.Unlock()
	return a.logoutLocked(ctx)
}

// logoutLocked is Logout with a.upMu held.
func (a *Agent) logoutLocked(ctx context.Context) (*localapi.LogoutResult, error) {
	a.mu.Lock()
	var l Login
	if a.login != nil {
		l = *a.login
	}
	a.mu.Unlock()
	if l.NodeID == 0 {
		return nil, errors.New("not logged in: nothing to log out (enrol with meshd up --authkey KEY)")
	}
	cc, err := a.opts.NewControlClient(a.controlCfg(l))
	if err != nil {
		return nil, fmt.Errorf("logout: %w", err)
	}
	defer cc.Close()
	res := &localapi.LogoutResult{NodeID: l.NodeID}
	resp, err := cc.Logout(ctx)
	switch {
	case err == nil:
		res.Deleted, res.Expired = resp.Deleted, resp.Expired
	case needsReauth(err):
		res.AlreadyGone = true
	default:
		return nil, fmt.Errorf("logout: nothing changed, the node is still enrolled: %w", explainControlError(l.CoordinatorURL, err))
	}
	a.stop()
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.store.ForgetLogin(); err != nil {
		return nil, err
	}
	a.login, a.nm = nil, nil
	a.notifyLocked()
	a.log.Info("logged out", "node_id", l.NodeID, "deleted", res.Deleted, "expired", res.Expired, "already_gone", res.AlreadyGone)
	return res, nil
}

// startLocked starts the data plane from the saved map (if any) and the
// control loop. a.mu must be held.
func (a *Agent) startLocked() {
	if a.sess != nil {
		select {
		case <-a.sess.done:
			// The control loop gave up (pin mismatch, node deleted): try
			// again. The data plane keeps running meanwhile.
			a.sess = nil
		default:
			return
		}
	}
	a.mapSeen = make(chan struct{})
	a.ctlErr, a.ctlReachErr, a.approvalPending = nil, nil, false
	if a.nm != nil {
		if err := a.applyMapLocked(a.nm); err != nil {
			a.log.Warn("data plane from saved map", "err", err)
		} else {
			a.log.Info("data plane up from the saved network map", "peers", len(a.nm.Peers))
		}
		a.releaseMapGarbage(len(a.nm.Peers))
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &session{cancel: cancel, done: make(chan struct{})}
	a.sess = s
	login := *a.login
	go func() {
		defer func() {
			close(s.done)
			a.mu.Lock()
			a.notifyLocked()
			a.mu.Unlock()
		}()
		a.controlLoop(ctx, login)
	}()
	a.notifyLocked()
}

// stop ends the control loop and the data plane, keeping all state.
func (a *Agent) stop() {
	a.mu.Lock()
	s := a.sess
	a.sess = nil
	a.mu.Unlock()
	if s != nil {
		s.cancel()
		<-s.done
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.closeOSDNSLocked()
	if a.eng != nil {
		a.serveDetachLocked()
		a.eng.close()
		a.eng = nil
	}
	a.ctlState = "not connected"
	a.approvalPending = false
	a.notifyLocked()
}

func (a *Agent) controlCfg(l Login) ControlConfig {
	return ControlConfig{URL: l.CoordinatorURL, MachineKey: a.id.MachineKey, ServerPin: l.ServerPin, NodeKey: a.id.NodeKey, Logger: a.log, DialContext: a.underlayDial()}
}

// controlLoop follows the map stream and reports endpoints until ctx ends.
// The control client reconnects with backoff by itself; the data plane keeps
// running on the last map meanwhile.
func (a *Agent) controlLoop(ctx context.Context, login Login) {
	cc, err := a.opts.NewControlClient(a.controlCfg(login))
	if err != nil {
		a.mu.Lock()
		a.ctlState = "error: " + err.Error()
		a.ctlErr = err
		a.mu.Unlock()
		a.log.Error("coordinator client", "err", err)
		return
	}
	defer cc.Close()
	if sk, ok := cc.(clockSkewer); ok {
		a.mu.Lock()
		a.skew = sk
		a.mu.Unlock()
		defer func() {
			a.mu.Lock()
			a.skew = nil
			a.mu.Unlock()
		}()
	}
	a.certs.SetIssuer(cc)
	defer a.certs.SetIssuer(nil)
	a.setSSHControl(cc)
	defer a.setSSHControl(nil)
	var wg sync.WaitGroup
	wg.Add(2)
	rctx, stopReports := context.WithCancel(ctx)
	defer stopReports()
	go func() {
		defer wg.Done()
		a.reportEndpoints(rctx, cc)
	}()
	go func() {
		defer wg.Done()
		a.certs.Run(rctx)
	}()
	a.setCtlState("connecting to " + login.CoordinatorURL)
	req := netmap.MapRequest{
		Version: netmap.ProtocolVersion, NodeKey: a.NodeKey(), DiscoKey: a.disco.Public(),
		Stream: true, Endpoints: a.endpoints(), Hostinfo: hostinfo(login.Routing),
	}
	// While the node waits for an admin's approval the coordinator
	// refuses the stream and Follow returns: say so in status and ask
	// again, soon at first and then every ApprovalPoll, so that the node
	// comes up by itself shortly after the approval.
	bo := backoff.Backoff{Min: min(time.Second, a.opts.ApprovalPoll), Max: a.opts.ApprovalPoll}
	for {
		err = cc.Follow(ctx, req, func(nm *netmap.NetworkMap) {
			a.onMap(nm.Clone())
		})
		if ctx.Err() != nil || !waitingApproval(err) {
			break
		}
		a.mu.Lock()
		if !a.approvalPending {
			a.log.Info("waiting for approval by an admin", "node_id", login.NodeID, "approve_with", fmt.Sprintf("meshd admin nodes approve %d", login.NodeID))
			a.approvalPending = true
			a.ctlState = "waiting for approval by an admin"
			a.notifyLocked()
		}
		a.mu.Unlock()
		if bo.Wait(ctx, 0) != nil {
			break
		}
	}
	if err != nil && ctx.Err() == nil {
		// Only errors retrying cannot fix end Follow (pin mismatch, node
		// deleted or expired). The data plane keeps running on the last
		// map: peers that still know us stay reachable.
		a.mu.Lock()
		a.ctlState = "error: " + err.Error()
		a.ctlErr = err
		a.mu.Unlock()
		a.log.Error("map stream ended; the data plane stays up on the last map", "err", err)
	}
	stopReports()
	wg.Wait()
}

func (a *Agent) setCtlState(s string) {
	a.mu.Lock()
	a.ctlState = s
	a.mu.Unlock()
}

// onMap applies a new network map from the coordinator and saves it.
func (a *Agent) onMap(nm *netmap.NetworkMap) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.sess == nil {
		return // raced with Down
	}
	// Before anything uses the map: the filter, WireGuard, the magic bind,
	// name lookups and the saved copy all see one peer per key.
	a.dropKeyConflicts(nm)
	a.certs.SetSelf(certs.SelfOf(nm))
	a.setNamesLocked(nm)
	a.ctlState = "connected"
	if a.approvalPending {
		a.log.Info("approved by an admin")
		a.approvalPending = false
	}
	defer a.notifyLocked()
	if err := a.applyMapLocked(nm); err != nil {
		a.log.Error("apply network map", "err", err)
	}
	a.nm = nm
	if err := a.store.SaveNetworkMap(nm); err != nil {
		a.log.Error("save network map", "err", err)
	}
	a.releaseMapGarbage(len(nm.Peers)) // after the save, which makes garbage too
	select {
	case <-a.mapSeen:
	default:
		close(a.mapSeen)
	}
}

// dropKeyConflicts removes peers that share a node or disco key with
// another peer or with this node (netmap.DropKeyConflicts), logging each
// new set of conflicts once. a.mu held, or a not yet shared.
func (a *Agent) dropKeyConflicts(nm *netmap.NetworkMap) {
	cs := nm.DropKeyConflicts()
	var b strings.Builder
	for _, c := range cs {
		b.WriteString(c.String())
		b.WriteString("; ")
	}
	if b.String() == a.keyConflicts {
		return
	}
	a.keyConflicts = b.String()
	for _, c := range cs {
		a.log.Warn("network map: peers claim one key; dropping all of them (the coordinator should never send this)",
			"kind", c.Kind, "key", c.Key, "peers", c.Peers, "ours", c.Self)
	}
	if len(cs) == 0 {
		a.log.Info("network map: no more peers sharing a key")
	}
}

// applyMapLocked brings the data plane in line with nm, (re)creating it if
// our own addresses changed (a netstack cannot change them in place).
func (a *Agent) applyMapLocked(nm *netmap.NetworkMap) error {
	// Rules first, so that a new data plane never passes a packet the
	// map's (or the saved map's, after a restart) rules would drop.
	a.pf.update(nm)
	a.setNamesLocked(nm)
	a.chooseMTULocked(nm)
	addrs := slices.Clone(nm.Self.Addresses)
	slices.SortFunc(addrs, netmap.ComparePrefix)
	if a.eng != nil && !slices.Equal(a.eng.cfg.addrs, addrs) {
		a.log.Info("own addresses changed; restarting the data plane", "addrs", addrs)
		a.closeOSDNSLocked()
		a.serveDetachLocked()
		a.eng.close()
		a.eng = nil
	}
	if a.eng == nil {
		if a.mtuAuto {
			a.opts.MTU = a.mtu.mtu
		}
		eng, err := newEngine(engineConfig{
			tunName: a.opts.TUN, mtu: a.opts.MTU, port: a.opts.Port, nodeKey: a.id.NodeKey,
			addrs: addrs, forwards: a.opts.Forwards, bind: a.bindOptions(),
			log: a.log, localAddrs: localPrefixes, filter: a.pf.f, peerIdle: a.peerIdle(),
			dns: a.dns, flows: a.flows, metrics: a.metrics, metricsPort: a.opts.MetricsTailnetPort,
		})
		if err != nil {
			a.engErr = err
			return err
		}
		a.engErr = nil
		a.eng = eng
		a.log.Info("data plane up", "tun", a.opts.TUN, "addrs", addrs, "udp_port", eng.port)
		a.serveAttachLocked()
	}
	a.followMTULocked()
	var prefs localapi.RoutePrefs
	if a.login != nil {
		prefs = a.login.Routing
	}
	a.eng.setPrefs(prefs)
	if missing := prefs.ExitNode != "" && exitNodeID(nm, prefs.ExitNode) == 0; missing != a.exitMissing {
		a.exitMissing = missing
		if missing {
			a.log.Warn("the exit node is not in the network map (offline, not approved, no such node, or the policy does not grant this node autogroup:internet through it): internet traffic is blocked until it returns; `meshd up --exit-node=` stops using it",
				"exit_node", prefs.ExitNode)
		} else {
			a.log.Info("using exit node", "exit_node", prefs.ExitNode)
		}
	}
	err := errors.Join(a.eng.applyMap(routedMap(nm, prefs)), a.eng.setRouter(nm, prefs))
	a.syncOSDNSLocked(nm)
	return err
}

// releaseMapGarbage returns the memory a large map change left behind to
// the OS. Decoding and applying a map of thousands of peers creates tens of
// megabytes of garbage; the Go runtime keeps freed pages until the heap
// shrinks below its goal, which here never happens, because wireguard-go's
// batch buffers (33 MB at 128 packets per batch, mostly never touched)
// count as live heap. Without this an idle node with 1,000 peers stayed at
// ~68 MB RSS instead of ~36. Only changes of at least 256 peers (the first
// map, a big policy change) pay for the extra GC cycle, off the caller's
// goroutine.
func (a *Agent) releaseMapGarbage(peers int) {
	const bigChange = 256
	if d := peers - a.memPeers; d > -bigChange && d < bigChange {
		return
	}
	a.memPeers = peers
	go debug.FreeOSMemory()
}

func (a *Agent) peerIdle() time.Duration {
	switch d := a.opts.PeerIdleTimeout; {
	case d == 0:
		return DefaultPeerIdleTimeout
	case d < 0:
		return 0
	default:
		return d
	}
}

// endpoints returns the UDP endpoints to report, or nil before the data
// plane (and so the UDP port) exists.
func (a *Agent) endpoints() []netip.AddrPort {
	a.mu.Lock()
	eng := a.eng
	a.mu.Unlock()
	if eng == nil {
		return nil
	}
	locals, err := localPrefixes()
	if err != nil {
		a.log.Warn("local endpoints", "err", err)
		return nil
	}
	eps := endpointCandidates(locals, eng.port, eng.cfg.addrs, a.opts.LoopbackOnly)
	return withSTUNEndpoints(eng, eps)
}

// reportEndpoints tells the coordinator our endpoints whenever they change
// (including the first time the data plane comes up), retrying on error.
// Every EndpointInterval it reports even without a change: the coordinator
// treats an unchanged report as a no-op, and its success or failure is how
// status knows whether the coordinator is reachable (the map stream
// reconnects silently inside the control client).
func (a *Agent) reportEndpoints(ctx context.Context, cc ControlClient) {
	var reported []netip.AddrPort
	reportedHome := 0
	retry := time.Second
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-a.pathsChanged:
		}
		next := a.opts.EndpointInterval
		eps := a.endpoints()
		if eps == nil {
			// Data plane not up yet: look again soon.
			t.Reset(min(200*time.Millisecond, next))
			continue
		}
		home := a.homeDERP()
		a.mu.Lock()
		var hi *netmap.Hostinfo
		if a.login != nil {
			hi = hostinfo(a.login.Routing)
		}
		a.mu.Unlock()
		if hi != nil && len(hi.RoutableIPs) > 0 {
			// A router's reports are its heartbeat: the coordinator hands
			// the subnets of a silent primary to a standby.
			next = min(next, routerHeartbeat)
		}
		err := cc.Update(ctx, netmap.MapRequest{
			Version: netmap.ProtocolVersion, NodeKey: a.NodeKey(), DiscoKey: a.disco.Public(), Endpoints: eps,
			HomeDERP: home, Hostinfo: hi,
		})
		if ctx.Err() != nil {
			return
		}
		a.mu.Lock()
		if err != nil && !waitingApproval(err) && !needsReauth(err) {
			a.ctlReachErr = err
		} else {
			// Refusals are the map stream's to report (status says
			// "expired" or "waiting for approval", not "unreachable").
			a.ctlReachErr = nil
		}
		a.mu.Unlock()
		switch {
		case err != nil:
			a.log.Warn("report endpoints", "err", err)
			next, retry = retry, min(retry*2, a.opts.EndpointInterval)
		case !slices.Equal(eps, reported) || home != reportedHome:
			reported, reportedHome = eps, home
			retry = time.Second
			a.log.Info("reported endpoints", "endpoints", eps, "home_derp", home)
		}
		t.Reset(next)
	}
}

// Down takes the node off the tailnet and keeps it off across daemon
// restarts until the next Up. Identity and the saved map are kept.
func (a *Agent) Down(ctx context.Context) error {
	a.upMu.Lock()
	defer a.upMu.Unlock()
	a.mu.Lock()
	if a.login != nil && a.login.WantRunning {
		l := *a.login
		l.WantRunning = false
		if err := a.store.SaveLogin(&l); err != nil {
			a.mu.Unlock()
			return err
		}
		a.login = &l
	}
	a.mu.Unlock()
	a.stop()
	return nil
}

// Status reports the node and its peers.
func (a *Agent) Status(ctx context.Context) (*localapi.Status, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	st := &localapi.Status{TUN: a.opts.TUN, Peers: []localapi.Peer{}, SSH: a.login != nil && a.login.SSH, SSHError: a.ssh.listenErr}
	// The coordinator's verdicts on this node come first: a node it
	// expired, deleted or has not approved yet is not "unreachable".
	switch {
	case a.login == nil:
		st.BackendState = localapi.StateNeedsLogin
		st.Message = "not registered: run meshd up --authkey KEY --coordinator URL"
		return st, nil
	case a.sess == nil:
		st.BackendState = localapi.StateStopped
	case errors.Is(a.ctlErr, controlclient.ErrNodeExpired):
		st.BackendState = localapi.StateExpired
		st.Message = "expired: the coordinator expired this node's key; run `meshd up --authkey KEY` to enrol it again (it keeps its addresses)"
	case errors.Is(a.ctlErr, controlclient.ErrNotRegistered):
		st.BackendState = localapi.StateNeedsLogin
		st.Message = "the coordinator deleted this node: run `meshd up --authkey KEY` to enrol it again"
	case a.approvalPending:
		st.BackendState = localapi.StateNeedsApproval
		st.Message = fmt.Sprintf("waiting for approval by an admin: meshd admin nodes approve %d", a.login.NodeID)
	case a.eng == nil:
		st.BackendState = localapi.StateStarting
	default:
		st.BackendState = localapi.StateRunning
	}
	st.Coordinator = a.login.CoordinatorURL
	st.Filter = a.pf.status()
	st.MTU = a.mtuStatusLocked()
	online := a.sess != nil && a.ctlState == "connected" && a.ctlReachErr == nil
	switch {
	case st.Message != "":
	case a.sess != nil && a.ctlState != "connected":
		st.Message = "coordinator: " + a.ctlState
	case a.sess != nil && a.ctlReachErr != nil:
		st.Message = "coordinator unreachable, running on the last network map: " + a.ctlReachErr.Error()
	}
	if a.engErr != nil {
		st.Message = a.engErr.Error()
	}
	if a.exitMissing && st.Message == "" {
		st.Message = fmt.Sprintf("exit node %q is not in the network map (or the policy does not grant this node autogroup:internet through it): internet traffic is blocked until it returns (meshd up --exit-node= stops using it)", a.login.Routing.ExitNode)
	}
	if a.nm == nil {
		st.Self = &localapi.Node{ID: a.login.NodeID, Hostname: a.login.Hostname, Tags: nonNil(a.login.Tags), IPs: []netip.Addr{}}
		return st, nil
	}
	self := statusNode(&a.nm.Self)
	self.Online = online
	prefs := a.login.Routing
	self.Routing = &prefs
	st.Self = &self
	var stats *wgDeviceStats
	if a.eng != nil {
		var err error
		if stats, err = a.eng.stats(); err != nil {
			return nil, err
		}
	}
	var mtuProblems []string
	defer func() { st.Health = health(a.healthInputsLocked(mtuProblems), time.Now()) }()
	for _, n := range a.nm.SortedPeers() {
		p := localapi.Peer{Node: statusNode(n), Path: "none"}
		if a.eng != nil {
			setPeerPath(&p, a.eng.bind, n.NodeKey)
			if p.MTUProblem {
				mtuProblems = append(mtuProblems, n.Hostname)
			}
		}
		if stats != nil {
			if ps, ok := stats.Peers[n.NodeKey]; ok {
				p.RxBytes, p.TxBytes = ps.RxBytes, ps.TxBytes
				// With lazy configuration a peer in the device is one
				// with recent traffic.
				p.Active = a.eng.lazyOn || (!ps.LastHandshake.IsZero() && time.Since(ps.LastHandshake) < 3*time.Minute)
				if !ps.LastHandshake.IsZero() {
					t := ps.LastHandshake.UTC()
					p.LastHandshake = &t
				}
			}
		}
		st.Peers = append(st.Peers, p)
	}
	return st, nil
}

func statusNode(n *netmap.Node) localapi.Node {
	return localapi.Node{
		ID: n.ID, Hostname: n.Hostname, DNSName: n.DNSName, User: n.User, IPs: netmap.AddrsOf(n.Addresses),
		Tags: nonNil(n.Tags), Online: n.Online, NodeKey: n.NodeKey.String(),
		Notices:          n.Notices, // only the node's own entry has any
		AdvertisedRoutes: nonNilPrefixes(n.AdvertisedRoutes),
		ApprovedRoutes:   nonNilPrefixes(n.ApprovedRoutes),
		PrimaryRoutes:    nonNilPrefixes(n.PrimaryRoutes),
	}
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

// Dial opens a TCP connection into the tailnet. addr's host is an IP
// literal, a peer's hostname or MagicDNS name (resolved from the network
// map), or a MagicDNS resolver address (DNS over TCP, e.g. through the
// SOCKS5 proxy in netstack mode).
func (a *Agent) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	if network != "tcp" && network != "tcp4" && network != "tcp6" {
		return nil, fmt.Errorf("dial %s: only tcp is supported", network)
	}
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("dial %q: %w", addr, err)
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil {
		return nil, fmt.Errorf("dial %q: bad port", addr)
	}
	a.mu.Lock()
	eng, nm := a.eng, a.nm
	if nm != nil && a.login != nil {
		// Subnet addresses count only where this node routes them
		// (--accept-routes), as in the data plane.
		nm = routedMap(nm, a.login.Routing)
	}
	a.mu.Unlock()
	if eng == nil || nm == nil {
		return nil, fmt.Errorf("dial %s: %w (the node is not up)", addr, proxy.ErrNoRoute)
	}
	if ip, err := netip.ParseAddr(host); err == nil && isResolverAddr(ip) {
		return eng.dial(ctx, netip.AddrPortFrom(ip.Unmap(), uint16(port)))
	}
	ip, err := resolvePeer(nm, host)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	return eng.dial(ctx, netip.AddrPortFrom(ip, uint16(port)))
}

// resolvePeer turns host into a tailnet address: an IP literal inside the
// tailnet, or a node's hostname or MagicDNS name ("host", "host.SUFFIX",
// "host.SUFFIX.", case-insensitive; nodeHasName), IPv4 first. A name
// that more than one node holds is an error naming them: the coordinator
// keeps names unique, and a map where they are not (an older or hostile
// coordinator) must not let one node answer for another's name.
func resolvePeer(nm *netmap.NetworkMap, host string) (netip.Addr, error) {
	if ip, err := netip.ParseAddr(host); err == nil {
		ip = ip.Unmap()
		for _, n := range append([]*netmap.Node{&nm.Self}, nm.SortedPeers()...) {
			for _, p := range n.AllowedIPs {
				if p.Contains(ip) {
					return ip, nil
				}
			}
			for _, p := range n.Addresses {
				if p.Contains(ip) {
					return ip, nil
				}
			}
		}
		return netip.Addr{}, fmt.Errorf("%v is not a tailnet address: %w", ip, proxy.ErrNoRoute)
	}
	name := strings.TrimSuffix(strings.ToLower(host), ".")
	suffix := strings.TrimSuffix(strings.ToLower(nm.DNS.Suffix), ".")
	var found []netip.Addr
	var who []string
	for _, n := range append([]*netmap.Node{&nm.Self}, nm.SortedPeers()...) {
		if !nodeHasName(n, name, suffix) || len(n.Addresses) == 0 {
			continue
		}
		addrs := netmap.AddrsOf(n.Addresses)
		slices.SortFunc(addrs, func(x, y netip.Addr) int { return x.Compare(y) }) // IPv4 sorts first
		found = append(found, addrs[0])
		who = append(who, fmt.Sprintf("node %d at %v", n.ID, addrs[0]))
	}
	switch len(found) {
	case 0:
		return netip.Addr{}, fmt.Errorf("no peer named %q: %w", host, proxy.ErrNoRoute)
	case 1:
		return found[0], nil
	}
	return netip.Addr{}, fmt.Errorf("name %q is ambiguous, %d nodes hold it (%s): use an address: %w",
		host, len(found), strings.Join(who, ", "), proxy.ErrNoRoute)
}

// Listen opens a TCP listener on port of the node's first tailnet address
// of the given family ("tcp4" or "tcp6"; "tcp" means IPv4). In userspace
// mode this is the only way for a program to accept tailnet connections
// (besides --forward). The listener dies with the data plane.
func (a *Agent) Listen(network string, port uint16) (net.Listener, error) {
	a.mu.Lock()
	eng := a.eng
	a.mu.Unlock()
	if eng == nil {
		return nil, errors.New("listen: the node is not up")
	}
	for _, p := range eng.cfg.addrs {
		if (network == "tcp6") == p.Addr().Is6() {
			return eng.listen(netip.AddrPortFrom(p.Addr(), port))
		}
	}
	return nil, fmt.Errorf("listen %s: the node has no such address", network)
}
