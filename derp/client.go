package derp

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"sync"
	"time"

	"golang.org/x/crypto/nacl/box"

	"meshd.dev/meshd/netmap"
)

// ClientOptions configures Dial.
type ClientOptions struct {
	// NodeKey is the key the client proves and receives packets for.
	NodeKey netmap.NodePrivate
	// CertFingerprint pins the relay's certificate (hex SHA-256 of its
	// SPKI, netmap.DERPNode.CertFingerprint). Empty: verify against the
	// system roots.
	CertFingerprint string
	// MeshKey makes this a mesh connection between servers of a region.
	MeshKey string
	// DialContext opens the TCP connection; nil uses a net.Dialer.
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)
	// IdleTimeout makes Recv fail when nothing (not even a keep-alive)
	// arrived for about this long, so a relay that vanished without
	// closing the connection (a dropped route, a dead NAT mapping) is
	// noticed in seconds rather than after TCP's minutes. 0: twice the
	// relay's keep-alive interval plus 5s. Negative: never; the caller
	// manages read deadlines itself.
	IdleTimeout time.Duration
	// WriteTimeout makes the connection fail when queued frames could not
	// be handed to the kernel for this long: the relay stopped reading, or
	// the path died with data in flight. Senders blocked on a full queue
	// are then released with an error instead of waiting for TCP's
	// retransmission timeout (minutes). 0: DefaultClientWriteTimeout. Negative:
	// never.
	WriteTimeout time.Duration
}

// DefaultClientWriteTimeout is ClientOptions.WriteTimeout's default: a relay
// that accepts no bytes for this long is gone.
const DefaultClientWriteTimeout = 10 * time.Second

// ErrQueueFull is TrySend's answer when the connection's send queue is
// full (the relay or the path is slower than the sender).
var ErrQueueFull = errors.New("derp: send queue full")

// Client is one connection to a relay. Send may be called concurrently with
// Recv; Recv must be called from a single goroutine. A Client does not
// reconnect: when Send or Recv fail, Close it and Dial again.
type Client struct {
	conn      net.Conn
	br        *bufio.Reader
	serverKey netmap.NodePublic
	info      ServerInfo

	// Outgoing frames are appended to pending and written by flushLoop, so
	// frames queued while a write syscall is in progress go out together:
	// one syscall for many packets under load, no added delay when idle.
	wmu       sync.Mutex
	wcond     sync.Cond
	pending   []byte
	spare     []byte
	werr      error
	flushSig  chan struct{}
	done      chan struct{}
	closeOnce sync.Once

	rbuf []byte
	// idle is the effective IdleTimeout; deadlineSet is when the read
	// deadline was last pushed out (only Recv touches either).
	idle        time.Duration
	deadlineSet time.Time
	// keepAlive is the relay's interval: flushLoop sends a keep-alive when
	// nothing else went out for that long.
	keepAlive time.Duration
	// writeTimeout bounds each write of queued frames; 0: none.
	writeTimeout time.Duration
}

// maxPending bounds queued outgoing bytes; Send blocks beyond it, which is
// how TCP backpressure from the relay reaches the sender.
const maxPending = 256 << 10

// start begins writing queued frames to conn.
func (c *Client) start() {
	c.wcond.L = &c.wmu
	c.flushSig = make(chan struct{}, 1)
	c.done = make(chan struct{})
	c.pending = make([]byte, 0, 64<<10)
	c.spare = make([]byte, 0, 64<<10)
	go c.flushLoop()
}

func (c *Client) flushLoop() {
	var tick <-chan time.Time
	if c.keepAlive > 0 {
		t := time.NewTicker(c.keepAlive)
		defer t.Stop()
		tick = t.C
	}
	wrote := false // frames other than keep-alives written since the last tick
	for {
		select {
		case <-c.flushSig:
			wrote = true
		case <-tick:
			if wrote {
				wrote = false
				continue
			}
			c.wmu.Lock()
			c.pending = appendFrame(c.pending, frameKeepAlive)
			c.wmu.Unlock()
		case <-c.done:
			return
		}
		c.wmu.Lock()
		buf := c.pending
		c.pending = c.spare[:0]
		c.spare = nil
		c.wcond.Broadcast()
		c.wmu.Unlock()
		var err error
		if len(buf) > 0 {
			if c.writeTimeout > 0 {
				err = c.conn.SetWriteDeadline(time.Now().Add(c.writeTimeout))
			}
			if err == nil {
				_, err = c.conn.Write(buf)
			}
		}
		c.wmu.Lock()
		c.spare = buf[:0]
		if err != nil {
			c.werr = err
			c.wcond.Broadcast()
		}
		c.wmu.Unlock()
		if err != nil {
			c.conn.Close()
			return
		}
	}
}

