package derp

import (
	"context"
	"errors"
	"fmt"
	"time"

	"meshd.dev/meshd/internal/backoff"
	"meshd.dev/meshd/netmap"
)

// meshQueueDepth bounds packets waiting to be forwarded to one mesh peer.
const meshQueueDepth = 2048

type forwardPacket struct {
	src, dst netmap.NodePublic
	buf      *[]byte
	n        int
}

// meshLink is this server's connection to one other server of its region:
// it learns which keys are connected there and forwards packets for them.
type meshLink struct {
	s   *Server
	url string
	q   chan forwardPacket
}

func (l *meshLink) enqueue(p forwardPacket) {
	select {
	case l.q <- p:
		l.s.forwarded.Add(1)
	default:
		l.s.putBuf(p.buf)
		l.s.dropped.Add(1)
	}
}

// RunMeshPeer keeps a mesh link to another server of the region at rawURL
// (pinned by fingerprint if not empty) until ctx ends, reconnecting with
// backoff. Packets for nodes connected to that server are forwarded to it.
// Both servers must run with the same MeshKey, and each must run a
// RunMeshPeer towards the other.
func (s *Server) RunMeshPeer(ctx context.Context, rawURL, fingerprint string) error {
	if len(s.meshKey) == 0 {
		return errors.New("derp: meshing needs a mesh key (--mesh-key-file)")
	}
	l := &meshLink{s: s, url: rawURL, q: make(chan forwardPacket, meshQueueDepth)}
	bo := backoff.Backoff{Min: 100 * time.Millisecond, Max: 10 * time.Second}
	for {
		start := time.Now()
		err := l.runOnce(ctx, fingerprint)
		if ctx.Err() != nil {
			return nil
		}
		if errors.Is(err, errMeshSelf) {
			return err
		}
		s.SetHealth(fmt.Sprintf("mesh peer %s unreachable: %v", rawURL, err))
		s.log.Warn("derp mesh link down", "peer", rawURL, "err", err)
		if bo.Wait(ctx, time.Since(start)) != nil {
			return nil
		}
	}
}

var errMeshSelf = errors.New("derp: mesh peer URL points at this server itself")

func (l *meshLink) runOnce(ctx context.Context, fingerprint string) error {
	s := l.s
	dctx, cancel := context.WithTimeout(ctx, s.opts.HandshakeTimeout)
	c, err := Dial(dctx, l.url, ClientOptions{NodeKey: s.priv, MeshKey: s.opts.MeshKey, CertFingerprint: fingerprint})
	cancel()
	if err != nil {
		return err
	}
	defer c.Close()
	if c.ServerPublicKey() == s.pub {
		return errMeshSelf
	}
	if err := c.watchConns(); err != nil {
		return err
	}
	s.SetHealth("")
	s.log.Info("derp mesh link up", "peer", l.url)

	ctx, cancel = context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	defer l.forgetAll()

	writeErr := make(chan error, 1)
	go func() { writeErr <- l.writeLoop(ctx, c) }()
	for {
		m, err := c.Recv()
		if err != nil {
			cancel()
			<-writeErr
			return err
		}
		switch m := m.(type) {
		case PeerPresent:
			s.mu.Lock()
			s.remote[m.Key] = l
			s.mu.Unlock()
		case PeerGone:
			s.mu.Lock()
			if s.remote[m.Key] == l {
				delete(s.remote, m.Key)
			}
			s.mu.Unlock()
		}
	}
}

func (l *meshLink) writeLoop(ctx context.Context, c *Client) error {
	for {
		var p forwardPacket
		select {
		case <-ctx.Done():
			return nil
		case p = <-l.q:
		}
		err := c.forward(p.src, p.dst, (*p.buf)[:p.n])
		l.s.putBuf(p.buf)
		if err != nil {
			c.Close()
			return err
		}
	}
}

// forgetAll drops every key learnt over this link, so packets for them get
// PeerGone instead of vanishing into a dead link.
func (l *meshLink) forgetAll() {
	s := l.s
	s.mu.Lock()
	for k, ln := range s.remote {
		if ln == l {
			delete(s.remote, k)
		}
	}
	s.mu.Unlock()
}
