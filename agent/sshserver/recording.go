package sshserver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"time"
	"unicode/utf8"

	"meshd.dev/meshd/agent/sshrec"
)

// recordWriteTimeout is how long one write to the recorder may take
// before the recorder counts as lost.
const recordWriteTimeout = 10 * time.Second

// recording streams one session to a recorder.
type recording struct {
	mu     sync.Mutex
	conn   net.Conn
	start  time.Time
	buf    []byte
	failed bool
	onLost func()
}

// startRecording connects to the first reachable recorder of li's
// decision and sends the cast header.
func (s *Server) startRecording(ctx context.Context, li *login, kind, command string, cols, rows int) (*recording, error) {
	if cols == 0 || rows == 0 {
		cols, rows = 80, 24
	}
	now := time.Now()
	h := sshrec.Header{
		Version: 2, Width: cols, Height: rows, Timestamp: now.Unix(),
		Meshd: sshrec.Session{
			Caller: li.auth.Caller, CallerAddr: li.caller.String(), Node: s.opts.NodeName(),
			LocalUser: li.user, Kind: kind, Command: command, Start: now.UTC(),
		},
	}
	hb, err := json.Marshal(h)
	if err != nil {
		return nil, err
	}
	var errs []error
	for _, ap := range li.auth.Recorders {
		c := li.takeRecorderConn(ap)
		if c == nil {
			dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			var err error
			c, err = s.opts.Dial(dctx, ap)
			cancel()
			if err != nil {
				errs = append(errs, fmt.Errorf("recorder %v: %w", ap, err))
				continue
			}
		}
		c.SetWriteDeadline(time.Now().Add(recordWriteTimeout))
		if _, err := c.Write(append(hb, '\n')); err != nil {
			c.Close()
			errs = append(errs, fmt.Errorf("recorder %v: %w", ap, err))
			continue
		}
		s.log.Info("ssh: recording session", "recorder", ap, "caller", li.caller, "local_user", li.user)
		r := &recording{conn: c, start: now}
		go r.watch()
		return r, nil
	}
	return nil, errors.Join(errs...)
}

// dialRecorder connects to the first reachable recorder of li's
// decision, for its first session: a login that must be recorded and
// that no recorder would take is refused before it starts, with the
// reason in the SSH banner.
func (s *Server) dialRecorder(ctx context.Context, li *login) error {
	var errs []error
	for _, ap := range li.auth.Recorders {
		dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		c, err := s.opts.Dial(dctx, ap)
		cancel()
		if err == nil {
			li.mu.Lock()
			li.recConn, li.recAddr = c, ap
			li.mu.Unlock()
			return nil
		}
		errs = append(errs, fmt.Errorf("recorder %v: %w", ap, err))
	}
	if len(errs) == 0 {
		return errors.New("no recorder")
	}
	return errors.Join(errs...)
}

// takeRecorderConn returns the connection dialRecorder made to ap, once.
func (li *login) takeRecorderConn(ap netip.AddrPort) net.Conn {
	li.mu.Lock()
	defer li.mu.Unlock()
	if li.recConn == nil || li.recAddr != ap {
		return nil
	}
	c := li.recConn
	li.recConn = nil
	return c
}

// closeRecorderConn closes a connection no session took.
func (li *login) closeRecorderConn() {
	li.mu.Lock()
	defer li.mu.Unlock()
	if li.recConn != nil {
		li.recConn.Close()
		li.recConn = nil
	}
}

// event sends one event; a failure marks the recorder lost.
func (r *recording) event(typ string, data string) {
	if r == nil {
		return
	}
	r.mu.Lock()
	if r.failed {
		r.mu.Unlock()
		return
	}
	r.buf = sshrec.AppendEvent(r.buf[:0], sshrec.Event{Time: time.Since(r.start).Seconds(), Type: typ, Data: data})
	r.conn.SetWriteDeadline(time.Now().Add(recordWriteTimeout))
	_, err := r.conn.Write(r.buf)
	if err != nil {
		r.failed = true
		r.conn.Close()
	}
	lost := r.onLost
	r.mu.Unlock()
	if err != nil && lost != nil {
		lost()
	}
}

// watch notices a recorder that is gone: one that closes the stream, or
// whose heartbeats stop.
func (r *recording) watch() {
	buf := make([]byte, 64)
	for {
		r.conn.SetReadDeadline(time.Now().Add(sshrec.HeartbeatTimeout))
		if _, err := r.conn.Read(buf); err != nil {
			break
		}
	}
	r.mu.Lock()
	wasFailed := r.failed
	r.failed = true
	lost := r.onLost
	r.mu.Unlock()
	if !wasFailed && lost != nil {
		lost()
	}
}

func (r *recording) resize(cols, rows int) {
	r.event("r", strconv.Itoa(cols)+"x"+strconv.Itoa(rows))
}

// close ends the recording with the exit status.
func (r *recording) close(code int) {
	if r == nil {
		return
	}
	r.event("m", "exit "+strconv.Itoa(code))
	r.mu.Lock()
	defer r.mu.Unlock()
	r.failed = true
	r.conn.Close()
}

// tee returns a writer that writes to w and records what it writes as
// output.
func (r *recording) tee(w io.Writer) io.Writer { return &teeWriter{r: r, w: w} }

// teeWriter records output in whole UTF-8 characters: a character split
// across two writes is held back until its end arrives, so the cast does
// not turn it into two U+FFFD.
type teeWriter struct {
	r    *recording
	w    io.Writer
	held []byte // an incomplete character at the end of the last write
}

func (t *teeWriter) Write(p []byte) (int, error) {
	data := append(t.held, p...)
	cut := incompleteTail(data)
	t.r.event("o", string(data[:len(data)-cut]))
	t.held = append(t.held[:0], data[len(data)-cut:]...)
	return t.w.Write(p)
}

// incompleteTail is the length of an incomplete UTF-8 character at the end
// of b (0 if none).
func incompleteTail(b []byte) int {
	for n := 1; n <= 3 && n <= len(b); n++ {
		c := b[len(b)-n]
		if c < 0x80 {
			return 0 // ASCII: nothing pending
		}
		if utf8.RuneStart(c) {
			if utf8.FullRune(b[len(b)-n:]) {
				return 0
			}
			return n
		}
	}
	return 0
}
