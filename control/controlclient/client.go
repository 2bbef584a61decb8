// Package controlclient is a node's side of the control protocol: the
// client that registers with the coordinator and follows its map stream,
// the map stream's framing, and the wire errors both ends share. It depends
// only on netmap, so a daemon links none of the coordinator's server.
package controlclient

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"meshd.dev/meshd/internal/backoff"
	"meshd.dev/meshd/internal/tlspin"
	"meshd.dev/meshd/netmap"
)

// ClientOptions configures a node's control client.
type ClientOptions struct {
	// URL is the coordinator, https://HOST:PORT (a bare HOST:PORT means
	// https), or several replicas of one coordinator separated by commas
	// (ParseURLs): requests go to one until it cannot be reached, then
	// to the next.
	URL string
	// MachineKey is the machine's long-lived key; the client proves it with
	// a self-signed TLS client certificate.
	MachineKey ed25519.PrivateKey
	// ServerPin is the coordinator fingerprint pinned from an earlier
	// registration. Empty: Register takes it from the auth key.
	ServerPin string
	// NodeKey is the node's WireGuard private key. With it the client
	// proves to the coordinator that it holds the node key it registers or
	// rotates to (see netmap.NodeKeyProof): Register always, Update and
	// Follow when the coordinator asks. Without it (or for another node
	// key) requests go without a proof and the coordinator refuses what
	// needs one. SetNodeKey replaces it after a rotation.
	NodeKey netmap.NodePrivate
	Logger  *slog.Logger
	// MinBackoff and MaxBackoff bound Follow's reconnect delay (defaults 1s
	// and 60s); each delay is jittered.
	MinBackoff, MaxBackoff time.Duration
	// DialContext, when set, opens the TCP connections to the coordinator
	// (a node using an exit node marks them so they bypass the tunnel).
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)
}

// Client is a node's connection to the coordinator. Its methods are safe for
// concurrent use. Requests share one HTTP/2 connection; the map stream has
// an HTTP/1.1 connection of its own (see streamTransport), which a
// registration opens for it.
type Client struct {
	bases      []*url.URL // the coordinator's replicas, in the order given
	log        *slog.Logger
	hc         *http.Client // requests
	tr         *http.Transport
	streamHC   *http.Client // map streams
	streamTr   *http.Transport
	minB, maxB time.Duration

	mk netmap.MachinePublic

	mu      sync.Mutex
	cur     int // index in bases of the replica in use
	nodeKey netmap.NodePrivate
	pin     string
	lastBad string // fingerprint seen on the last pin mismatch
	// state is the node state last reported by Update; Follow sends it
	// when it reconnects so a new stream never reports stale endpoints.
	state *netmap.MapRequest

	// clock reads the coordinator's clock off its answers, requests'
	// and streams' (clockskew.go).
	clock skewReading
}

// ParseURL accepts https://HOST:PORT or a bare HOST:PORT.
func ParseURL(s string) (*url.URL, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, errors.New("coordinator URL is empty: pass --coordinator https://HOST:PORT")
	}
	if !strings.Contains(s, "://") {
		s = "https://" + s
	}
	u, err := url.Parse(s)
	if err != nil {
		return nil, fmt.Errorf("coordinator URL %q: %w", s, err)
	}
	if u.Scheme != "https" {
		return nil, fmt.Errorf("coordinator URL %q: the coordinator only speaks https", s)
	}
	if u.Host == "" {
		return nil, fmt.Errorf("coordinator URL %q has no host", s)
	}
	u.Path, u.RawQuery, u.Fragment = "", "", ""
	return u, nil
}

// pinnedTransport builds an HTTP/2-capable transport that accepts exactly
// the server key whose fingerprint pin() returns (tlspin: no CA, only the
// coordinator's key matters). mismatch, if not nil, hears the fingerprint
// of a server that failed the check, because net/http flattens TLS errors
// on some paths.
func pinnedTransport(pin func() string, mismatch func(got string), cert *tls.Certificate) *http.Transport {
	cfg := tlspin.ClientConfig(pin)
	verify := cfg.VerifyConnection
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		err := verify(cs)
		if me, ok := errors.AsType[*tlspin.MismatchError](err); ok {
			if mismatch != nil {
				mismatch(me.Got)
			}
			return fmt.Errorf("%w: coordinator presented %s, expected %s: check --coordinator URL or remove the pin from the state dir", ErrPinMismatch, me.Got, me.Want)
		}
		if errors.Is(err, tlspin.ErrMismatch) {
			return fmt.Errorf("%w: %v", ErrPinMismatch, err)
		}
		return err
	}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	cfg.ClientSessionCache = newSessionCache()
	return &http.Transport{
		TLSClientConfig:     cfg,
		ForceAttemptHTTP2:   true,
		TLSHandshakeTimeout: 10 * time.Second,
		IdleConnTimeout:     90 * time.Second,
		HTTP2: &http.HTTP2Config{
			// Detect a dead connection under a quiet map stream.
			SendPingTimeout: 30 * time.Second,
			PingTimeout:     15 * time.Second,
		},
	}
}

