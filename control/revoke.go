package control

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/internal/backoff"
	"meshd.dev/meshd/internal/clock"
	"meshd.dev/meshd/netmap"
)

// Revocation: a node key stops being valid when its node is deleted,
// expired (by the administrator or the expiry sweep) or re-keyed. Relays
// check a key only when a client connects, so the coordinator pushes every
// revoked key to them and they close that client's connection at once:
//
//   - the embedded relay subscribes in-process (EnforceRevocations);
//   - standalone relays (`meshd derp --coordinator`) hold a stream,
//     GET /relay/v1/revocations with the relay token, and re-check all
//     their clients in one batch (POST /relay/v1/verify) each time that
//     stream (re)opens, so a revocation missed while it was down, or while
//     the coordinator restarted, is caught up (RelayVerifier.Watch).
//
// This is the push-plus-resync model of the map stream itself; a periodic
// re-check would bound the delay by its period, the push bounds it by a
// network round trip.

// RelayClients is the part of a relay (derp.Server) that revocations act on.
type RelayClients interface {
	// ClientKeys lists the node keys connected now.
	ClientKeys() []netmap.NodePublic
	// DisconnectClient closes the connection of the client holding k.
	DisconnectClient(k netmap.NodePublic) bool
}

const (
	relayRevocationsPath = "/relay/v1/revocations"
	// keyFeedBuffer is how many revocations a watcher may lag behind before
	// it is cut off and must re-check every client instead.
	keyFeedBuffer = 4096
	// maxVerifyBatch bounds the keys of one POST /relay/v1/verify (about
	// 75 bytes each, well inside the request size limit).
	maxVerifyBatch = 512
)

// keyFeed fans revoked node keys out to watchers without ever blocking the
// hub: a watcher that falls behind is cut off (lost is closed) and
// resynchronises.
type keyFeed struct {
	mu   sync.Mutex
	subs map[*keySub]struct{}
}

type keySub struct {
	ch   chan netmap.NodePublic
	lost chan struct{} // closed when the feed dropped this watcher
}

func (f *keyFeed) subscribe() *keySub {
	sub := &keySub{ch: make(chan netmap.NodePublic, keyFeedBuffer), lost: make(chan struct{})}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.subs == nil {
		f.subs = make(map[*keySub]struct{})
	}
	f.subs[sub] = struct{}{}
	return sub
}

func (f *keyFeed) unsubscribe(sub *keySub) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.subs, sub)
}

// publish is called by the hub with its lock held: it must not block.
func (f *keyFeed) publish(k netmap.NodePublic) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for sub := range f.subs {
		select {
		case sub.ch <- k:
		default:
			delete(f.subs, sub)
			close(sub.lost)
		}
	}
}

// EnforceRevocations makes the relay embedded in this coordinator drop a
// client as soon as its node key is revoked (node deleted, expired,
// re-keyed), until ctx ends. Its Verify must be s.VerifyNodeKey, which
// then refuses the key on reconnect. Clients already connected are checked
// once at the start.
func (s *Server) EnforceRevocations(ctx context.Context, relay RelayClients) {
	for ctx.Err() == nil {
		sub := s.keys.subscribe()
		// Subscribed first, then checked: a revocation between the two is
		// seen by one or the other.
		now := s.now()
		for _, k := range relay.ClientKeys() {
			if !s.nodeKeyValid(k, now) {
				relay.DisconnectClient(k)
			}
		}
		s.drainRevocations(ctx, sub, relay.DisconnectClient)
		s.keys.unsubscribe(sub)
		if ctx.Err() == nil {
			s.log.Warn("relay fell behind on key revocations; re-checking every client")
		}
	}
}

// drainRevocations hands revoked keys to revoke until ctx ends or the feed
// drops sub.
func (s *Server) drainRevocations(ctx context.Context, sub *keySub, revoke func(netmap.NodePublic) bool) {
	for {
		select {
		case k := <-sub.ch:
			revoke(k)
		case <-sub.lost:
			// Hand over what was queued before the drop, then resync.
			for {
				select {
				case k := <-sub.ch:
					revoke(k)
				default:
					return
				}
			}
		case <-ctx.Done():
			return
		}
	}
}

