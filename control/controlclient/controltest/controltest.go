// Package controltest is an in-memory coordinator for tests of the node
// daemon: it speaks the controlclient interface the agent uses (Register,
// Update, Follow) without TLS, HTTP or a database, so agent tests exercise
// the agent, not the coordinator. The real coordinator is control.Server;
// its own tests and internal/e2e cover it end to end.
package controltest

import (
	"context"
	"crypto/ed25519"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
)

// Pin is the coordinator fingerprint the fake reports.
var Pin = strings.Repeat("ab", 32)

// Options configure a Coordinator.
type Options struct {
	// AuthKey is the one auth key it accepts (reusable, pre-authorized).
	AuthKey string
	// Tags are given to every node it enrols (like a tagged auth key).
	Tags []string
	// DERPMap is handed to every node.
	DERPMap netmap.DERPMap
	// Ephemeral makes every node it enrols ephemeral (like an ephemeral
	// auth key): a logout deletes it. Others have their key expired.
	Ephemeral bool
}

// Coordinator is an in-memory coordinator: it enrols any machine that
// presents Options.AuthKey, numbers nodes from 1, gives node n the
// addresses 100.64.0.n and fd5e:5a1e:d::6440:n, lets every node see every
// other, allows all traffic between them (the real coordinator's bootstrap
// rules) and sends every follower a full map on each change. Its methods
// are safe for concurrent use.
type Coordinator struct {
	opts Options

	mu      sync.Mutex
	nodes   map[netmap.MachinePublic]*netmap.Node
	nextID  netmap.NodeID
	version uint64
	down    bool
	changed chan struct{} // closed and replaced on every change
}

// New returns a coordinator with no nodes.
func New(opts Options) *Coordinator {
	return &Coordinator{opts: opts, nodes: map[netmap.MachinePublic]*netmap.Node{}, changed: make(chan struct{})}
}

// bootstrapRules are the real coordinator's allow-all rules.
var bootstrapRules = func() []netmap.FilterRule {
	v4, v6 := netip.MustParsePrefix("100.64.0.0/10"), netip.MustParsePrefix("fd5e:5a1e:d::/48")
	return []netmap.FilterRule{{
		SrcIPs:   []netip.Prefix{v4, v6},
		DstPorts: []netmap.NetPortRange{{Net: v4, Ports: netmap.AllPorts}, {Net: v6, Ports: netmap.AllPorts}},
		Origin:   "controltest: allow all",
	}}
}

// notifyLocked wakes every follower. c.mu must be held.
func (c *Coordinator) notifyLocked() {
	c.version++
	close(c.changed)
	c.changed = make(chan struct{})
}

// Client returns the control client of the machine with key mk.
func (c *Coordinator) Client(mk ed25519.PrivateKey) *Client {
	pub, err := netmap.MachinePublicFromEd25519(mk.Public().(ed25519.PublicKey))
	if err != nil {
		panic(fmt.Sprintf("controltest: machine key: %v", err))
	}
	return &Client{c: c, mk: pub}
}

// Delete removes the node with hostname name, as `meshd admin nodes
// delete` does: its map stream ends with controlclient.ErrNotRegistered.
func (c *Coordinator) Delete(name string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	for mk, n := range c.nodes {
		if n.Hostname == name {
			delete(c.nodes, mk)
			c.notifyLocked()
			return nil
		}
	}
	return fmt.Errorf("controltest: no node %q", name)
}

// SetDown makes the coordinator unreachable (down) or reachable again:
// while down, requests fail and map streams deliver nothing, as when the
// real coordinator is stopped and the client keeps retrying.
func (c *Coordinator) SetDown(down bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.down = down
	c.notifyLocked()
}

var errDown = fmt.Errorf("controltest: coordinator unreachable")

// Client is one machine's control client. It implements the interface the
// agent uses (agent.ControlClient).
type Client struct {
	c  *Coordinator
	mk netmap.MachinePublic
}

// Register enrols the machine, or re-registers it.
func (cl *Client) Register(_ context.Context, req netmap.RegisterRequest) (*netmap.RegisterResponse, error) {
	c := cl.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.down {
		return nil, errDown
	}
	n := c.nodes[cl.mk]
	switch {
	case n == nil && req.AuthKey != c.opts.AuthKey:
		return nil, fmt.Errorf("%w: not the test key", controlclient.ErrAuthKeyUnknown)
	case n == nil:
		c.nextID++
		id := c.nextID
		addrs := []netip.Prefix{
			netip.PrefixFrom(netip.AddrFrom4([4]byte{100, 64, byte(id >> 8), byte(id)}), 32),
			netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfd, 0x5e, 0x5a, 0x1e, 0, 0x0d, 10: 0x64, 11: 0x40, 14: byte(id >> 8), 15: byte(id)}), 128),
		}
		n = &netmap.Node{ID: id, MachineKey: cl.mk, Addresses: addrs, AllowedIPs: addrs, Tags: slices.Clone(c.opts.Tags), Ephemeral: c.opts.Ephemeral}
		c.nodes[cl.mk] = n
	case expired(n) && req.AuthKey != c.opts.AuthKey:
		return nil, fmt.Errorf("%w: node %d logged out: register with an auth key", controlclient.ErrNodeExpired, n.ID)
	}
	n.KeyExpiry = time.Time{}
	n.Hostname = req.Hostname
	n.NodeKey, n.DiscoKey = req.NodeKey, req.DiscoKey
	c.notifyLocked()
	return &netmap.RegisterResponse{Node: *n, ServerKey: Pin}, nil
}