// sessionCache keeps the last TLS session the coordinator issued, under
// one name whatever replica issued it: replicas share their ticket keys
// (control/tickets.go), so a node failing over resumes on another replica
// instead of a full handshake. A ticket presented to a server that is not
// the coordinator gives that server nothing: it cannot read it, and the
// pin is checked on a resumed session as on a full one.
type sessionCache struct{ c tls.ClientSessionCache }

func newSessionCache() sessionCache { return sessionCache{tls.NewLRUClientSessionCache(1)} }

// coordinatorSession is the one name sessionCache files sessions under.
const coordinatorSession = "meshd coordinator"

func (s sessionCache) Get(string) (*tls.ClientSessionState, bool) {
	return s.c.Get(coordinatorSession)
}

func (s sessionCache) Put(_ string, cs *tls.ClientSessionState) { s.c.Put(coordinatorSession, cs) }

// PinnedTransport returns an HTTP/2-capable transport for the
// coordinator's API that trusts only the key with fingerprint pin (the
// admin CLI, relays and netcheck use it; nodes use Client).
func PinnedTransport(pin string) *http.Transport {
	return pinnedTransport(func() string { return pin }, nil, nil)
}

// ParseURLs accepts one coordinator URL (as ParseURL) or several
// replicas' separated by commas. Every replica must be the same
// coordinator: they share one key, and the client pins one fingerprint.
func ParseURLs(s string) ([]*url.URL, error) {
	var out []*url.URL
	for part := range strings.SplitSeq(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" && strings.Contains(s, ",") {
			return nil, fmt.Errorf("coordinator URLs %q: an empty entry", s)
		}
		u, err := ParseURL(part)
		if err != nil {
			return nil, err
		}
		for _, o := range out {
			if o.Host == u.Host {
				return nil, fmt.Errorf("coordinator URLs %q: %s is listed twice", s, u.Host)
			}
		}
		out = append(out, u)
	}
	return out, nil
}

// NewClient returns a client; it connects lazily.
func NewClient(o ClientOptions) (*Client, error) {
	us, err := ParseURLs(o.URL)
	if err != nil {
		return nil, err
	}
	if len(o.MachineKey) != ed25519.PrivateKeySize {
		return nil, errors.New("control client: machine key missing or not an Ed25519 private key")
	}
	cert, err := tlspin.SelfSigned(o.MachineKey, "meshd machine", nil)
	if err != nil {
		return nil, err
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.MinBackoff <= 0 {
		o.MinBackoff = time.Second
	}
	if o.MaxBackoff < o.MinBackoff {
		o.MaxBackoff = max(60*time.Second, o.MinBackoff)
	}
	mk, err := netmap.MachinePublicFromEd25519(o.MachineKey.Public().(ed25519.PublicKey))
	if err != nil {
		return nil, err
	}
	c := &Client{bases: us, log: o.Logger, mk: mk, nodeKey: o.NodeKey, pin: strings.ToLower(strings.TrimSpace(o.ServerPin)), minB: o.MinBackoff, maxB: o.MaxBackoff}
	c.tr = pinnedTransport(c.ServerPin, c.sawMismatch, &cert)
	if o.DialContext != nil {
		c.tr.DialContext = o.DialContext
	}
	c.streamTr = streamTransport(pinnedTransport(c.ServerPin, c.sawMismatch, &cert))
	c.streamTr.DialContext = c.tr.DialContext
	c.hc = &http.Client{Transport: &skewTransport{rt: c.tr, r: &c.clock}}
	c.streamHC = &http.Client{Transport: &skewTransport{rt: c.streamTr, r: &c.clock}}
	return c, nil
}

// streamTransport returns tr for map streams only: HTTP/1.1, so that a
// stream is its own connection. Over HTTP/2 every frame the coordinator
// writes takes two trips through the connection's serving goroutine and a
// goroutine of its own for the socket write; over HTTP/1.1 the stream's
// handler writes to its socket itself. Measured with 5,000 streams
// (bench/README.md, "HTTP/1.1 map streams"): 42% less coordinator CPU per
// policy change and 25% less memory per connected node. The stream needs
// nothing HTTP/2 adds: a silent stream is caught by the keep-alive
// watchdog in followOnce, not by HTTP/2 pings.
//
// tr must be fresh: once used or cloned, a transport has added "h2" to its
// TLS config's ALPN list, and a coordinator that picks it would be sent
// HTTP/1.1 on an HTTP/2 connection.
func streamTransport(tr *http.Transport) *http.Transport {
	tr.ForceAttemptHTTP2 = false
	tr.HTTP2 = nil
	tr.Protocols = new(http.Protocols)
	tr.Protocols.SetHTTP1(true)
	tr.TLSClientConfig.NextProtos = []string{"http/1.1"}
	return tr
}

// ServerPin returns the coordinator fingerprint the client verifies; persist
// it after Register.
func (c *Client) ServerPin() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.pin
}

