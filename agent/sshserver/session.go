package sshserver

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/creack/pty"
	"golang.org/x/crypto/ssh"
	"golang.org/x/sys/unix"
)

// session is one "session" channel: a shell, a command or sftp.
type session struct {
	s   *Server
	li  *login
	ch  ssh.Channel
	env []string // accepted client variables, NAME=VALUE

	mu      sync.Mutex
	term    string
	modes   []termMode
	size    pty.Winsize
	wantPTY bool
	ptmx    *os.File
	started bool
	rec     *recording
	failed  string // why the program did not start
	pgid    int    // the program's process group, once started
}

func (s *Server) session(ctx context.Context, conn *ssh.ServerConn, li *login, ch ssh.Channel, reqs <-chan *ssh.Request) {
	ss := &session{s: s, li: li, ch: ch}
	defer ch.Close()
	done := make(chan struct{})
	for {
		select {
		case r, ok := <-reqs:
			if !ok {
				ss.stop()
				return
			}
			ok = ss.request(ctx, conn, r, done)
			if r.WantReply {
				r.Reply(ok, nil)
			}
			if ss.failed != "" {
				// The program could not start: say why and end with
				// status 1. (A refused request would do, but OpenSSH
				// exits on it without printing the reason.)
				fmt.Fprintf(ss.ch.Stderr(), "meshd: %s\r\n", ss.failed)
				ss.ch.SendRequest("exit-status", false, binary.BigEndian.AppendUint32(nil, 1))
				ss.ch.CloseWrite()
				go ssh.DiscardRequests(reqs)
				return
			}
		case <-done:
			// The command ended: the exit status is sent, the channel
			// closes; requests still arriving are dropped.
			go ssh.DiscardRequests(reqs)
			return
		}
	}
}

// request handles one channel request and reports success.
func (ss *session) request(ctx context.Context, conn *ssh.ServerConn, r *ssh.Request, done chan struct{}) bool {
	switch r.Type {
	case "pty-req":
		var p struct {
			Term          string
			Cols, Rows    uint32
			Width, Height uint32
			Modes         string
		}
		if ssh.Unmarshal(r.Payload, &p) != nil {
			return false
		}
		modes, err := parseModes([]byte(p.Modes))
		if err != nil {
			return false
		}
		ss.mu.Lock()
		defer ss.mu.Unlock()
		ss.wantPTY, ss.term, ss.modes = true, p.Term, modes
		ss.size = winsize(p.Cols, p.Rows)
		return true
	case "window-change":
		var p struct{ Cols, Rows, Width, Height uint32 }
		if ssh.Unmarshal(r.Payload, &p) != nil {
			return false
		}
		ss.mu.Lock()
		defer ss.mu.Unlock()
		ss.size = winsize(p.Cols, p.Rows)
		if ss.ptmx != nil {
			pty.Setsize(ss.ptmx, &ss.size)
		}
		if ss.rec != nil {
			ss.rec.resize(int(p.Cols), int(p.Rows))
		}
		return true
	case "signal":
		var p struct{ Signal string }
		if ssh.Unmarshal(r.Payload, &p) != nil {
			return false
		}
		sig, ok := signalByName[p.Signal]
		ss.mu.Lock()
		pgid := ss.pgid
		ss.mu.Unlock()
		if !ok || pgid == 0 {
			return false
		}
		// The program leads its own session: the signal reaches it and
		// its children, as a terminal's would.
		return syscall.Kill(-pgid, sig) == nil
	case "env":
		var p struct{ Name, Value string }
		if ssh.Unmarshal(r.Payload, &p) != nil || !MatchEnv(ss.li.auth.AcceptEnv, p.Name) {
			return false
		}
		ss.env = append(ss.env, p.Name+"="+p.Value)
		return true
	case "shell", "exec", "subsystem":
		ss.mu.Lock()
		started := ss.started
		ss.started = true
		ss.mu.Unlock()
		if started {
			return false
		}
		var cmd string
		if r.Type != "shell" {
			var p struct{ Command string }
			if ssh.Unmarshal(r.Payload, &p) != nil {
				return false
			}
			cmd = p.Command
		}
		if err := ss.start(ctx, conn, r.Type, cmd, done); err != nil {
			ss.s.log.Info("ssh: session not started", "caller", ss.li.caller, "local_user", ss.li.user, "err", err)
			ss.failed = err.Error()
		}
		return true
	}
	return false
}

func winsize(cols, rows uint32) pty.Winsize {
	return pty.Winsize{Cols: uint16(min(cols, 0xffff)), Rows: uint16(min(rows, 0xffff))}
}

// stop ends a session whose client went away.
func (ss *session) stop() {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.ptmx != nil {
		ss.ptmx.Close()
	}
}

