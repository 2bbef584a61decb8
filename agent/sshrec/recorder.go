package sshrec

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"time"

	"meshd.dev/meshd/agent/whois"
	"meshd.dev/meshd/netmap"
)

// Recorder receives session streams and writes each to a cast file in
// Dir.
type Recorder struct {
	Dir    string
	WhoIs  func(netip.Addr) (*whois.Response, bool)
	Logger *slog.Logger

	mu    sync.Mutex
	conns map[net.Conn]struct{}
}

// Serve accepts streams on ln until it is closed.
func (r *Recorder) Serve(ln net.Listener) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		r.mu.Lock()
		if r.conns == nil {
			r.conns = map[net.Conn]struct{}{}
		}
		r.conns[c] = struct{}{}
		r.mu.Unlock()
		go func() {
			defer func() {
				r.mu.Lock()
				delete(r.conns, c)
				r.mu.Unlock()
			}()
			if err := r.receive(c); err != nil {
				r.Logger.Warn("recorder: stream", "remote", c.RemoteAddr(), "err", err)
			}
		}()
	}
}

// CloseConns ends every stream being received.
func (r *Recorder) CloseConns() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for c := range r.conns {
		c.Close()
	}
}

func (r *Recorder) receive(c net.Conn) error {
	defer c.Close()
	ap, err := netip.ParseAddrPort(c.RemoteAddr().String())
	if err != nil {
		return err
	}
	who, ok := r.WhoIs(ap.Addr().Unmap())
	if !ok || who.Self {
		// Only peers, authenticated by WireGuard, may write recordings.
		return fmt.Errorf("refused: %v is not a peer", ap.Addr())
	}
	br := bufio.NewReaderSize(c, 64<<10)
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	line, err := readLine(br)
	if err != nil {
		return fmt.Errorf("header: %w", err)
	}
	h, err := ParseHeader(line)
	if err != nil {
		return err
	}
	h.Meshd.Sender = &netmap.SSHCaller{NodeID: who.Node.ID, Hostname: who.Node.Hostname, User: who.User, Tags: who.Node.Tags}
	hb, err := json.Marshal(h)
	if err != nil {
		return err
	}
	var rnd [4]byte
	rand.Read(rnd[:])
	name := fmt.Sprintf("%s-%s-%d-%s.cast", time.Now().UTC().Format("20060102T150405Z"), who.Node.Hostname, who.Node.ID, hex.EncodeToString(rnd[:]))
	path := filepath.Join(r.Dir, name)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("create cast: %w", err)
	}
	defer f.Close()
	r.Logger.Info("recording", "file", path, "sender", who.Node.Hostname, "caller", h.Meshd.Caller.Hostname, "local_user", h.Meshd.LocalUser)
	if _, err := f.Write(append(hb, '\n')); err != nil {
		return fmt.Errorf("write cast: %w", err)
	}
	stop := make(chan struct{})
	defer close(stop)
	go heartbeat(c, stop)
	for {
		// Sessions may idle for long; the sender's TCP keep-alives and
		// the tailnet's detect a vanished sender.
		c.SetReadDeadline(time.Time{})
		line, err := readLine(br)
		if err != nil {
			f.Sync()
			r.Logger.Info("recording ended", "file", path, "err", err)
			return nil
		}
		if _, err := ParseEvent(line); err != nil {
			f.Sync()
			return fmt.Errorf("%s: %w", path, err)
		}
		// Each event is written as it arrives: a recording survives
		// the session's node dying mid-session.
		if _, err := f.Write(append(line, '\n')); err != nil {
			return fmt.Errorf("write cast: %w", err)
		}
	}
}

// Heartbeat is how often the recorder tells the sender it is alive (a
// newline on the otherwise silent reverse direction); a sender that hears
// nothing for HeartbeatTimeout counts the recorder as lost. TCP alone
// would not notice a recorder that vanished (its node's WireGuard goes
// quiet; no reset ever comes) before minutes of retransmissions.
const (
	Heartbeat        = 3 * time.Second
	HeartbeatTimeout = 4 * Heartbeat
)

func heartbeat(c net.Conn, stop <-chan struct{}) {
	t := time.NewTicker(Heartbeat)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			c.SetWriteDeadline(time.Now().Add(HeartbeatTimeout))
			if _, err := c.Write([]byte{'\n'}); err != nil {
				return
			}
		}
	}
}

// readLine reads one line of at most MaxLine bytes, without its newline.
func readLine(br *bufio.Reader) ([]byte, error) {
	var out []byte
	for {
		frag, err := br.ReadSlice('\n')
		out = append(out, frag...)
		if len(out) > MaxLine+1 {
			return nil, fmt.Errorf("line longer than %d bytes", MaxLine)
		}
		switch err {
		case nil:
			return out[:len(out)-1], nil
		case bufio.ErrBufferFull:
			continue
		default:
			return nil, err
		}
	}
}
