package derp

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/curve25519"
	"golang.org/x/crypto/nacl/box"
	"golang.org/x/time/rate"

	"meshd.dev/meshd/internal/connlimit"
	"meshd.dev/meshd/netmap"
)

// upgradeProtocol is the HTTP Upgrade token of the relay protocol.
const upgradeProtocol = "meshd-derp"

// Defaults for ServerOptions fields left zero.
const (
	DefaultSendQueueDepth   = 512
	DefaultWriteTimeout     = 5 * time.Second
	DefaultHandshakeTimeout = 10 * time.Second
	DefaultKeepAlive        = 30 * time.Second

	// writeBatch bounds how many queued frames one write deadline covers, so
	// a client that reads slowly but steadily is not mistaken for a stuck one.
	writeBatch = 64
	// maxSentTo bounds the per-client memory of whom it sent to.
	maxSentTo = 4096
)

// ServerOptions configures a Server. Only PrivateKey is required.
type ServerOptions struct {
	// PrivateKey is the relay's Curve25519 key; clients seal their
	// handshake to its public half.
	PrivateKey netmap.NodePrivate
	// MeshKey is the shared secret (64 hex digits) of the servers of one
	// region. A connection presenting it may watch presence and forward
	// packets. Empty disables meshing.
	MeshKey string
	// Verify, if set, is asked about every (non-mesh) client after it has
	// proved possession of its node key; a non-nil error rejects the client
	// and is shown to it. This is the "verify clients" hook: the CLI wires
	// it to the coordinator.
	Verify func(ctx context.Context, key netmap.NodePublic) error
	// SendQueueDepth is the number of packets queued per receiving client
	// before newer packets to it are dropped.
	SendQueueDepth int
	// WriteTimeout is how long a write to a client may block before the
	// client is disconnected as a slow reader.
	WriteTimeout time.Duration
	// HandshakeTimeout bounds the upgrade-to-accepted exchange.
	HandshakeTimeout time.Duration
	// KeepAlive is the interval of keep-alive frames, sent by the server
	// and (as it tells them) by clients. A client the server heard nothing
	// from for three intervals is dropped as gone, so its peers learn it
	// left (PeerGone) instead of sending into a dead connection.
	KeepAlive time.Duration
	// ClientRate limits the bytes per second the server reads from each
	// client (0: unlimited). The limit is applied by reading slower, so TCP
	// pushes back on the noisy client alone.
	ClientRate rate.Limit
	// ClientBurst is the token bucket size in bytes; it is raised to at
	// least one maximum-size frame.
	ClientBurst int
	// Logger receives connection events; nil discards them.
	Logger *slog.Logger
}

// ServerStats are counters since the server started.
type ServerStats struct {
	Clients          int    // currently connected (excluding mesh peers)
	MeshPeers        int    // connected mesh peers watching this server
	RemoteKeys       int    // keys known to be on other servers of the region
	PacketsRelayed   uint64 // packets queued to a local client
	BytesRelayed     uint64 // their payload bytes
	PacketsForwarded uint64 // packets sent on to a mesh peer
	PacketsDropped   uint64 // queue full, unknown destination or closed
	SlowDisconnects  uint64 // clients dropped for not reading
	HandshakeErrors  uint64 // rejected or broken handshakes
	Revoked          uint64 // clients disconnected by DisconnectClient
}

// Server is a DERP relay. It is an http.Handler for the /derp upgrade
// endpoint, so it can run on its own listener or inside the coordinator.
type Server struct {
	priv    netmap.NodePrivate
	pub     netmap.NodePublic
	meshKey []byte
	opts    ServerOptions
	log     *slog.Logger

	ctx    context.Context
	cancel context.CancelFunc

	mu       sync.RWMutex
	clients  map[netmap.NodePublic]*sclient
	conns    map[*sclient]struct{} // every live connection, mesh peers too
	watchers map[*sclient]struct{}
	remote   map[netmap.NodePublic]*meshLink
	health   string

	pools [3]sync.Pool

	// revokeGen counts DisconnectClient calls, so a handshake whose Verify
	// ran before a revocation re-checks once registered (see run).
	revokeGen atomic.Uint64

	relayed, forwarded, dropped, slow, handshakeErrs, revoked atomic.Uint64
	relayedBytes                                              atomic.Uint64
}