// queue appends one frame (header plus parts) to the outgoing buffer.
func (c *Client) queue(t frameType, parts ...[]byte) error {
	return c.queueFrame(true, t, parts...)
}

// queueFrame appends one frame; when the queue is full it waits for the
// writer if wait is set and returns ErrQueueFull otherwise.
func (c *Client) queueFrame(wait bool, t frameType, parts ...[]byte) error {
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	c.wmu.Lock()
	for c.werr == nil && len(c.pending) > 0 && len(c.pending)+frameHeaderLen+n > maxPending {
		if !wait {
			c.wmu.Unlock()
			return ErrQueueFull
		}
		c.wcond.Wait()
	}
	if err := c.werr; err != nil {
		c.wmu.Unlock()
		return err
	}
	c.pending = appendFrame(c.pending, t, parts...)
	c.wmu.Unlock()
	select {
	case c.flushSig <- struct{}{}:
	default:
	}
	return nil
}

// queueRaw appends bytes that are not a well-formed frame (tests only
// need this, to play a misbehaving client).
func (c *Client) queueRaw(b []byte) error {
	c.wmu.Lock()
	if err := c.werr; err != nil {
		c.wmu.Unlock()
		return err
	}
	c.pending = append(c.pending, b...)
	c.wmu.Unlock()
	select {
	case c.flushSig <- struct{}{}:
	default:
	}
	return nil
}

// Message is something received from the relay: ReceivedPacket, PeerGone,
// PeerPresent, Pong, Health or KeepAlive.
type Message interface{ derpMessage() }

// ReceivedPacket is a packet another node sent to this client's key. Data
// is only valid until the next call to Recv.
type ReceivedPacket struct {
	Source netmap.NodePublic
	Data   []byte
}

// PeerGone reports that a node this client sent to is not (or no longer)
// connected to the relay.
type PeerGone struct {
	Key    netmap.NodePublic
	Reason PeerGoneReason
}

// PeerPresent reports a node connected to the relay (mesh connections only).
type PeerPresent struct{ Key netmap.NodePublic }

// Pong answers a Ping with the same data.
type Pong struct{ Data [8]byte }

// Health carries the relay's current problem; empty Problem means healthy.
type Health struct{ Problem string }

// KeepAlive is the relay's periodic liveness frame.
type KeepAlive struct{}

func (ReceivedPacket) derpMessage() {}
func (PeerGone) derpMessage()       {}
func (PeerPresent) derpMessage()    {}
func (Pong) derpMessage()           {}
func (Health) derpMessage()         {}
func (KeepAlive) derpMessage()      {}

// Dial connects to the relay at rawURL ("https://host:port" or, behind a
// TLS-terminating proxy or in tests, "http://host:port"; the path defaults
// to /derp), upgrades and authenticates with opts.NodeKey.
func Dial(ctx context.Context, rawURL string, opts ClientOptions) (*Client, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, fmt.Errorf("derp: relay URL %q: %w", rawURL, err)
	}
	if u.Scheme != "https" && u.Scheme != "http" {
		return nil, fmt.Errorf("derp: relay URL %q: scheme must be https or http", rawURL)
	}
	host := u.Host
	if u.Port() == "" {
		if u.Scheme == "https" {
			host = net.JoinHostPort(u.Hostname(), "443")
		} else {
			host = net.JoinHostPort(u.Hostname(), "80")
		}
	}
	if u.Path == "" || u.Path == "/" {
		u.Path = "/derp"
	}
	dial := opts.DialContext
	if dial == nil {
		dial = (&net.Dialer{}).DialContext
	}
	conn, err := dial(ctx, "tcp", host)
	if err != nil {
		return nil, fmt.Errorf("derp: dial %s: %w", host, err)
	}
	if u.Scheme == "https" {
		cfg, err := pinnedTLSConfig(u.Hostname(), opts.CertFingerprint)
		if err != nil {
			conn.Close()
			return nil, err
		}
		tc := tls.Client(conn, cfg)
		if err := tc.HandshakeContext(ctx); err != nil {
			conn.Close()
			return nil, fmt.Errorf("derp: TLS with %s: %w", host, err)
		}
		conn = tc
	}
	c, err := newClient(ctx, conn, u, opts)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

