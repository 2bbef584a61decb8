package sshserver

import (
	"bufio"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"golang.org/x/crypto/ssh"

	"meshd.dev/meshd/agent/whois"
	"meshd.dev/meshd/netmap"
)

func TestPasswdShell(t *testing.T) {
	const passwd = "# comment\nroot:x:0:0:root:/root:/bin/bash\n\nalice:x:1000:1000::/home/alice:/usr/bin/zsh\n" +
		"noshell:x:1001:1001::/home/n:\nbad:x:1002:1002::/home/b:zsh\nshort:x:1\n"
	for _, tc := range []struct{ name, want, err string }{
		{"root", "/bin/bash", ""},
		{"alice", "/usr/bin/zsh", ""},
		{"noshell", "", ""},
		{"bad", "", "not an absolute path"},
		{"short", "", "no passwd entry"},
		{"nobody", "", "no passwd entry"},
	} {
		got, err := passwdShell(strings.NewReader(passwd), tc.name)
		if got != tc.want || (tc.err == "") != (err == nil) || err != nil && !strings.Contains(err.Error(), tc.err) {
			t.Errorf("%s: %q, %v; want %q, %q", tc.name, got, err, tc.want, tc.err)
		}
	}
}

func FuzzPasswdShell(f *testing.F) {
	f.Add([]byte("root:x:0:0:root:/root:/bin/bash\n"), "root")
	f.Add([]byte("a:b:c:d:e:f:g:h\n"), "a")
	f.Fuzz(func(t *testing.T, data []byte, name string) {
		sh, err := passwdShell(strings.NewReader(string(data)), name)
		if err == nil && sh != "" && !strings.HasPrefix(sh, "/") {
			t.Fatalf("shell %q accepted", sh)
		}
	})
}

func TestMatchEnv(t *testing.T) {
	pats := []string{"LANG", "LC_*", "GIT_?"}
	for name, want := range map[string]bool{"LANG": true, "LC_ALL": true, "GIT_A": true, "GIT_AB": false, "LD_PRELOAD": false, "": false} {
		if MatchEnv(pats, name) != want {
			t.Errorf("%q: %v", name, !want)
		}
	}
	if MatchEnv(nil, "LANG") {
		t.Error("no acceptEnv accepted LANG")
	}
}

// fakeAuthorizer answers as a coordinator would.
type fakeAuthorizer struct {
	resp  netmap.SSHAuthResponse
	wait  func(ctx context.Context) (*netmap.SSHWaitResponse, error)
	asked atomic.Int32
	// ends receives the session end reports, when not nil.
	ends chan netmap.SSHSessionEnd
}