// start runs the session's program as the login user.
func (ss *session) start(ctx context.Context, conn *ssh.ServerConn, kind, command string, done chan struct{}) error {
	u := ss.li.localUser
	var c *exec.Cmd
	switch kind {
	case "subsystem":
		if command != "sftp" || len(ss.s.opts.SFTPCommand) == 0 {
			return fmt.Errorf("subsystem %q is not available", command)
		}
		if ss.li.auth.EnforceRecorder {
			return errors.New("file transfers cannot be recorded, and this login must be")
		}
		c = exec.Command(ss.s.opts.SFTPCommand[0], ss.s.opts.SFTPCommand[1:]...)
	case "exec":
		c = exec.Command(u.Shell, "-c", command)
	default:
		c = exec.Command(u.Shell)
		c.Args = []string{"-" + path.Base(u.Shell)} // a login shell
	}
	c.Env = ss.environ(conn)
	c.Dir = "/"
	if st, err := os.Stat(u.Home); err == nil && st.IsDir() {
		c.Dir = u.Home
	}
	attrs := &syscall.SysProcAttr{
		Setsid:     true,
		Credential: &syscall.Credential{Uid: u.UID, Gid: u.GID, Groups: u.Groups},
	}

	var rec *recording
	if len(ss.li.auth.Recorders) > 0 && kind != "subsystem" {
		ss.mu.Lock()
		cols, rows := int(ss.size.Cols), int(ss.size.Rows)
		ss.mu.Unlock()
		var err error
		rec, err = ss.s.startRecording(ctx, ss.li, kind, command, cols, rows)
		if err != nil && ss.li.auth.EnforceRecorder {
			return errors.New("this session must be recorded and no recorder is reachable")
		}
		if err != nil {
			ss.s.log.Warn("ssh: session not recorded", "caller", ss.li.caller, "err", err)
		}
	}
	lost := func() {
		// A lost recorder ends an enforced session: nothing may go
		// unrecorded.
		if rec != nil && ss.li.auth.EnforceRecorder {
			fmt.Fprint(ss.ch.Stderr(), "\r\nmeshd: the session recorder was lost; the session ends\r\n")
			if c.Process != nil {
				syscall.Kill(-c.Process.Pid, syscall.SIGKILL)
			}
			ss.ch.Close()
		}
	}
	var out io.Writer = ss.ch
	var errOut io.Writer = ss.ch.Stderr()
	if rec != nil {
		rec.mu.Lock()
		rec.onLost = lost
		rec.mu.Unlock()
		out, errOut = rec.tee(ss.ch), rec.tee(ss.ch.Stderr())
	}

	ss.mu.Lock()
	wantPTY := ss.wantPTY && kind != "subsystem"
	size := ss.size
	ss.rec = rec
	ss.mu.Unlock()
	var copies sync.WaitGroup
	if wantPTY {
		attrs.Setctty = true // Ctty 0: the tty is the child's stdin
		ss.mu.Lock()
		modes := ss.modes
		ss.mu.Unlock()
		ptmx, err := startPTY(c, &size, attrs, modes)
		if err != nil {
			rec.close(-1)
			return fmt.Errorf("start %s: %w", u.Shell, err)
		}
		ss.mu.Lock()
		ss.ptmx = ptmx
		ss.mu.Unlock()
		go func() {
			io.Copy(ptmx, ss.ch)
		}()
		copies.Add(1)
		go func() {
			defer copies.Done()
			io.Copy(out, ptmx) // ends with EIO once the shell and its children closed the tty
		}()
	} else {
		c.SysProcAttr = attrs
		stdin, err := c.StdinPipe()
		if err != nil {
			return err
		}
		c.Stdout, c.Stderr = out, errOut
		if kind == "subsystem" {
			c.Stderr = io.Discard
		}
		if err := c.Start(); err != nil {
			rec.close(-1)
			return fmt.Errorf("start: %w", err)
		}
		go func() {
			io.Copy(stdin, ss.ch)
			stdin.Close()
		}()
	}
	ss.mu.Lock()
	ss.pgid = c.Process.Pid
	ss.mu.Unlock()
	ss.s.log.Info("ssh session started", "caller", ss.li.caller, "local_user", u.Name, "kind", kind, "pty", wantPTY, "recorded", rec != nil)
	began := time.Now()
	go func() {
		err := c.Wait()
		copies.Wait()
		code := 0
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			code = ee.ExitCode()
			if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
				sig := ws.Signal().String()
				ss.ch.SendRequest("exit-signal", false, ssh.Marshal(struct {
					Signal     string
					CoreDumped bool
					Msg, Lang  string
				}{Signal: signalName(ws.Signal()), Msg: sig}))
				code = -1
			}
		}
		if code >= 0 {
			ss.ch.SendRequest("exit-status", false, binary.BigEndian.AppendUint32(nil, uint32(code)))
		}
		rec.close(code)
		ss.s.log.Info("ssh session ended", "caller", ss.li.caller, "local_user", u.Name, "exit", code)
		ss.s.reportEnd(ss.li, kind, time.Since(began), code, rec != nil)
		ss.mu.Lock()
		if ss.ptmx != nil {
			ss.ptmx.Close()
		}
		ss.mu.Unlock()
		ss.ch.CloseWrite()
		close(done)
	}()
	return nil
}