func (c *Client) sawMismatch(got string) {
	c.mu.Lock()
	c.lastBad = got
	c.mu.Unlock()
}

// Close releases idle connections.
func (c *Client) Close() {
	c.tr.CloseIdleConnections()
	c.streamTr.CloseIdleConnections()
}

// SetNodeKey replaces the node private key the client proves node keys
// with; call it before reporting a rotated key.
func (c *Client) SetNodeKey(k netmap.NodePrivate) {
	c.mu.Lock()
	c.nodeKey = k
	c.mu.Unlock()
}

// proveNodeKey fetches a challenge and answers it with the private half of
// nk. It returns nil (no proof, no error) when the client does not hold
// nk: the coordinator then says what is missing.
func (c *Client) proveNodeKey(ctx context.Context, hc *http.Client, nk netmap.NodePublic) (*netmap.NodeKeyProof, error) {
	c.mu.Lock()
	priv := c.nodeKey
	c.mu.Unlock()
	if priv.IsZero() || priv.Public() != nk {
		return nil, nil
	}
	var ch netmap.Challenge
	if err := c.doOn(ctx, hc, ChallengePath, netmap.ChallengeRequest{Version: netmap.ProtocolVersion}, &ch); err != nil {
		return nil, fmt.Errorf("node key challenge: %w", err)
	}
	return SealNodeKeyProof(priv, c.mk, &ch)
}

// needsProof reports whether err is the coordinator asking for a node key
// proof that the client can add to req (it has none yet).
func needsProof(err error, proof *netmap.NodeKeyProof) bool {
	return proof == nil && errors.Is(err, ErrKeyProof)
}

// Register enrols the machine (with req.AuthKey) or re-registers it.
func (c *Client) Register(ctx context.Context, req netmap.RegisterRequest) (*netmap.RegisterResponse, error) {
	if req.Version == 0 {
		req.Version = netmap.ProtocolVersion
	}
	if c.ServerPin() == "" {
		if req.AuthKey == "" {
			return nil, errors.New("no coordinator fingerprint pinned and no auth key given: run meshd up with --authkey")
		}
		fp, err := AuthKeyFingerprint(req.AuthKey)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrAuthKeyUnknown, err)
		}
		c.mu.Lock()
		c.pin = fp
		c.mu.Unlock()
	}
	// Over the stream's transport: the map stream that follows a
	// registration then reuses its connection, and a joining node costs
	// the coordinator one TLS handshake, not two.
	if req.NodeKeyProof == nil {
		p, err := c.proveNodeKey(ctx, c.streamHC, req.NodeKey)
		if err != nil {
			return nil, fmt.Errorf("register with %s: %w", c.base().Host, err)
		}
		req.NodeKeyProof = p
	}
	var resp netmap.RegisterResponse
	if err := c.doOn(ctx, c.streamHC, "/machine/register", req, &resp); err != nil {
		return nil, fmt.Errorf("register with %s: %w", c.base().Host, err)
	}
	if resp.ServerKey != c.ServerPin() {
		return nil, fmt.Errorf("%w: coordinator reports key %s over a connection pinned to %s", ErrPinMismatch, resp.ServerKey, c.ServerPin())
	}
	if err := resp.Node.Validate(); err != nil {
		return nil, fmt.Errorf("register: coordinator sent an invalid node: %w", err)
	}
	return &resp, nil
}