// RelayRevocation is one line of the GET /relay/v1/revocations stream
// (newline-delimited JSON). The first line has Ready set: from then on every
// revoked key is sent. Lines with neither field are keep-alives, sent at
// the interval in the Meshd-Keep-Alive-Ms header.
type RelayRevocation struct {
	Ready   bool               `json:"ready,omitempty"`
	Revoked *netmap.NodePublic `json:"revoked,omitempty"`
}

// RelayVerifyBatchRequest is the body of POST /relay/v1/verify.
type RelayVerifyBatchRequest struct {
	Keys []netmap.NodePublic `json:"keys"`
}

// RelayVerifyBatchResponse answers it: Known[i] is about Keys[i].
type RelayVerifyBatchResponse struct {
	Known []bool `json:"known"`
}

// relayRoutes serves the batch check and the revocation stream to holders
// of the relay token (checked by auth).
func (s *Server) relayRoutes(auth func(http.ResponseWriter, *http.Request) bool) {
	s.mux.HandleFunc("POST "+relayVerifyPath, func(w http.ResponseWriter, r *http.Request) {
		if !auth(w, r) {
			return
		}
		var req RelayVerifyBatchRequest
		if err := decodeBody(r, &req); err != nil {
			s.writeError(w, r, err)
			return
		}
		if len(req.Keys) > maxVerifyBatch {
			s.writeError(w, r, fmt.Errorf("%w: %d keys in one request, at most %d", controlclient.ErrBadRequest, len(req.Keys), maxVerifyBatch))
			return
		}
		now := s.now()
		out := RelayVerifyBatchResponse{Known: make([]bool, len(req.Keys))}
		for i, k := range req.Keys {
			out.Known[i] = s.nodeKeyValid(k, now)
		}
		writeJSON(w, http.StatusOK, out)
	})
	s.mux.HandleFunc("GET "+relayRevocationsPath, func(w http.ResponseWriter, r *http.Request) {
		if !auth(w, r) {
			return
		}
		s.serveRevocations(w, r)
	})
}

func (s *Server) serveRevocations(w http.ResponseWriter, r *http.Request) {
	// Taken after auth checked the token: a rotation from here on ends
	// the stream, and the relay must come back with the new token.
	rotated := s.relayEpoch.current()
	sub := s.keys.subscribe()
	defer s.keys.unsubscribe(sub)
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.Header().Set(controlclient.KeepAliveHeader, strconv.FormatInt(s.opts.KeepAliveInterval.Milliseconds(), 10))
	w.WriteHeader(http.StatusOK)
	enc := json.NewEncoder(w)
	send := func(v RelayRevocation) bool {
		rc.SetWriteDeadline(time.Now().Add(writeTimeout))
		return enc.Encode(v) == nil && rc.Flush() == nil
	}
	if !send(RelayRevocation{Ready: true}) {
		return
	}
	ka := s.clock.NewTicker(s.opts.KeepAliveInterval)
	defer ka.Stop()
	for {
		select {
		case k := <-sub.ch:
			if !send(RelayRevocation{Revoked: &k}) {
				return
			}
		case <-sub.lost:
			// Ending the stream makes the relay reconnect and re-check all
			// of its clients, which covers what was not sent.
			s.log.Warn("relay fell behind on key revocations; closing its stream so it re-checks its clients", "remote", r.RemoteAddr)
			return
		case <-ka.C():
			if !send(RelayRevocation{}) {
				return
			}
		case <-rotated:
			s.log.Info("relay token rotated: closing a revocation stream opened with the old one", "remote", r.RemoteAddr)
			return
		case <-r.Context().Done():
			return
		}
	}
}

