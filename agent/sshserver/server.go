// Package sshserver is the node's SSH server (`meshd up --ssh`): callers
// are identified by the tailnet address their connection came from, never
// by an SSH key or password, and every login is decided by the
// coordinator from the tailnet policy's "ssh" rules (docs/ssh.md).
package sshserver

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/ssh"

	"meshd.dev/meshd/agent/whois"
	"meshd.dev/meshd/internal/connlimit"
	"meshd.dev/meshd/netmap"
)

// Authorizer is the coordinator, as the SSH server asks it.
type Authorizer interface {
	SSHAuthorize(ctx context.Context, req netmap.SSHAuthRequest) (*netmap.SSHAuthResponse, error)
	SSHWait(ctx context.Context, checkID string) (*netmap.SSHWaitResponse, error)
}

// SessionReporter is an Authorizer that also records ended sessions in
// the coordinator's audit log (controlclient.Client does).
type SessionReporter interface {
	SSHSessionEnd(ctx context.Context, end netmap.SSHSessionEnd) error
}

// reportTimeout bounds one session end report: the coordinator being
// slow or away costs the audit log an entry, never a goroutine for long.
const reportTimeout = 15 * time.Second

// reportEnd tells the coordinator, if it takes reports, that a session of
// li ended (in the background: the session is over either way).
func (s *Server) reportEnd(li *login, kind string, d time.Duration, code int, recorded bool) {
	box := s.ctl.Load()
	if box == nil {
		return
	}
	r, ok := box.a.(SessionReporter)
	if !ok {
		return
	}
	var id [8]byte
	rand.Read(id[:])
	end := netmap.SSHSessionEnd{
		SessionID: hex.EncodeToString(id[:]), CheckID: li.auth.CheckID, Caller: li.auth.Caller, LocalUser: li.user,
		Kind: kind, Duration: d, ExitStatus: code, Recorded: recorded,
	}
	if end.Kind != netmap.SSHSessionExec && end.Kind != netmap.SSHSessionSubsystem {
		end.Kind = netmap.SSHSessionShell
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), reportTimeout)
		defer cancel()
		if err := r.SSHSessionEnd(ctx, end); err != nil {
			s.log.Warn("ssh: session end not reported to the coordinator", "session", end.SessionID, "err", err)
		}
	}()
}

// Options configure a Server.
type Options struct {
	HostKey ssh.Signer
	// WhoIs answers who holds a tailnet address (agent.WhoIs).
	WhoIs func(netip.Addr) (*whois.Response, bool)
	// Dial opens a TCP connection inside the tailnet, to recorders and
	// for local port forwarding.
	Dial func(ctx context.Context, addr netip.AddrPort) (net.Conn, error)
	// MayForward reports whether the caller at src may reach dst through
	// the node's packet filter; local port forwarding goes only there.
	// nil refuses every forwarding.
	MayForward func(src netip.Addr, dst netip.AddrPort) bool
	// SFTPCommand runs the sftp subsystem (stdin/stdout) as the login
	// user: the meshd binary's `sftp-server`. Empty refuses sftp.
	SFTPCommand []string
	// NodeName names this node in recordings.
	NodeName func() string
	// CheckTimeout bounds a check-mode wait; 0 means 5 minutes.
	CheckTimeout time.Duration
	// MaxConnsPerPeer caps one peer's concurrent connections (each may
	// hold a coordinator request while it authenticates); 0 means 32.
	MaxConnsPerPeer int
	Logger          *slog.Logger
}

// Server serves SSH on listeners given to Serve.
type Server struct {
	opts Options
	log  *slog.Logger
	ctl  atomic.Pointer[authorizerBox]

	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
}

type authorizerBox struct{ a Authorizer }

// New returns a server; it serves nothing until Serve.
func New(opts Options) *Server {
	if opts.CheckTimeout == 0 {
		opts.CheckTimeout = 5 * time.Minute
	}
	if opts.MaxConnsPerPeer == 0 {
		opts.MaxConnsPerPeer = 32
	}
	if opts.NodeName == nil {
		opts.NodeName = func() string { return "" }
	}
	return &Server{opts: opts, log: opts.Logger, conns: map[net.Conn]struct{}{}}
}