// poolSizes are the buffer size classes: a 1500-byte underlay packet, a
// jumbo one, and the maximum.
var poolSizes = [3]int{2048, 9216 + 256, MaxPacketSize}

// NewServer returns a relay ready to serve connections.
func NewServer(opts ServerOptions) (*Server, error) {
	if opts.PrivateKey.IsZero() {
		return nil, errors.New("derp: server needs a private key")
	}
	var meshKey []byte
	if opts.MeshKey != "" {
		k, err := ParseMeshKey(opts.MeshKey)
		if err != nil {
			return nil, err
		}
		meshKey = k
	}
	if opts.SendQueueDepth <= 0 {
		opts.SendQueueDepth = DefaultSendQueueDepth
	}
	if opts.WriteTimeout <= 0 {
		opts.WriteTimeout = DefaultWriteTimeout
	}
	if opts.HandshakeTimeout <= 0 {
		opts.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if opts.KeepAlive <= 0 {
		opts.KeepAlive = DefaultKeepAlive
	}
	if min := maxFrameLen + frameHeaderLen; opts.ClientBurst < min {
		opts.ClientBurst = min
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{
		priv:     opts.PrivateKey,
		pub:      opts.PrivateKey.Public(),
		meshKey:  meshKey,
		opts:     opts,
		log:      log,
		ctx:      ctx,
		cancel:   cancel,
		clients:  make(map[netmap.NodePublic]*sclient),
		conns:    make(map[*sclient]struct{}),
		watchers: make(map[*sclient]struct{}),
		remote:   make(map[netmap.NodePublic]*meshLink),
	}
	for i, n := range poolSizes {
		s.pools[i].New = func() any { b := make([]byte, n); return &b }
	}
	return s, nil
}

// ParseMeshKey checks and decodes a region mesh key (64 hex digits).
func ParseMeshKey(s string) ([]byte, error) {
	k, err := hex.DecodeString(strings.TrimSpace(s))
	if err != nil || len(k) != 32 {
		return nil, errors.New("derp: mesh key must be 64 hex digits (32 random bytes, e.g. `openssl rand -hex 32`)")
	}
	return k, nil
}

// PublicKey is the key clients seal their handshake to.
func (s *Server) PublicKey() netmap.NodePublic { return s.pub }

// Stats returns a snapshot of the server's counters.
func (s *Server) Stats() ServerStats {
	s.mu.RLock()
	st := ServerStats{Clients: len(s.clients), MeshPeers: len(s.watchers), RemoteKeys: len(s.remote)}
	s.mu.RUnlock()
	st.PacketsRelayed = s.relayed.Load()
	st.BytesRelayed = s.relayedBytes.Load()
	st.PacketsForwarded = s.forwarded.Load()
	st.PacketsDropped = s.dropped.Load()
	st.SlowDisconnects = s.slow.Load()
	st.HandshakeErrors = s.handshakeErrs.Load()
	st.Revoked = s.revoked.Load()
	return st
}

// ClientKeys returns the node keys of the clients connected now (mesh
// peers excluded), for re-checking them against the coordinator.
func (s *Server) ClientKeys() []netmap.NodePublic {
	s.mu.RLock()
	defer s.mu.RUnlock()
	keys := make([]netmap.NodePublic, 0, len(s.clients))
	for k := range s.clients {
		keys = append(keys, k)
	}
	return keys
}

// DisconnectClient closes the connection of the client holding k, if one
// is connected, and reports whether one was. It is how a revocation (node
// deleted, expired, key rotated) takes effect on a live connection; Verify
// refusing k is what keeps it out afterwards. A client whose handshake was
// verified just before the call is re-verified once registered, so it
// cannot slip in between the check and the disconnect.
func (s *Server) DisconnectClient(k netmap.NodePublic) bool {
	s.revokeGen.Add(1)
	s.mu.RLock()
	c := s.clients[k]
	s.mu.RUnlock()
	if c == nil {
		return false
	}
	// Counted before the close, which the client sees at once: whoever
	// watches the connection end also sees the count.
	s.revoked.Add(1)
	c.close()
	s.log.Info("derp client disconnected: node key revoked", "key", k.ShortString(), "remote", c.conn.RemoteAddr())
	return true
}

// Close disconnects every client and refuses new ones. Mesh links started
// with RunMeshPeer stop when their own context ends.
func (s *Server) Close() error {
	s.cancel()
	s.mu.Lock()
	conns := make([]*sclient, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.close()
	}
	return nil
}

// SetHealth records a problem with this server ("" when healthy) and tells
// every connected client, so nodes can show why their relay misbehaves.
func (s *Server) SetHealth(problem string) {
	s.mu.Lock()
	if s.health == problem {
		s.mu.Unlock()
		return
	}
	s.health = problem
	conns := make([]*sclient, 0, len(s.clients))
	for _, c := range s.clients {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.sendCtrl(ctrlFrame{t: frameHealth, text: problem})
	}
}

// ServeHTTP accepts the relay protocol on an HTTP/1.1 Upgrade request and
// serves the connection until it ends.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !strings.EqualFold(r.Header.Get("Upgrade"), upgradeProtocol) {
		w.Header().Set("Upgrade", upgradeProtocol)
		http.Error(w, "meshd DERP relay: this endpoint speaks the relay protocol via an HTTP Upgrade to \""+upgradeProtocol+"\"", http.StatusUpgradeRequired)
		return
	}
	if s.ctx.Err() != nil {
		http.Error(w, "relay is shutting down", http.StatusServiceUnavailable)
		return
	}
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		http.Error(w, "relay needs HTTP/1.1 (connection cannot be hijacked)", http.StatusHTTPVersionNotSupported)
		return
	}
	fmt.Fprintf(brw, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: %s\r\nConnection: Upgrade\r\n\r\n", upgradeProtocol)
	if err := brw.Flush(); err != nil {
		conn.Close()
		return
	}
	// Wrap the hijacked reader so bytes it already buffered are kept; large
	// reads go straight to the connection. A client that completed the
	// handshake has proved its key (and passed Verify): its connection is
	// no longer subject to the listener's unauthenticated-connection
	// deadline, if it came from a connlimit.Listener.
	s.serveConn(conn, bufio.NewReaderSize(brw.Reader, 64<<10), func() { connlimit.Authenticate(r.Context()) })
}