func newClient(ctx context.Context, conn net.Conn, u *url.URL, opts ClientOptions) (*Client, error) {
	if opts.NodeKey.IsZero() {
		return nil, errors.New("derp: client needs a node key")
	}
	// The context bounds the whole handshake, including a silent server.
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()

	br := bufio.NewReaderSize(conn, 64<<10)
	bw := bufio.NewWriterSize(conn, 64<<10)
	req := &http.Request{Method: http.MethodGet, URL: u, Host: u.Host, Header: http.Header{
		"Upgrade":    {upgradeProtocol},
		"Connection": {"Upgrade"},
	}, ProtoMajor: 1, ProtoMinor: 1}
	if err := req.Write(bw); err != nil {
		return nil, fmt.Errorf("derp: send upgrade: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return nil, fmt.Errorf("derp: send upgrade: %w", err)
	}
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		return nil, ctxErr(ctx, fmt.Errorf("derp: read upgrade response: %w", err))
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		resp.Body.Close()
		return nil, fmt.Errorf("derp: %s is not a meshd relay: upgrade answered %s: %q", u.Redacted(), resp.Status, body)
	}

	t, payload, err := readFrame(br, nil)
	if err != nil {
		return nil, ctxErr(ctx, fmt.Errorf("derp: read server key: %w", err))
	}
	if t != frameServerKey || len(payload) != len(magic)+keyLen+nonceLen || string(payload[:len(magic)]) != magic {
		return nil, fmt.Errorf("derp: %s did not start the relay protocol (frame 0x%02x)", u.Redacted(), byte(t))
	}
	c := &Client{conn: conn, br: br, serverKey: keyFrom(payload[len(magic):])}
	var nonce [nonceLen]byte
	copy(nonce[:], payload[len(magic)+keyLen:])

	ci := clientInfo{Version: ProtocolVersion, MeshKey: opts.MeshKey}
	if opts.MeshKey != "" {
		k, err := ParseMeshKey(opts.MeshKey)
		if err != nil {
			return nil, err
		}
		ci.MeshKey = hex.EncodeToString(k)
	}
	plain, _ := json.Marshal(ci)
	pub := opts.NodeKey.Public()
	sealed := box.Seal(nil, plain, &nonce, (*[32]byte)(&c.serverKey), (*[32]byte)(&opts.NodeKey))
	if err := writeFrame(bw, frameClientInfo, pub[:], sealed); err != nil {
		return nil, fmt.Errorf("derp: send client info: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return nil, fmt.Errorf("derp: send client info: %w", err)
	}
	t, payload, err = readFrame(br, nil)
	if err != nil {
		return nil, ctxErr(ctx, fmt.Errorf("derp: read server info: %w", err))
	}
	switch t {
	case frameServerInfo:
		if err := json.Unmarshal(payload, &c.info); err != nil {
			return nil, fmt.Errorf("derp: server info: %w", err)
		}
	case frameHealth:
		return nil, fmt.Errorf("derp: relay rejected the connection: %s", payload)
	default:
		return nil, fmt.Errorf("derp: expected server info, got frame 0x%02x", byte(t))
	}
	c.keepAlive = time.Duration(c.info.KeepAliveMillis) * time.Millisecond
	if c.keepAlive <= 0 {
		c.keepAlive = DefaultKeepAlive
	}
	c.idle = opts.IdleTimeout
	if c.idle == 0 {
		c.idle = 2*c.keepAlive + 5*time.Second
	}
	switch c.writeTimeout = opts.WriteTimeout; {
	case c.writeTimeout == 0:
		c.writeTimeout = DefaultClientWriteTimeout
	case c.writeTimeout < 0:
		c.writeTimeout = 0
	}
	c.start()
	return c, nil
}

func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%w (%v)", ctx.Err(), err)
	}
	return err
}

// ServerPublicKey is the relay's key, as it announced it.
func (c *Client) ServerPublicKey() netmap.NodePublic { return c.serverKey }

// ServerInfo is what the relay said about itself when it accepted us.
func (c *Client) ServerInfo() ServerInfo { return c.info }

// LocalAddr is the local address of the underlying connection.
func (c *Client) LocalAddr() net.Addr { return c.conn.LocalAddr() }