func (f *fakeAuthorizer) SSHSessionEnd(ctx context.Context, end netmap.SSHSessionEnd) error {
	if f.ends == nil {
		return errors.New("no reports expected")
	}
	select {
	case f.ends <- end:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (f *fakeAuthorizer) SSHAuthorize(context.Context, netmap.SSHAuthRequest) (*netmap.SSHAuthResponse, error) {
	f.asked.Add(1)
	r := f.resp
	return &r, nil
}

func (f *fakeAuthorizer) SSHWait(ctx context.Context, _ string) (*netmap.SSHWaitResponse, error) {
	return f.wait(ctx)
}

type connMeta struct{ user, remote string }

func (c connMeta) User() string          { return c.user }
func (c connMeta) SessionID() []byte     { return nil }
func (c connMeta) ClientVersion() []byte { return nil }
func (c connMeta) ServerVersion() []byte { return nil }
func (c connMeta) RemoteAddr() net.Addr {
	return net.TCPAddrFromAddrPort(netip.MustParseAddrPort(c.remote))
}
func (c connMeta) LocalAddr() net.Addr { return &net.TCPAddr{} }

// TestAuthorize: the caller is whoever whois says holds the source
// address; local processes and unknown addresses never reach the
// coordinator; check mode waits and gives up after CheckTimeout.
func TestAuthorize(t *testing.T) {
	peers := map[netip.Addr]*whois.Response{
		netip.MustParseAddr("100.64.0.2"): {Node: whois.Node{ID: 2, Hostname: "alice"}, User: "alice@example.com"},
		netip.MustParseAddr("100.64.0.1"): {Node: whois.Node{ID: 1, Hostname: "self"}, Self: true},
	}
	newServer := func(a Authorizer) *Server {
		s := New(Options{Logger: slog.New(slog.DiscardHandler), CheckTimeout: time.Minute, WhoIs: func(ip netip.Addr) (*whois.Response, bool) {
			r, ok := peers[ip]
			return r, ok
		}})
		s.SetAuthorizer(a)
		return s
	}
	accept := &fakeAuthorizer{resp: netmap.SSHAuthResponse{Action: netmap.SSHAccept}}
	for _, tc := range []struct {
		remote, want string
	}{
		{"100.64.0.9:5000", "only peers"},
		{"100.64.0.1:5000", "only peers"},
		{"127.0.0.1:5000", "only peers"},
	} {
		if _, msg := newServer(accept).authorize(context.Background(), connMeta{"root", tc.remote}, nil); !strings.Contains(msg, tc.want) {
			t.Errorf("%s: %q, want %q", tc.remote, msg, tc.want)
		}
	}
	if n := accept.asked.Load(); n != 0 {
		t.Fatalf("the coordinator was asked %d times about non-peers", n)
	}
	if _, msg := newServer(nil).authorize(context.Background(), connMeta{"root", "100.64.0.2:1"}, nil); !strings.Contains(msg, "not connected") {
		t.Errorf("without a coordinator: %q", msg)
	}
	reject := &fakeAuthorizer{resp: netmap.SSHAuthResponse{Action: netmap.SSHReject, Message: "meshd: no ssh rule"}}
	if _, msg := newServer(reject).authorize(context.Background(), connMeta{"root", "100.64.0.2:1"}, nil); msg != "meshd: no ssh rule" {
		t.Errorf("refused: %q", msg)
	}
	if l, msg := newServer(accept).authorize(context.Background(), connMeta{"root", "100.64.0.2:1"}, nil); msg != "" || l.localUser.UID != 0 || l.who.User != "alice@example.com" {
		t.Errorf("accepted root: %+v, %q", l, msg)
	}
	if _, msg := newServer(accept).authorize(context.Background(), connMeta{"no-such-user-here", "100.64.0.2:1"}, nil); !strings.Contains(msg, `no local user "no-such-user-here"`) {
		t.Errorf("unknown local user: %q", msg)
	}

	t.Run("check times out", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			never := &fakeAuthorizer{resp: netmap.SSHAuthResponse{Action: netmap.SSHCheck, CheckID: "c1"},
				wait: func(ctx context.Context) (*netmap.SSHWaitResponse, error) {
					select {
					case <-ctx.Done():
						return nil, ctx.Err()
					case <-time.After(25 * time.Second):
						return &netmap.SSHWaitResponse{Pending: true}, nil
					}
				}}
			start := time.Now()
			_, msg := newServer(never).authorize(context.Background(), connMeta{"root", "100.64.0.2:1"}, nil)
			if !strings.Contains(msg, "no administrator approved this login within 1m0s") || time.Since(start) != time.Minute {
				t.Fatalf("after %v: %q", time.Since(start), msg)
			}
		})
	})
	t.Run("check approved after errors", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			calls := 0
			a := &fakeAuthorizer{resp: netmap.SSHAuthResponse{Action: netmap.SSHCheck, CheckID: "c1"},
				wait: func(context.Context) (*netmap.SSHWaitResponse, error) {
					calls++
					switch calls {
					case 1:
						return nil, errors.New("coordinator restarting")
					case 2:
						return &netmap.SSHWaitResponse{Pending: true}, nil
					}
					return &netmap.SSHWaitResponse{Approved: true}, nil
				}}
			if _, msg := newServer(a).authorize(context.Background(), connMeta{"root", "100.64.0.2:1"}, nil); msg != "" || calls != 3 {
				t.Fatalf("%q after %d waits", msg, calls)
			}
		})
	})
	t.Run("check refused", func(t *testing.T) {
		a := &fakeAuthorizer{resp: netmap.SSHAuthResponse{Action: netmap.SSHCheck, CheckID: "c1"},
			wait: func(context.Context) (*netmap.SSHWaitResponse, error) {
				return &netmap.SSHWaitResponse{Message: "meshd: the approval request expired"}, nil
			}}
		if _, msg := newServer(a).authorize(context.Background(), connMeta{"root", "100.64.0.2:1"}, nil); msg != "meshd: the approval request expired" {
			t.Fatalf("%q", msg)
		}
	})
}

func TestIncompleteTail(t *testing.T) {
	for in, want := range map[string]int{
		"": 0, "abc": 0, "é": 0, "a\xc3": 1, "a\xe2\x82": 2, "\xf0\x9f\x98": 3, "\xf0\x9f\x98\x80": 0, "\x80\x80": 0,
	} {
		if got := incompleteTail([]byte(in)); got != want {
			t.Errorf("%q: %d, want %d", in, got, want)
		}
	}
}

// TestConnsPerPeer: one peer cannot hold more than MaxConnsPerPeer
// connections open (each may hold a coordinator request).
func TestConnsPerPeer(t *testing.T) {
	_, hk, _ := ed25519.GenerateKey(rand.Reader)
	signer, _ := ssh.NewSignerFromKey(hk)
	s := New(Options{HostKey: signer, MaxConnsPerPeer: 2, Logger: slog.New(slog.DiscardHandler),
		WhoIs: func(netip.Addr) (*whois.Response, bool) { return &whois.Response{Node: whois.Node{ID: 2}}, true }})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go s.Serve(ln)
	defer s.CloseConns()
	banner := func(c net.Conn) string {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		l, _ := bufio.NewReader(c).ReadString('\n')
		return l
	}
	var conns []net.Conn
	for i := range 3 {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns = append(conns, c)
		got := banner(c)
		if want := i < 2; strings.HasPrefix(got, "SSH-2.0-meshd") != want {
			t.Fatalf("connection %d: banner %q", i, got)
		}
	}
	// One closes: a new one fits again.
	conns[0].Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		got := banner(c)
		c.Close()
		if strings.HasPrefix(got, "SSH-2.0-meshd") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no room after a connection closed")
		}
	}
}
