package derp

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"meshd.dev/meshd/internal/backoff"
	"meshd.dev/meshd/netmap"
)

const (
	// maxHeld bounds the packets held while (re)connecting. It is small:
	// the point is the first handshake and its retries, not bulk data, which
	// WireGuard's peers retransmit anyway.
	maxHeld = 32
	// heldMaxAge drops held packets that would arrive later than
	// WireGuard's 5 s handshake retry; a newer one is on its way by then.
	heldMaxAge = 5 * time.Second
)

type pendingPacket struct {
	dst netmap.NodePublic
	pkt []byte
	at  time.Time
}

// ReconnectingClient keeps one connection to a relay up, redialing with
// jittered exponential backoff after errors and after relay restarts.
type ReconnectingClient struct {
	url  string
	opts ClientOptions
	log  *slog.Logger

	mu  sync.Mutex
	cur *Client
	// pending holds packets sent while no connection is up (the first
	// handshake to a peer is usually sent while the relay is still being
	// dialled); they go out as soon as it connects. Oldest first.
	pending []pendingPacket
}

// NewReconnectingClient returns a client for the relay at url; Run
// connects it.
func NewReconnectingClient(url string, opts ClientOptions, log *slog.Logger) *ReconnectingClient {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &ReconnectingClient{url: url, opts: opts, log: log}
}

// Connected reports whether a connection is currently up.
func (r *ReconnectingClient) Connected() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.cur != nil
}

// Send relays pkt to dst over the current connection. While there is none,
// it keeps a copy of the packet (at most maxHeld, the oldest dropped
// first) and sends it when the connection comes up, unless it is older than
// heldMaxAge by then.
func (r *ReconnectingClient) Send(dst netmap.NodePublic, pkt []byte) error {
	r.mu.Lock()
	c := r.cur
	if c == nil {
		if len(pkt) > MaxPacketSize {
			r.mu.Unlock()
			return fmt.Errorf("derp: packet of %d bytes exceeds %d", len(pkt), MaxPacketSize)
		}
		if len(r.pending) == maxHeld {
			r.pending = slices.Delete(r.pending, 0, 1)
		}
		r.pending = append(r.pending, pendingPacket{dst: dst, pkt: bytes.Clone(pkt), at: time.Now()})
		r.mu.Unlock()
		return nil
	}
	r.mu.Unlock()
	return c.Send(dst, pkt)
}

// TrySend is Send without waiting for a full send queue: the packet is
// then dropped and TrySend returns ErrQueueFull. While there is no
// connection it holds the packet as Send does.
func (r *ReconnectingClient) TrySend(dst netmap.NodePublic, pkt []byte) error {
	r.mu.Lock()
	c := r.cur
	r.mu.Unlock()
	if c == nil {
		return r.Send(dst, pkt)
	}
	return c.TrySend(dst, pkt)
}

// connect makes c the current connection after sending the packets held
// while disconnected over it. The held packets go out under r.mu, so a
// packet sent meanwhile waits and cannot overtake an older one (a handshake
// initiation must not arrive after the data that follows it). c.Send only
// waits for c's own writer, which never takes r.mu.
func (r *ReconnectingClient) connect(c *Client) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	for _, p := range r.pending {
		if now.Sub(p.at) > heldMaxAge {
			continue
		}
		if err := c.Send(p.dst, p.pkt); err != nil {
			// The connection is failing; its receive loop ends and Run
			// redials.
			r.log.Debug("derp: sending a held packet", "relay", r.url, "err", err)
			break
		}
	}
	r.pending = nil
	r.cur = c
}

// Run connects and hands every received message to handle (from this
// goroutine; ReceivedPacket data is only valid during the call) until ctx
// ends. handle may be nil.
func (r *ReconnectingClient) Run(ctx context.Context, handle func(Message)) error {
	bo := backoff.Backoff{Min: 100 * time.Millisecond, Max: 5 * time.Second}
	for {
		start := time.Now()
		dctx, cancel := context.WithTimeout(ctx, DefaultHandshakeTimeout)
		c, err := Dial(dctx, r.url, r.opts)
		cancel()
		if err == nil {
			r.connect(c)
			r.log.Debug("derp: connected", "relay", r.url)
			stop := context.AfterFunc(ctx, func() { c.Close() })
			err = r.recvLoop(c, handle)
			stop()
			r.mu.Lock()
			r.cur = nil
			r.mu.Unlock()
			c.Close()
		}
		if ctx.Err() != nil {
			return nil
		}
		r.log.Info("derp: connection to relay lost, redialing", "relay", r.url, "err", err)
		if bo.Wait(ctx, time.Since(start)) != nil {
			return nil
		}
	}
}

func (r *ReconnectingClient) recvLoop(c *Client, handle func(Message)) error {
	for {
		m, err := c.Recv()
		if err != nil {
			return err
		}
		if handle != nil {
			handle(m)
		}
	}
}