// ServeConn runs the relay protocol on an already upgraded connection whose
// buffered reader is br, and returns when the connection ends.
func (s *Server) ServeConn(conn net.Conn, br *bufio.Reader) { s.serveConn(conn, br, nil) }

func (s *Server) serveConn(conn net.Conn, br *bufio.Reader, authenticated func()) {
	defer conn.Close()
	bw := bufio.NewWriterSize(conn, 64<<10)
	c, err := s.handshake(conn, br, bw)
	if err != nil {
		s.handshakeErrs.Add(1)
		s.log.Debug("derp handshake failed", "remote", conn.RemoteAddr(), "err", err)
		return
	}
	if authenticated != nil {
		authenticated()
	}
	s.run(c)
}

type clientInfo struct {
	Version int    `json:"version"`
	MeshKey string `json:"mesh_key,omitempty"`
}

// ServerInfo is what the relay tells an accepted client about itself.
type ServerInfo struct {
	Version int `json:"version"`
	// RateBytesPerSec and BurstBytes describe the per-client limit (0: none).
	RateBytesPerSec int `json:"rate_bytes_per_sec,omitempty"`
	BurstBytes      int `json:"burst_bytes,omitempty"`
	// KeepAliveMillis is how often the server sends keep-alives and the
	// client must send something (a keep-alive when idle).
	KeepAliveMillis int64 `json:"keep_alive_ms"`
}

// errRejected is a handshake failure the client is told about.
type errRejected struct{ msg string }

func (e *errRejected) Error() string { return e.msg }