// Close ends the connection; blocked Send and Recv calls return.
func (c *Client) Close() error {
	c.closeOnce.Do(func() {
		if c.done != nil {
			close(c.done)
		}
		c.wmu.Lock()
		if c.werr == nil {
			c.werr = net.ErrClosed
		}
		c.wcond.Broadcast()
		c.wmu.Unlock()
	})
	return c.conn.Close()
}

// Send relays pkt to the node with key dst. It returns once the packet is
// queued; it blocks while the relay pushes back (rate limit, full socket
// buffers). A write error is returned by a later Send.
func (c *Client) Send(dst netmap.NodePublic, pkt []byte) error { return c.sendPacket(true, dst, pkt) }

// TrySend is Send without waiting: when the send queue is full it drops
// pkt and returns ErrQueueFull. It is for copies that are only worth
// sending if they cost the caller nothing, like a duplicate of a packet
// that also went over a direct path.
func (c *Client) TrySend(dst netmap.NodePublic, pkt []byte) error {
	return c.sendPacket(false, dst, pkt)
}

func (c *Client) sendPacket(wait bool, dst netmap.NodePublic, pkt []byte) error {
	if len(pkt) > MaxPacketSize {
		return fmt.Errorf("derp: packet of %d bytes exceeds the %d-byte limit", len(pkt), MaxPacketSize)
	}
	return c.queueFrame(wait, frameSendPacket, dst[:], pkt)
}

// SendBatch relays several packets to dst, as a WireGuard bind with
// batched writes hands them over.
func (c *Client) SendBatch(dst netmap.NodePublic, pkts [][]byte) error {
	for _, pkt := range pkts {
		if err := c.Send(dst, pkt); err != nil {
			return err
		}
	}
	return nil
}

// Ping asks the relay to answer with a Pong carrying data, to measure
// latency or check the connection is alive.
func (c *Client) Ping(data [8]byte) error { return c.queue(framePing, data[:]) }

// watchConns subscribes a mesh connection to presence events.
func (c *Client) watchConns() error { return c.queue(frameWatchConns) }

// forward sends a packet on behalf of src over a mesh connection.
func (c *Client) forward(src, dst netmap.NodePublic, pkt []byte) error {
	return c.queue(frameForwardPacket, src[:], dst[:], pkt)
}

// Recv returns the next message from the relay. Unknown frame types from a
// newer relay are skipped.
func (c *Client) Recv() (Message, error) {
	for {
		if c.rbuf == nil {
			c.rbuf = make([]byte, maxFrameLen)
		}
		if c.idle > 0 {
			// Pushing the deadline out at most every quarter of the
			// timeout keeps timer updates off the per-packet path.
			if now := time.Now(); now.Sub(c.deadlineSet) > c.idle/4 {
				if err := c.conn.SetReadDeadline(now.Add(c.idle)); err != nil {
					return nil, err
				}
				c.deadlineSet = now
			}
		}
		t, p, err := readFrame(c.br, c.rbuf)
		if err != nil {
			return nil, err
		}
		switch t {
		case frameRecvPacket:
			if len(p) < keyLen {
				return nil, fmt.Errorf("%w: receive packet frame of %d bytes", errProtocol, len(p))
			}
			return ReceivedPacket{Source: keyFrom(p), Data: p[keyLen:]}, nil
		case framePeerGone:
			if len(p) != keyLen+1 {
				return nil, fmt.Errorf("%w: peer gone frame of %d bytes", errProtocol, len(p))
			}
			return PeerGone{Key: keyFrom(p), Reason: PeerGoneReason(p[keyLen])}, nil
		case framePeerPresent:
			if len(p) != keyLen {
				return nil, fmt.Errorf("%w: peer present frame of %d bytes", errProtocol, len(p))
			}
			return PeerPresent{Key: keyFrom(p)}, nil
		case framePong:
			if len(p) != pingLen {
				return nil, fmt.Errorf("%w: pong frame of %d bytes", errProtocol, len(p))
			}
			var m Pong
			copy(m.Data[:], p)
			return m, nil
		case frameHealth:
			return Health{Problem: string(p)}, nil
		case frameKeepAlive:
			return KeepAlive{}, nil
		case framePing:
			if len(p) != pingLen {
				return nil, fmt.Errorf("%w: ping frame of %d bytes", errProtocol, len(p))
			}
			if err := c.queue(framePong, p); err != nil {
				return nil, err
			}
		}
	}
}

// NewPingData returns random ping payload.
func NewPingData() [8]byte {
	var b [8]byte
	rand.Read(b[:])
	return b
}