// Watch keeps relay's clients in line with the coordinator until ctx ends:
// it holds the coordinator's revocation stream, disconnecting each revoked
// key's client and caching the key as unknown (so a reconnect is refused),
// and every time the stream opens it re-checks every connected client in
// batches. It reconnects with backoff and jitter, and returns ctx.Err().
func (v *RelayVerifier) Watch(ctx context.Context, relay RelayClients) error {
	bo := backoff.Backoff{Min: time.Second, Max: 30 * time.Second}
	for {
		start := v.clock.Now()
		err := v.watchOnce(ctx, relay)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		v.opts.Logger.Warn("relay: revocation stream from the coordinator ended; reconnecting", "err", err)
		if err := clock.Sleep(ctx, v.clock, bo.Delay(v.clock.Now().Sub(start))); err != nil {
			return err
		}
	}
}

// watchOnce runs one revocation stream until it fails.
func (v *RelayVerifier) watchOnce(ctx context.Context, relay RelayClients) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	base := v.base()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base.JoinPath(relayRevocationsPath).String(), nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+v.token)
	resp, err := v.stream.Do(req)
	if err != nil {
		v.failover(ctx, base, err)
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return controlclient.ReadAPIError(resp)
	}
	// A stream that goes quiet for three keep-alive intervals is dead.
	idle := 3 * time.Minute
	if ms, err := strconv.ParseInt(resp.Header.Get(controlclient.KeepAliveHeader), 10, 64); err == nil && ms > 0 {
		idle = 3 * time.Duration(min(ms, time.Hour.Milliseconds())) * time.Millisecond
	}
	watchdog := v.clock.AfterFunc(idle, cancel)
	defer watchdog.Stop()
	return v.readRevocations(ctx, resp.Body, relay, func() { watchdog.Reset(idle) })
}

// readRevocations acts on a revocation stream: a resync at the ready line,
// a disconnect per revoked key. alive is called for every line.
func (v *RelayVerifier) readRevocations(ctx context.Context, body io.Reader, relay RelayClients, alive func()) error {
	opened := false
	sc := bufio.NewScanner(body)
	sc.Buffer(make([]byte, 0, 512), 4096)
	for sc.Scan() {
		alive()
		var line RelayRevocation
		if err := json.Unmarshal(sc.Bytes(), &line); err != nil {
			return fmt.Errorf("revocation stream: %w", err)
		}
		switch {
		case line.Ready && !opened:
			opened = true
			if err := v.resync(ctx, relay); err != nil {
				return err
			}
		case line.Revoked != nil:
			v.revoke(*line.Revoked, relay)
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("revocation stream: %w", err)
	}
	return errors.New("revocation stream: coordinator closed it")
}

// revoke caches k as unknown (a reconnect is refused without waiting for
// the negative answer to be asked for) and disconnects its client.
func (v *RelayVerifier) revoke(k netmap.NodePublic, relay RelayClients) {
	v.markRevoked(k, v.clock.Now())
	if relay.DisconnectClient(k) {
		v.opts.Logger.Info("relay: disconnected a node the coordinator revoked", "node", k.ShortString())
	}
}

// resync asks the coordinator about every connected client at once and
// disconnects those it no longer knows.
func (v *RelayVerifier) resync(ctx context.Context, relay RelayClients) error {
	v.mu.Lock()
	gen := v.revGen
	v.mu.Unlock()
	keys := relay.ClientKeys()
	for len(keys) > 0 {
		batch := keys[:min(len(keys), maxVerifyBatch)]
		keys = keys[len(batch):]
		var out RelayVerifyBatchResponse
		if err := controlclient.DoJSON(ctx, v.hc, http.MethodPost, v.base().JoinPath(relayVerifyPath).String(), v.token,
			RelayVerifyBatchRequest{Keys: batch}, &out, nil); err != nil {
			return fmt.Errorf("re-check connected clients: %w", err)
		}
		if len(out.Known) != len(batch) {
			return fmt.Errorf("re-check connected clients: coordinator answered %d of %d keys", len(out.Known), len(batch))
		}
		now := v.clock.Now()
		for i, k := range batch {
			if !v.store(k, out.Known[i], now, gen) {
				v.revoke(k, relay)
			}
		}
	}
	return nil
}