func (s *Server) handshake(conn net.Conn, br *bufio.Reader, bw *bufio.Writer) (*sclient, error) {
	ctx, cancel := context.WithTimeout(s.ctx, s.opts.HandshakeTimeout)
	defer cancel()
	if err := conn.SetDeadline(time.Now().Add(s.opts.HandshakeTimeout)); err != nil {
		return nil, err
	}
	var nonce [nonceLen]byte
	rand.Read(nonce[:])
	if err := writeFrame(bw, frameServerKey, []byte(magic), s.pub[:], nonce[:]); err != nil {
		return nil, err
	}
	if err := bw.Flush(); err != nil {
		return nil, err
	}
	reject := func(msg string) (*sclient, error) {
		writeFrame(bw, frameHealth, []byte(msg))
		bw.Flush()
		return nil, &errRejected{msg}
	}
	// Check the type before reading a payload: an unauthenticated peer
	// must not make us buffer anything but a client info.
	t, n, err := readFrameHeader(br)
	if err != nil {
		return nil, fmt.Errorf("read client info: %w", err)
	}
	if t != frameClientInfo {
		return reject(fmt.Sprintf("protocol error: expected client info frame, got type 0x%02x", byte(t)))
	}
	payload := make([]byte, n)
	if _, err := io.ReadFull(br, payload); err != nil {
		return nil, fmt.Errorf("read client info: %w", err)
	}
	if len(payload) < keyLen+box.Overhead {
		return reject("protocol error: client info frame too short")
	}
	clientKey := keyFrom(payload[:keyLen])
	// curve25519.X25519 refuses low-order points, whose shared secret is
	// all zeros and would let anyone seal to them; box.Open does not check.
	// Non-canonical encodings would let one key register under several
	// byte strings.
	if _, err := curve25519.X25519(s.priv[:], clientKey[:]); err != nil || !clientKey.IsCanonical() {
		return reject("client node key is not a valid Curve25519 public key")
	}
	plain, ok := box.Open(nil, payload[keyLen:], &nonce, (*[32]byte)(&clientKey), (*[32]byte)(&s.priv))
	if !ok {
		return reject("client info does not open with the claimed node key: the client does not hold that key")
	}
	var ci clientInfo
	if err := json.Unmarshal(plain, &ci); err != nil {
		return reject("client info: " + err.Error())
	}
	isMesh := false
	var gen uint64
	if ci.MeshKey != "" {
		got, err := hex.DecodeString(ci.MeshKey)
		if len(s.meshKey) == 0 || err != nil || subtle.ConstantTimeCompare(got, s.meshKey) != 1 {
			return reject("mesh key rejected: this server is not configured with the same --mesh-key-file")
		}
		isMesh = true
	} else if s.opts.Verify != nil {
		gen = s.revokeGen.Load()
		if err := s.opts.Verify(ctx, clientKey); err != nil {
			return reject(fmt.Sprintf("node %s not accepted by this relay: %v", clientKey.ShortString(), err))
		}
	}
	info := ServerInfo{Version: ProtocolVersion, KeepAliveMillis: s.opts.KeepAlive.Milliseconds()}
	if s.opts.ClientRate > 0 && s.opts.ClientRate != rate.Inf {
		info.RateBytesPerSec = int(s.opts.ClientRate)
		info.BurstBytes = s.opts.ClientBurst
	}
	c := &sclient{
		s:       s,
		key:     clientKey,
		mesh:    isMesh,
		conn:    conn,
		br:      br,
		bw:      bw,
		sendq:   make(chan queuedPacket, s.opts.SendQueueDepth),
		ctrlq:   make(chan ctrlFrame, 64),
		done:    make(chan struct{}),
		sentTo:  make(map[*sclient]struct{}),
		senders: make(map[netmap.NodePublic]struct{}),
		presSig: make(chan struct{}, 1),
		gen:     gen,
	}
	c.info, _ = json.Marshal(info)
	if s.opts.ClientRate > 0 {
		c.limiter = rate.NewLimiter(s.opts.ClientRate, s.opts.ClientBurst)
	}
	return c, nil
}