// expired reports whether n's key has expired (a logout).
func expired(n *netmap.Node) bool { return !n.KeyExpiry.IsZero() && !time.Now().Before(n.KeyExpiry) }

// Logout deletes an ephemeral node and expires any other's key, as the
// real coordinator does; the node's map stream ends.
func (cl *Client) Logout(context.Context) (*netmap.LogoutResponse, error) {
	c := cl.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.down {
		return nil, errDown
	}
	n := c.nodes[cl.mk]
	switch {
	case n == nil:
		return nil, fmt.Errorf("%w: nothing to log out", controlclient.ErrNotRegistered)
	case expired(n):
		return nil, fmt.Errorf("%w: logged out already", controlclient.ErrNodeExpired)
	case n.Ephemeral:
		delete(c.nodes, cl.mk)
		c.notifyLocked()
		return &netmap.LogoutResponse{NodeID: n.ID, Deleted: true}, nil
	}
	n.KeyExpiry = time.Now()
	c.notifyLocked()
	return &netmap.LogoutResponse{NodeID: n.ID, Expired: true}, nil
}

// SetTags refuses, as the real coordinator does while no policy is loaded
// (no tagOwners, so nobody owns a tag): the fake has no policy.
func (cl *Client) SetTags(context.Context, netmap.SetTagsRequest) (*netmap.SetTagsResponse, error) {
	return nil, fmt.Errorf("%w: controltest has no policy, so no tag owners", controlclient.ErrTagsForbidden)
}

// Cert refuses: the fake runs no tailnet CA (agent tests of certificates
// use the real coordinator).
func (cl *Client) Cert(context.Context, netmap.CertRequest) (*netmap.CertResponse, error) {
	return nil, fmt.Errorf("%w: controltest has none", controlclient.ErrNoCertAuthority)
}

// ServerPin is the fake's fingerprint.
func (cl *Client) ServerPin() string { return Pin }

// Update records what the node reports.
func (cl *Client) Update(_ context.Context, req netmap.MapRequest) error {
	c := cl.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.down {
		return errDown
	}
	n := c.nodes[cl.mk]
	if n == nil {
		return fmt.Errorf("%w: deleted", controlclient.ErrNotRegistered)
	}
	cl.applyLocked(n, &req)
	return nil
}

func (cl *Client) applyLocked(n *netmap.Node, req *netmap.MapRequest) {
	n.NodeKey = req.NodeKey
	if !req.DiscoKey.IsZero() {
		n.DiscoKey = req.DiscoKey
	}
	if len(req.Endpoints) > 0 {
		n.Endpoints = slices.Clone(req.Endpoints)
	}
	if req.HomeDERP != 0 {
		n.HomeDERP = req.HomeDERP
	}
	cl.c.notifyLocked()
}

// Follow sends fn a full map now and after every change until ctx ends,
// the node is deleted (controlclient.ErrNotRegistered, as the real client
// returns) or never was.
func (cl *Client) Follow(ctx context.Context, req netmap.MapRequest, fn func(*netmap.NetworkMap)) error {
	c := cl.c
	c.mu.Lock()
	if n := c.nodes[cl.mk]; n != nil && !c.down {
		cl.applyLocked(n, &req)
		n.Online = true
	}
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		if n := c.nodes[cl.mk]; n != nil {
			n.Online = false
			c.notifyLocked()
		}
		c.mu.Unlock()
	}()
	for {
		c.mu.Lock()
		changed := c.changed
		nm, err := cl.mapLocked()
		down := c.down
		c.mu.Unlock()
		switch {
		case down:
		case err != nil:
			return fmt.Errorf("map stream: %w", err)
		default:
			fn(nm)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-changed:
		}
	}
}

// mapLocked is the machine's full map, validated as a client would.
func (cl *Client) mapLocked() (*netmap.NetworkMap, error) {
	c := cl.c
	self := c.nodes[cl.mk]
	if self == nil {
		return nil, fmt.Errorf("%w: not enrolled or deleted", controlclient.ErrNotRegistered)
	}
	if expired(self) {
		return nil, fmt.Errorf("%w: logged out", controlclient.ErrNodeExpired)
	}
	rules := bootstrapRules()
	dm := c.opts.DERPMap
	resp := &netmap.MapResponse{
		Epoch: "controltest", Version: c.version, Full: true, Self: new(*self), DERPMap: &dm,
		PacketFilter: &rules, PolicyBootstrap: true,
	}
	for _, n := range c.nodes {
		if n != self && !n.NodeKey.IsZero() && !expired(n) {
			resp.Peers = append(resp.Peers, *n)
		}
	}
	var nm netmap.NetworkMap
	if err := nm.Apply(resp); err != nil {
		return nil, fmt.Errorf("controltest built an invalid map: %w", err)
	}
	return &nm, nil
}

// Close releases nothing: the fake holds no connections.
func (cl *Client) Close() {}
