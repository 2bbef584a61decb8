package derp

import (
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"meshd.dev/meshd/netmap"
)

// ErrNotConnected is returned by ReconnectingClient.Send while it has no
// connection; the caller's packet is dropped, as a lossy link would.
var ErrNotConnected = errors.New("derp: not connected to the relay")

// ReconnectingClient keeps one connection to a relay up, redialing with
// jittered exponential backoff after errors and after relay restarts.
type ReconnectingClient struct {
	url  string
	opts ClientOptions
	log  *slog.Logger

	mu  sync.Mutex
	cur *Client
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

// Send relays pkt to dst over the current connection.
func (r *ReconnectingClient) Send(dst netmap.NodePublic, pkt []byte) error {
	r.mu.Lock()
	c := r.cur
	r.mu.Unlock()
	if c == nil {
		return ErrNotConnected
	}
	return c.Send(dst, pkt)
}

// Run connects and hands every received message to handle (from this
// goroutine; ReceivedPacket data is only valid during the call) until ctx
// ends. handle may be nil.
func (r *ReconnectingClient) Run(ctx context.Context, handle func(Message)) error {
	const (
		minBackoff = 100 * time.Millisecond
		maxBackoff = 5 * time.Second
		// A connection that lasted this long resets the backoff.
		stable = 10 * time.Second
	)
	backoff := minBackoff
	for {
		start := time.Now()
		dctx, cancel := context.WithTimeout(ctx, DefaultHandshakeTimeout)
		c, err := Dial(dctx, r.url, r.opts)
		cancel()
		if err == nil {
			r.mu.Lock()
			r.cur = c
			r.mu.Unlock()
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
		if time.Since(start) > stable {
			backoff = minBackoff
		}
		// Jitter keeps a relay restart from being hit by every node at once.
		wait := backoff/2 + rand.N(backoff/2+1)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		backoff = min(2*backoff, maxBackoff)
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