// run registers c, serves it and unregisters it when it ends.
func (s *Server) run(c *sclient) {
	s.mu.Lock()
	if s.ctx.Err() != nil {
		s.mu.Unlock()
		return
	}
	s.conns[c] = struct{}{}
	var old *sclient
	health := s.health
	if !c.mesh {
		// The newest connection for a key wins: a node that reconnects
		// before its old TCP connection timed out must get its packets.
		old = s.clients[c.key]
		s.clients[c.key] = c
		for w := range s.watchers {
			w.notePresence(c.key, true)
		}
	}
	s.mu.Unlock()
	if old != nil {
		old.close()
	}
	if !c.mesh && s.opts.Verify != nil && s.revokeGen.Load() != c.gen {
		// A revocation ran after our Verify and may have missed c because
		// it was not registered yet: ask again now that it is.
		ctx, cancel := context.WithTimeout(s.ctx, s.opts.HandshakeTimeout)
		err := s.opts.Verify(ctx, c.key)
		cancel()
		if err != nil {
			s.handshakeErrs.Add(1)
			c.setWriteDeadline()
			writeFrame(c.bw, frameHealth, []byte(fmt.Sprintf("node %s not accepted by this relay: %v", c.key.ShortString(), err)))
			c.bw.Flush()
			c.close()
			s.unregister(c)
			return
		}
	}
	// Server info goes out only now that c is registered: a client whose
	// Dial returned can be sent to at once.
	c.setWriteDeadline()
	err := writeFrame(c.bw, frameServerInfo, c.info)
	if err == nil {
		err = c.bw.Flush()
	}
	if err == nil {
		err = c.conn.SetDeadline(time.Time{})
	}
	if err != nil {
		c.close()
		s.unregister(c)
		return
	}
	if health != "" {
		c.sendCtrl(ctrlFrame{t: frameHealth, text: health})
	}
	s.log.Debug("derp client connected", "key", c.key.ShortString(), "mesh", c.mesh, "remote", c.conn.RemoteAddr())

	writeErr := make(chan error, 1)
	go func() { writeErr <- c.writeLoop() }()
	err = c.readLoop()
	c.close()
	if werr := <-writeErr; werr != nil && err == nil {
		err = werr
	}
	s.unregister(c)
	s.log.Debug("derp client disconnected", "key", c.key.ShortString(), "mesh", c.mesh, "err", err)
}

func (s *Server) unregister(c *sclient) {
	s.mu.Lock()
	delete(s.conns, c)
	delete(s.watchers, c)
	gone := false
	if !c.mesh && s.clients[c.key] == c {
		delete(s.clients, c.key)
		gone = true
		for w := range s.watchers {
			w.notePresence(c.key, false)
		}
	}
	var notify []*sclient
	if gone {
		c.sendersMu.Lock()
		for k := range c.senders {
			if sc := s.clients[k]; sc != nil {
				notify = append(notify, sc)
			}
		}
		c.sendersMu.Unlock()
	}
	s.mu.Unlock()
	for _, sc := range notify {
		sc.sendCtrl(ctrlFrame{t: framePeerGone, key: c.key, reason: PeerGoneDisconnected})
	}
}

func (s *Server) getBuf(n int) *[]byte {
	for i, size := range poolSizes {
		if n <= size {
			return s.pools[i].Get().(*[]byte)
		}
	}
	b := make([]byte, n)
	return &b
}

func (s *Server) putBuf(b *[]byte) {
	for i, size := range poolSizes {
		if cap(*b) == size {
			s.pools[i].Put(b)
			return
		}
	}
}

// deliver routes a packet from src to dst: to a local client, else to the
// mesh peer that has dst, else it is dropped and src is told dst is absent.
func (s *Server) deliver(src *sclient, p queuedPacket, dst netmap.NodePublic) {
	s.mu.RLock()
	d := s.clients[dst]
	var link *meshLink
	if d == nil {
		link = s.remote[dst]
	}
	s.mu.RUnlock()
	switch {
	case d != nil:
		src.noteSentTo(d)
		d.enqueue(p)
	case link != nil:
		link.enqueue(forwardPacket{src: p.src, dst: dst, buf: p.buf, n: p.n})
	default:
		s.putBuf(p.buf)
		s.dropped.Add(1)
		src.sendCtrl(ctrlFrame{t: framePeerGone, key: dst, reason: PeerGoneNotHere})
	}
}

// deliverLocal delivers a packet a mesh peer forwarded. It is never
// forwarded again, so a mesh cannot loop packets.
func (s *Server) deliverLocal(p queuedPacket, dst netmap.NodePublic) {
	s.mu.RLock()
	d := s.clients[dst]
	s.mu.RUnlock()
	if d == nil {
		s.putBuf(p.buf)
		s.dropped.Add(1)
		return
	}
	d.enqueue(p)
}

func (s *Server) addWatcher(c *sclient) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.watchers[c]; ok {
		return
	}
	s.watchers[c] = struct{}{}
	for k := range s.clients {
		c.notePresence(k, true)
	}
}

type queuedPacket struct {
	src netmap.NodePublic
	buf *[]byte
	n   int
}