// SetAuthorizer sets the coordinator client (nil while there is none:
// every login is refused then).
func (s *Server) SetAuthorizer(a Authorizer) {
	if a == nil {
		s.ctl.Store(nil)
		return
	}
	s.ctl.Store(&authorizerBox{a})
}

// Serve accepts connections on ln until it is closed.
func (s *Server) Serve(ln net.Listener) error {
	limited := connlimit.Limits{
		PerSource: s.opts.MaxConnsPerPeer, Total: 4096, Name: "ssh", Logger: s.log,
		// Authentication includes the wait for a check-mode approval.
		HandshakeTimeout: s.opts.CheckTimeout + time.Minute,
		Hint:             "a peer opens more SSH connections at once than the server allows",
	}.WithDefaults().Listener(ln)
	for {
		c, err := limited.Accept()
		if err != nil {
			return err
		}
		if !s.track(c, true) {
			c.Close()
			continue
		}
		go func() {
			defer s.track(c, false)
			s.handleConn(c)
		}()
	}
}

func (s *Server) track(c net.Conn, add bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if add {
		if s.closed {
			return false
		}
		s.conns[c] = struct{}{}
		return true
	}
	delete(s.conns, c)
	return true
}

// CloseConns ends every open connection (the data plane went down).
func (s *Server) CloseConns() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		c.Close()
	}
}

// errRefused is returned by authentication for refused logins.
var errRefused = errors.New("login refused")

// login is what authentication decided for one connection.
type login struct {
	mu      sync.Mutex
	recConn net.Conn // see dialRecorder
	recAddr netip.AddrPort

	caller    netip.Addr
	who       *whois.Response
	user      string
	auth      *netmap.SSHAuthResponse
	localUser *LocalUser
}

func (s *Server) handleConn(nc net.Conn) {
	defer nc.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		<-ctx.Done()
		nc.Close()
	}()
	var li login
	var preauth ssh.ServerPreAuthConn
	cfg := &ssh.ServerConfig{
		PreAuthConnCallback: func(c ssh.ServerPreAuthConn) { preauth = c },
		NoClientAuth:        true,
		NoClientAuthCallback: func(cm ssh.ConnMetadata) (*ssh.Permissions, error) {
			if li.auth != nil {
				// One decision per connection: a client that tries
				// again after a refusal gets the same answer.
				return nil, errRefused
			}
			l, msg := s.authorize(ctx, cm, preauth)
			if msg != "" {
				li.auth = &netmap.SSHAuthResponse{Action: netmap.SSHReject}
				return nil, &ssh.BannerError{Err: errRefused, Message: msg + "\r\n"}
			}
			li.caller, li.who, li.user, li.auth, li.localUser = l.caller, l.who, l.user, l.auth, l.localUser
			li.recConn, li.recAddr = l.recConn, l.recAddr
			return &ssh.Permissions{}, nil
		},
		// Any key is as good as none: the identity is the WireGuard peer.
		PublicKeyCallback: func(ssh.ConnMetadata, ssh.PublicKey) (*ssh.Permissions, error) {
			return nil, errRefused
		},
		ServerVersion: "SSH-2.0-meshd",
	}
	cfg.AddHostKey(s.opts.HostKey)
	// Authentication (including a check-mode wait) must finish in time.
	nc.SetDeadline(time.Now().Add(s.opts.CheckTimeout + time.Minute))
	conn, chans, reqs, err := ssh.NewServerConn(nc, cfg)
	defer li.closeRecorderConn()
	if err != nil {
		s.log.Debug("ssh handshake", "remote", nc.RemoteAddr(), "err", err)
		return
	}
	nc.SetDeadline(time.Time{})
	if lc, ok := nc.(*connlimit.Conn); ok && !lc.Authenticate() {
		conn.Close()
		return
	}
	defer conn.Close()
	s.log.Info("ssh login", "caller", li.caller, "caller_node", li.who.Node.Hostname, "caller_user", li.who.User,
		"local_user", li.user, "rule", li.auth.Rule)
	go s.globalRequests(reqs)
	var wg sync.WaitGroup
	for nch := range chans {
		switch nch.ChannelType() {
		case "session":
			ch, creqs, err := nch.Accept()
			if err != nil {
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				s.session(ctx, conn, &li, ch, creqs)
			}()
		case "direct-tcpip":
			wg.Add(1)
			go func() {
				defer wg.Done()
				s.directTCPIP(ctx, &li, nch)
			}()
		default:
			nch.Reject(ssh.UnknownChannelType, "meshd: channel type "+nch.ChannelType()+" is not supported")
		}
	}
	wg.Wait()
}