// SetTags asks the coordinator to replace the tags of this (enrolled)
// machine's node, authenticated by the machine key alone; the policy's
// "tagOwners" decide. It returns the node as it is afterwards. A refusal
// wraps ErrTagsForbidden and names the tag and the rule.
func (c *Client) SetTags(ctx context.Context, req netmap.SetTagsRequest) (*netmap.SetTagsResponse, error) {
	if req.Version == 0 {
		req.Version = netmap.ProtocolVersion
	}
	var resp netmap.SetTagsResponse
	if err := c.do(ctx, "/machine/tags", req, &resp); err != nil {
		return nil, fmt.Errorf("set tags with %s: %w", c.base().Host, err)
	}
	if err := resp.Node.Validate(); err != nil {
		return nil, fmt.Errorf("set tags: coordinator sent an invalid node: %w", err)
	}
	return &resp, nil
}

// LogoutPath is where a node logs itself out (Client.Logout).
const LogoutPath = "/machine/logout"

// Logout takes this node off the tailnet: an ephemeral node is deleted at
// once, any other has its key expired and must register again with an
// auth key. Its map stream, if open, ends with ErrNotRegistered or
// ErrNodeExpired.
func (c *Client) Logout(ctx context.Context) (*netmap.LogoutResponse, error) {
	c.mu.Lock()
	nk := c.nodeKey
	c.mu.Unlock()
	if nk.IsZero() {
		return nil, errors.New("log out: the client has no node key")
	}
	req := netmap.LogoutRequest{Version: netmap.ProtocolVersion, NodeKey: nk.Public()}
	var resp netmap.LogoutResponse
	if err := c.do(ctx, LogoutPath, req, &resp); err != nil {
		return nil, fmt.Errorf("log out with %s: %w", c.base().Host, err)
	}
	return &resp, nil
}

// Update reports endpoints, home DERP, disco key or a rotated node key
// without opening a stream. req carries the node's full current state.
func (c *Client) Update(ctx context.Context, req netmap.MapRequest) error {
	if req.Version == 0 {
		req.Version = netmap.ProtocolVersion
	}
	req.Stream = false
	err := c.do(ctx, "/machine/map", req, &struct{}{})
	if needsProof(err, req.NodeKeyProof) {
		// A new node key: the coordinator publishes it only with a proof.
		if p, perr := c.proveNodeKey(ctx, c.hc, req.NodeKey); perr != nil {
			err = perr
		} else if p != nil {
			req.NodeKeyProof = p
			err = c.do(ctx, "/machine/map", req, &struct{}{})
		}
	}
	if err != nil {
		return fmt.Errorf("update coordinator: %w", err)
	}
	c.mu.Lock()
	c.state = mergeState(c.state, &req)
	c.mu.Unlock()
	return nil
}

// mergeState folds the non-empty reported fields of req into prev, as the
// coordinator does.
func mergeState(prev *netmap.MapRequest, req *netmap.MapRequest) *netmap.MapRequest {
	next := netmap.MapRequest{}
	if prev != nil {
		next = *prev
	}
	next.NodeKey = req.NodeKey
	if !req.DiscoKey.IsZero() {
		next.DiscoKey = req.DiscoKey
	}
	if len(req.Endpoints) > 0 {
		next.Endpoints = slices.Clone(req.Endpoints)
	}
	if req.HomeDERP != 0 {
		next.HomeDERP = req.HomeDERP
	}
	if req.Hostinfo != nil {
		hi := netmap.Hostinfo{RoutableIPs: slices.Clone(req.Hostinfo.RoutableIPs)}
		next.Hostinfo = &hi
	}
	return &next
}

// base is the replica in use.
func (c *Client) base() *url.URL {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.bases[c.cur]
}

// failover moves on to the next replica after u could not be reached,
// unless another request moved on already.
func (c *Client) failover(u *url.URL, err error) {
	if len(c.bases) < 2 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.bases[c.cur] != u {
		return
	}
	c.cur = (c.cur + 1) % len(c.bases)
	c.log.Info("coordinator replica unreachable; trying the next one", "from", u.Host, "to", c.bases[c.cur].Host, "err", err)
}

// unreachable reports whether err means the replica could not be asked
// or did not answer (as opposed to answering no), so that another one
// should be.
func unreachable(err error) bool {
	var ae *APIError
	return err != nil && !errors.As(err, &ae) && !errors.Is(err, ErrPinMismatch) &&
		!errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded)
}