type ctrlFrame struct {
	t      frameType
	key    netmap.NodePublic
	reason PeerGoneReason
	ping   [pingLen]byte
	text   string
}

// sclient is the server side of one connection.
type sclient struct {
	s       *Server
	key     netmap.NodePublic
	mesh    bool
	gen     uint64 // s.revokeGen before Verify ran
	info    []byte // server info JSON, sent once registered
	conn    net.Conn
	br      *bufio.Reader
	bw      *bufio.Writer
	limiter *rate.Limiter

	sendq chan queuedPacket
	ctrlq chan ctrlFrame
	done  chan struct{}
	once  sync.Once

	// sentTo is touched only by the read loop: it remembers which clients
	// this one already registered with as a sender, so the per-packet path
	// takes no extra lock.
	sentTo    map[*sclient]struct{}
	sendersMu sync.Mutex
	senders   map[netmap.NodePublic]struct{}

	// Presence events for a watching mesh peer, coalesced per key so the
	// backlog is bounded by the number of clients, never dropped.
	presMu  sync.Mutex
	pending map[netmap.NodePublic]bool
	presSig chan struct{}
}

func (c *sclient) close() {
	c.once.Do(func() {
		close(c.done)
		c.conn.Close()
	})
}

func (c *sclient) enqueue(p queuedPacket) {
	select {
	case c.sendq <- p:
		c.s.relayed.Add(1)
		c.s.relayedBytes.Add(uint64(p.n))
	default:
		c.s.putBuf(p.buf)
		c.s.dropped.Add(1)
	}
}

// sendCtrl queues a control frame; control frames are small and rare, and
// one lost to a full queue is repaired by the next event.
func (c *sclient) sendCtrl(f ctrlFrame) {
	select {
	case c.ctrlq <- f:
	default:
	}
}

func (c *sclient) noteSentTo(d *sclient) {
	if _, ok := c.sentTo[d]; ok {
		return
	}
	if len(c.sentTo) >= maxSentTo {
		clear(c.sentTo)
	}
	c.sentTo[d] = struct{}{}
	d.sendersMu.Lock()
	if len(d.senders) < maxSentTo {
		d.senders[c.key] = struct{}{}
	}
	d.sendersMu.Unlock()
}

func (c *sclient) notePresence(k netmap.NodePublic, present bool) {
	c.presMu.Lock()
	if c.pending == nil {
		c.pending = make(map[netmap.NodePublic]bool)
	}
	c.pending[k] = present
	c.presMu.Unlock()
	select {
	case c.presSig <- struct{}{}:
	default:
	}
}

var errProtocol = errors.New("derp: protocol violation")

func (c *sclient) readLoop() error {
	s := c.s
	var small [2 * keyLen]byte
	idle := 3 * s.opts.KeepAlive
	var deadlineSet time.Time
	for {
		// Pushed out at most every quarter of the timeout, to keep timer
		// updates off the per-packet path.
		if now := time.Now(); now.Sub(deadlineSet) > idle/4 {
			if err := c.conn.SetReadDeadline(now.Add(idle)); err != nil {
				return err
			}
			deadlineSet = now
		}
		t, n, err := readFrameHeader(c.br)
		if err != nil {
			return err
		}
		if c.limiter != nil {
			if err := c.limiter.WaitN(s.ctx, int(n)+frameHeaderLen); err != nil {
				return err
			}
		}
		switch t {
		case frameSendPacket:
			if n < keyLen {
				return fmt.Errorf("%w: send packet frame of %d bytes", errProtocol, n)
			}
			if _, err := io.ReadFull(c.br, small[:keyLen]); err != nil {
				return err
			}
			pn := int(n) - keyLen
			buf := s.getBuf(pn)
			if _, err := io.ReadFull(c.br, (*buf)[:pn]); err != nil {
				s.putBuf(buf)
				return err
			}
			s.deliver(c, queuedPacket{src: c.key, buf: buf, n: pn}, keyFrom(small[:keyLen]))
		case frameForwardPacket:
			if !c.mesh {
				return fmt.Errorf("%w: forward packet from a client that is not a mesh peer", errProtocol)
			}
			if n < 2*keyLen {
				return fmt.Errorf("%w: forward packet frame of %d bytes", errProtocol, n)
			}
			if _, err := io.ReadFull(c.br, small[:]); err != nil {
				return err
			}
			pn := int(n) - 2*keyLen
			buf := s.getBuf(pn)
			if _, err := io.ReadFull(c.br, (*buf)[:pn]); err != nil {
				s.putBuf(buf)
				return err
			}
			s.deliverLocal(queuedPacket{src: keyFrom(small[:keyLen]), buf: buf, n: pn}, keyFrom(small[keyLen:]))
		case framePing:
			if n != pingLen {
				return fmt.Errorf("%w: ping frame of %d bytes", errProtocol, n)
			}
			f := ctrlFrame{t: framePong}
			if _, err := io.ReadFull(c.br, f.ping[:]); err != nil {
				return err
			}
			c.sendCtrl(f)
		case frameWatchConns:
			if !c.mesh {
				return fmt.Errorf("%w: watch from a client that is not a mesh peer", errProtocol)
			}
			s.addWatcher(c)
		default:
			// Keep-alives, pongs and frame types from newer clients.
			if _, err := c.br.Discard(int(n)); err != nil {
				return err
			}
		}
	}
}