// signalByName maps RFC 4254 signal names to signals.
var signalByName = map[string]syscall.Signal{
	"ABRT": syscall.SIGABRT, "ALRM": syscall.SIGALRM, "FPE": syscall.SIGFPE, "HUP": syscall.SIGHUP,
	"ILL": syscall.SIGILL, "INT": syscall.SIGINT, "KILL": syscall.SIGKILL, "PIPE": syscall.SIGPIPE,
	"QUIT": syscall.SIGQUIT, "SEGV": syscall.SIGSEGV, "TERM": syscall.SIGTERM, "USR1": syscall.SIGUSR1,
	"USR2": syscall.SIGUSR2,
}

// startPTY starts c on a new pseudo-terminal of size sz with the client's
// terminal modes, and returns the terminal's controlling side.
func startPTY(c *exec.Cmd, sz *pty.Winsize, attrs *syscall.SysProcAttr, modes []termMode) (*os.File, error) {
	ptmx, tty, err := pty.Open()
	if err != nil {
		return nil, err
	}
	defer tty.Close()
	if err := pty.Setsize(ptmx, sz); err != nil {
		ptmx.Close()
		return nil, err
	}
	if len(modes) > 0 {
		t, err := unix.IoctlGetTermios(int(tty.Fd()), unix.TCGETS)
		if err == nil {
			applyModes(t, modes)
			err = unix.IoctlSetTermios(int(tty.Fd()), unix.TCSETS, t)
		}
		if err != nil {
			ptmx.Close()
			return nil, fmt.Errorf("terminal modes: %w", err)
		}
	}
	c.Stdin, c.Stdout, c.Stderr = tty, tty, tty
	c.SysProcAttr = attrs
	if err := c.Start(); err != nil {
		ptmx.Close()
		return nil, err
	}
	return ptmx, nil
}

// signalName is s's name as RFC 4254 writes it ("TERM").
func signalName(s syscall.Signal) string {
	return strings.TrimPrefix(unix.SignalName(s), "SIG")
}

// environ is the login environment of the session's program.
func (ss *session) environ(conn *ssh.ServerConn) []string {
	u := ss.li.localUser
	p := "/usr/local/bin:/usr/bin:/bin"
	if u.UID == 0 {
		p = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	}
	env := append([]string(nil), ss.env...)
	env = append(env,
		"HOME="+u.Home, "USER="+u.Name, "LOGNAME="+u.Name, "SHELL="+u.Shell, "PATH="+p,
		"SSH_CLIENT="+hostPort(conn.RemoteAddr())+"", "SSH_CONNECTION="+hostPort(conn.RemoteAddr())+" "+hostPort(conn.LocalAddr()),
	)
	ss.mu.Lock()
	if ss.wantPTY && ss.term != "" {
		env = append(env, "TERM="+ss.term)
	}
	ss.mu.Unlock()
	return env
}

func hostPort(a net.Addr) string {
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		return a.String()
	}
	return ap.Addr().Unmap().String() + " " + strconv.Itoa(int(ap.Port()))
}

// MatchEnv reports whether name matches one of the acceptEnv patterns
// (`*` and `?` wildcards).
func MatchEnv(patterns []string, name string) bool {
	for _, p := range patterns {
		if ok, err := filepath.Match(p, name); err == nil && ok {
			return true
		}
	}
	return false
}

// directTCPIP is local port forwarding (ssh -L): only to destinations
// the caller could reach through the node's packet filter itself.
func (s *Server) directTCPIP(ctx context.Context, li *login, nch ssh.NewChannel) {
	var p struct {
		DestAddr string
		DestPort uint32
		OrigAddr string
		OrigPort uint32
	}
	if ssh.Unmarshal(nch.ExtraData(), &p) != nil || p.DestPort == 0 || p.DestPort > 0xffff {
		nch.Reject(ssh.ConnectionFailed, "meshd: bad forwarding request")
		return
	}
	ip, err := netip.ParseAddr(p.DestAddr)
	if err != nil {
		nch.Reject(ssh.Prohibited, "meshd: forward to a tailnet IP address, not "+p.DestAddr)
		return
	}
	dst := netip.AddrPortFrom(ip.Unmap(), uint16(p.DestPort))
	if s.opts.MayForward == nil || !s.opts.MayForward(li.caller, dst) {
		nch.Reject(ssh.Prohibited, fmt.Sprintf("meshd: the tailnet policy does not let this caller reach %v", dst))
		return
	}
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	tc, err := s.opts.Dial(dctx, dst)
	cancel()
	if err != nil {
		nch.Reject(ssh.ConnectionFailed, fmt.Sprintf("meshd: connect to %v: %v", dst, err))
		return
	}
	defer tc.Close()
	ch, reqs, err := nch.Accept()
	if err != nil {
		return
	}
	defer ch.Close()
	go ssh.DiscardRequests(reqs)
	s.log.Info("ssh forwarding", "caller", li.caller, "dst", dst)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		io.Copy(tc, ch)
		if cw, ok := tc.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		}
	}()
	io.Copy(ch, tc)
	ch.CloseWrite()
	wg.Wait()
}