// do sends a request to the replica in use, and to each of the others in
// turn while the one asked cannot be reached.
func (c *Client) do(ctx context.Context, path string, in, out any) error {
	return c.doOn(ctx, c.hc, path, in, out)
}

// doOn is do over hc (c.hc or c.streamHC).
func (c *Client) doOn(ctx context.Context, hc *http.Client, path string, in, out any) error {
	var err error
	for range c.bases {
		u := c.base()
		err = DoJSON(ctx, hc, http.MethodPost, u.JoinPath(path).String(), "", in, out, c.pinErr)
		if !unreachable(err) || ctx.Err() != nil {
			return err
		}
		c.failover(u, err)
	}
	return err
}

// pinErr turns a transport error after a pin mismatch into ErrPinMismatch
// even where the TLS error was flattened on its way up.
func (c *Client) pinErr(err error) error {
	if errors.Is(err, ErrPinMismatch) {
		return err
	}
	c.mu.Lock()
	bad := c.lastBad
	c.lastBad = ""
	pin := c.pin
	c.mu.Unlock()
	if bad != "" {
		return fmt.Errorf("%w: coordinator presented %s, expected %s: check --coordinator URL or remove the pin from the state dir", ErrPinMismatch, bad, pin)
	}
	return err
}

// DoJSON sends in (if not nil) as JSON with method to u, with bearer as the
// bearer token if not empty, and decodes a 200 answer into out (if not
// nil). An error answer becomes an *APIError that unwraps to its sentinel;
// mapErr, if not nil, may rewrite transport errors.
func DoJSON(ctx context.Context, hc *http.Client, method, u, bearer string, in, out any, mapErr func(error) error) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	resp, err := hc.Do(req)
	if err != nil {
		if mapErr != nil {
			return mapErr(err)
		}
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return ReadAPIError(resp)
	}
	if out == nil {
		return nil
	}
	if err := netmap.DecodeJSON(resp.Body, netmap.MaxMessageSize, out); err != nil {
		return fmt.Errorf("coordinator response: %w", err)
	}
	return nil
}

// ReadAPIError turns a coordinator's error answer into an *APIError.
func ReadAPIError(resp *http.Response) error {
	var eb ErrorBody
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err := json.Unmarshal(data, &eb); err != nil || eb.Error == "" {
		return &APIError{Status: resp.StatusCode, Code: "", Message: fmt.Sprintf("coordinator answered %s: %s", resp.Status, strings.TrimSpace(string(data)))}
	}
	return &APIError{Status: resp.StatusCode, Code: eb.Code, Message: eb.Error}
}

// permanent reports errors that reconnecting cannot fix, and
// ErrNotAuthorized, which only an admin's approval fixes: the caller says
// so to the user and retries at its own pace.
func permanent(err error) bool {
	return errors.Is(err, ErrNodeExpired) || errors.Is(err, ErrNotRegistered) ||
		errors.Is(err, ErrPinMismatch) || errors.Is(err, ErrTooOld) ||
		errors.Is(err, ErrKeyInUse) || errors.Is(err, ErrKeyProof) || errors.Is(err, ErrNotAuthorized)
}

// Follow keeps one map stream open and calls fn with a fresh copy of the
// network map after each applied message. It reconnects with exponential
// backoff and jitter, resuming from the last version it applied. It returns
// when ctx ends, or early with an error wrapping ErrNodeExpired,
// ErrNotRegistered, ErrPinMismatch, ErrTooOld, ErrKeyInUse or ErrKeyProof,
// which retrying cannot fix (the node must re-enrol or be reconfigured), or
// ErrNotAuthorized (the node waits for an admin's approval; call Follow
// again to keep waiting).
func (c *Client) Follow(ctx context.Context, req netmap.MapRequest, fn func(*netmap.NetworkMap)) error {
	return c.follow(ctx, req, func(nm *netmap.NetworkMap) { fn(nm.Clone()) })
}

// FollowView is Follow for a caller that only looks: fn is given the
// client's own map, valid only until fn returns and never to be modified,
// which saves a copy of the whole map per update (bench/hascale follows
// thousands of streams in one process).
func (c *Client) FollowView(ctx context.Context, req netmap.MapRequest, fn func(*netmap.NetworkMap)) error {
	return c.follow(ctx, req, fn)
}