func (s *Server) globalRequests(reqs <-chan *ssh.Request) {
	for r := range reqs {
		// Keep-alives and remote forwarding requests: no remote
		// forwarding is offered.
		if r.WantReply {
			r.Reply(false, nil)
		}
	}
}

// authorize decides a login; msg is the refusal said to the user.
func (s *Server) authorize(ctx context.Context, cm ssh.ConnMetadata, preauth ssh.ServerPreAuthConn) (*login, string) {
	ap, err := netip.ParseAddrPort(cm.RemoteAddr().String())
	if err != nil {
		return nil, "meshd: cannot tell who is calling"
	}
	caller := ap.Addr().Unmap()
	who, ok := s.opts.WhoIs(caller)
	if !ok || who.Self {
		// Local users and unknown addresses are not authenticated by
		// WireGuard: they would log in as anyone.
		s.log.Warn("ssh: refused a caller that is not a peer", "remote", caller)
		return nil, "meshd: only peers of the tailnet may log in here"
	}
	box := s.ctl.Load()
	if box == nil {
		return nil, "meshd: this node is not connected to its coordinator, which decides SSH logins: try again later"
	}
	actx, cancel := context.WithTimeout(ctx, 15*time.Second)
	resp, err := box.a.SSHAuthorize(actx, netmap.SSHAuthRequest{CallerAddr: caller, LocalUser: cm.User()})
	cancel()
	if err != nil {
		s.log.Error("ssh: authorization failed", "caller", caller, "err", err)
		return nil, "meshd: the coordinator could not be asked about this login: try again later"
	}
	l := &login{caller: caller, who: who, user: cm.User(), auth: resp}
	switch resp.Action {
	case netmap.SSHAccept:
	case netmap.SSHCheck:
		if resp.CheckID == "" {
			return nil, "meshd: the coordinator asked for an approval but named none"
		}
		if preauth != nil {
			preauth.SendAuthBanner(resp.Message)
		}
		if msg := s.waitApproval(ctx, box.a, resp.CheckID); msg != "" {
			s.log.Info("ssh: check-mode login not approved", "caller", caller, "local_user", cm.User(), "check", resp.CheckID, "why", msg)
			return nil, msg
		}
		s.log.Info("ssh: check-mode login approved", "caller", caller, "local_user", cm.User(), "check", resp.CheckID)
	default:
		s.log.Info("ssh: login refused", "caller", caller, "local_user", cm.User(), "why", resp.Message)
		return nil, resp.Message
	}
	u, err := LookupUser(cm.User())
	if err != nil {
		s.log.Info("ssh: login refused", "caller", caller, "local_user", cm.User(), "err", err)
		return nil, fmt.Sprintf("meshd: %v", err)
	}
	l.localUser = u
	if resp.EnforceRecorder {
		if err := s.dialRecorder(ctx, l); err != nil {
			s.log.Warn("ssh: login refused: no recorder", "caller", caller, "local_user", cm.User(), "err", err)
			return nil, "meshd: this session must be recorded and no recorder is reachable"
		}
	}
	return l, ""
}

// waitApproval waits for an admin to approve check; "" when approved.
func (s *Server) waitApproval(ctx context.Context, a Authorizer, check string) string {
	ctx, cancel := context.WithTimeout(ctx, s.opts.CheckTimeout)
	defer cancel()
	for {
		r, err := a.SSHWait(ctx, check)
		switch {
		case ctx.Err() != nil:
			return fmt.Sprintf("meshd: no administrator approved this login within %v", s.opts.CheckTimeout)
		case err != nil:
			s.log.Warn("ssh: waiting for approval", "check", check, "err", err)
			select {
			case <-ctx.Done():
			case <-time.After(2 * time.Second):
			}
			continue
		case r.Approved:
			return ""
		case r.Pending:
			continue
		}
		return r.Message
	}
}