func (c *sclient) writeLoop() (err error) {
	ka := time.NewTicker(c.s.opts.KeepAlive)
	defer ka.Stop()
	defer func() {
		if errors.Is(err, errSlow) {
			c.s.slow.Add(1)
		}
		if err != nil {
			c.close()
		}
	}()
	for {
		select {
		case <-c.done:
			return nil
		case p := <-c.sendq:
			c.setWriteDeadline()
			err = c.writePacket(p)
		case f := <-c.ctrlq:
			c.setWriteDeadline()
			err = c.writeCtrl(f)
		case <-c.presSig:
			c.setWriteDeadline()
			err = c.writePresence()
		case <-ka.C:
			c.setWriteDeadline()
			err = writeFrameHeader(c.bw, frameKeepAlive, 0)
		}
		// Drain what is already queued before one flush: under load this
		// turns many small packets into few large writes.
	drain:
		for i := 0; err == nil && i < writeBatch; i++ {
			select {
			case p := <-c.sendq:
				err = c.writePacket(p)
			case f := <-c.ctrlq:
				err = c.writeCtrl(f)
			default:
				break drain
			}
		}
		if err == nil {
			err = c.bw.Flush()
		}
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return fmt.Errorf("%w: %v", errSlow, err)
			}
			return err
		}
	}
}

var errSlow = errors.New("derp: client not reading, disconnected")

func (c *sclient) setWriteDeadline() {
	c.conn.SetWriteDeadline(time.Now().Add(c.s.opts.WriteTimeout))
}

func (c *sclient) writePacket(p queuedPacket) error {
	defer c.s.putBuf(p.buf)
	if err := writeFrameHeader(c.bw, frameRecvPacket, keyLen+p.n); err != nil {
		return err
	}
	if _, err := c.bw.Write(p.src[:]); err != nil {
		return err
	}
	_, err := c.bw.Write((*p.buf)[:p.n])
	return err
}

func (c *sclient) writeCtrl(f ctrlFrame) error {
	switch f.t {
	case framePeerGone:
		return writeFrame(c.bw, framePeerGone, f.key[:], []byte{byte(f.reason)})
	case framePong:
		return writeFrame(c.bw, framePong, f.ping[:])
	case frameHealth:
		text := f.text
		if len(text) > maxInfoLen {
			text = text[:maxInfoLen]
		}
		return writeFrame(c.bw, frameHealth, []byte(text))
	}
	return fmt.Errorf("derp: internal: unexpected control frame 0x%02x", byte(f.t))
}

func (c *sclient) writePresence() error {
	c.presMu.Lock()
	pending := c.pending
	c.pending = nil
	c.presMu.Unlock()
	for k, present := range pending {
		var err error
		if present {
			err = writeFrame(c.bw, framePeerPresent, k[:])
		} else {
			err = writeFrame(c.bw, framePeerGone, k[:], []byte{byte(PeerGoneDisconnected)})
		}
		if err != nil {
			return err
		}
		// Presence of thousands of clients can exceed one flush's worth;
		// keep the deadline moving while the peer keeps reading.
		c.setWriteDeadline()
	}
	return nil
}