func (c *Client) follow(ctx context.Context, req netmap.MapRequest, fn func(*netmap.NetworkMap)) error {
	if req.Version == 0 {
		req.Version = netmap.ProtocolVersion
	}
	req.Stream = true
	var nm netmap.NetworkMap
	bo := backoff.Backoff{Min: c.minB, Max: c.maxB}
	// digest is nm's PeersDigest at (epoch, version): encoding every peer
	// costs about half a millisecond in a tenant of 100, and a node whose
	// coordinator died may try several times before one answers.
	var digest struct {
		epoch   string
		version uint64
		d       string
	}
	for {
		if nm.Peers != nil {
			if digest.d == "" || digest.epoch != nm.Epoch || digest.version != nm.Version {
				digest.epoch, digest.version, digest.d = nm.Epoch, nm.Version, nm.PeersDigest()
			}
			req.Since, req.Epoch, req.PeersDigest = nm.Version, nm.Epoch, digest.d
		} else {
			req.Since, req.Epoch, req.PeersDigest = 0, "", ""
		}
		c.mu.Lock()
		if c.state != nil {
			st := mergeState(&req, c.state)
			req.NodeKey, req.DiscoKey, req.Endpoints, req.HomeDERP = st.NodeKey, st.DiscoKey, st.Endpoints, st.HomeDERP
		}
		c.mu.Unlock()
		start := time.Now()
		err := c.followOnce(ctx, req, &nm, fn)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if permanent(err) {
			return fmt.Errorf("map stream: %w", err)
		}
		if errors.Is(err, netmap.ErrNeedFullMap) {
			nm = netmap.NetworkMap{}
		}
		d := bo.Delay(time.Since(start))
		c.log.Info("map stream ended; reconnecting", "err", err, "in", d.Round(time.Millisecond))
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(d):
		}
	}
}

// openStream sends the map request of a stream and returns the open
// response, or the coordinator's refusal.
func (c *Client) openStream(ctx context.Context, req netmap.MapRequest) (*http.Response, error) {
	b, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	u := c.base()
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, u.JoinPath("/machine/map").String(), bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	hreq.Header.Set("Content-Type", "application/json")
	resp, err := c.streamHC.Do(hreq)
	if err != nil {
		err = c.pinErr(err)
		if unreachable(err) && ctx.Err() == nil {
			c.failover(u, err)
		}
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		defer resp.Body.Close()
		return nil, ReadAPIError(resp)
	}
	return resp, nil
}

// followOnce runs one stream until it fails.
func (c *Client) followOnce(ctx context.Context, req netmap.MapRequest, nm *netmap.NetworkMap, fn func(*netmap.NetworkMap)) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	resp, err := c.openStream(ctx, req)
	if needsProof(err, req.NodeKeyProof) {
		// A new node key: the coordinator publishes it only with a proof.
		p, perr := c.proveNodeKey(ctx, c.streamHC, req.NodeKey)
		switch {
		case perr != nil:
			err = perr
		case p != nil:
			req.NodeKeyProof = p
			resp, err = c.openStream(ctx, req)
		}
	}
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	// The stream's replica: if the stream breaks, the next attempt goes
	// to another one (a replica killed mid-stream refuses the reconnect
	// anyway, which would cost a backoff delay to find out).
	var used *url.URL
	if resp.Request != nil && resp.Request.URL != nil {
		for _, b := range c.bases {
			if b.Host == resp.Request.URL.Host {
				used = b
			}
		}
	}
	// Watchdog: a stream that stays silent for several keep-alive periods
	// is dead even if TCP has not noticed.
	ka := 20 * time.Second
	if ms, err := strconv.Atoi(resp.Header.Get(KeepAliveHeader)); err == nil && ms > 0 {
		ka = time.Duration(ms) * time.Millisecond
	}
	errStale := errors.New("map stream silent for too long")
	idle := 4 * ka
	wd := time.AfterFunc(idle, func() { cancel(errStale) })
	defer wd.Stop()
	var buf []byte
	for {
		var mr *netmap.MapResponse
		mr, buf, err = ReadMapResponse(resp.Body, buf)
		if err != nil {
			if cause := context.Cause(ctx); cause != nil && ctx.Err() != nil {
				if cause == errStale && used != nil {
					c.failover(used, cause)
				}
				return cause
			}
			if used != nil {
				c.failover(used, err)
			}
			return err
		}
		wd.Reset(idle)
		if err := nm.Apply(mr); err != nil {
			return fmt.Errorf("apply map response: %w", err)
		}
		if mr.KeepAlive && !mr.Full {
			continue
		}
		fn(nm)
	}
}
