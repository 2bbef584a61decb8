package agent

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"golang.org/x/crypto/ssh"

	"meshd.dev/meshd/agent/sshrec"
	"meshd.dev/meshd/agent/sshserver"
	"meshd.dev/meshd/agent/tunwrap"
	"meshd.dev/meshd/internal/atomicfile"
	"meshd.dev/meshd/netmap"
)

// sshHostKeyFile is the SSH server's host key (OpenSSH format, 0600).
const sshHostKeyFile = "ssh_host_ed25519_key"

// sshPort is where `meshd up --ssh` listens on the tailnet addresses.
const sshPort = 22

// sshState runs the SSH server and the recorder on the data plane.
type sshState struct {
	srv *sshserver.Server
	rec *sshrec.Recorder // nil unless Options.RecorderDir
	lns []net.Listener
	wg  sync.WaitGroup
	// listenErr says why port 22 could not be served on an address (an
	// SSH server of the host on 0.0.0.0:22, in kernel TUN mode), for
	// status.
	listenErr string
}

// loadHostKey reads the SSH host key, making one the first time.
func (s *Store) loadHostKey() (ssh.Signer, error) {
	path := filepath.Join(s.dir, sshHostKeyFile)
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		_, priv, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return nil, err
		}
		blk, err := ssh.MarshalPrivateKey(priv, "meshd ssh host key")
		if err != nil {
			return nil, err
		}
		b = pem.EncodeToMemory(blk)
		if err := atomicfile.Write(path, b, 0o600); err != nil {
			return nil, fmt.Errorf("write SSH host key: %w", err)
		}
	} else if err != nil {
		return nil, fmt.Errorf("read SSH host key: %w", err)
	}
	signer, err := ssh.ParsePrivateKey(b)
	if err != nil {
		return nil, fmt.Errorf("SSH host key %s: %w (remove it to make a new one)", path, err)
	}
	return signer, nil
}

// initSSH makes the SSH server (it listens only while the login asks for
// SSH) and, with Options.RecorderDir, the recorder.
func (a *Agent) initSSH() error {
	key, err := a.store.loadHostKey()
	if err != nil {
		return err
	}
	a.ssh.srv = sshserver.New(sshserver.Options{
		HostKey: key, WhoIs: a.WhoIs, Logger: a.log.With("part", "ssh"),
		Dial: func(ctx context.Context, ap netip.AddrPort) (net.Conn, error) {
			a.mu.Lock()
			eng := a.eng
			a.mu.Unlock()
			if eng == nil {
				return nil, errors.New("the node is down")
			}
			return eng.dial(ctx, ap)
		},
		MayForward:  a.sshMayForward,
		SFTPCommand: a.opts.SFTPCommand,
		NodeName: func() string {
			a.mu.Lock()
			defer a.mu.Unlock()
			if a.nm != nil {
				return a.nm.Self.Hostname
			}
			return ""
		},
	})
	if a.opts.RecorderDir != "" {
		if err := os.MkdirAll(a.opts.RecorderDir, 0o700); err != nil {
			return fmt.Errorf("recorder: %w", err)
		}
		a.ssh.rec = &sshrec.Recorder{Dir: a.opts.RecorderDir, WhoIs: a.WhoIs, Logger: a.log.With("part", "recorder")}
	}
	return nil
}

// sshMayForward lets an SSH caller forward only to this node's own
// tailnet addresses, and only to ports the packet filter admits the
// caller to: forwarding must not reach what the policy keeps it from.
func (a *Agent) sshMayForward(src netip.Addr, dst netip.AddrPort) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.eng == nil || a.pf == nil {
		return false
	}
	own := false
	for _, p := range a.eng.cfg.addrs {
		own = own || p.Addr() == dst.Addr()
	}
	return own && a.pf.allowsTCP(src, dst)
}

// sshAttachLocked starts the SSH listeners (if the login asks for SSH)
// and the recorder's on the data plane that just came up. a.mu held.
func (a *Agent) sshAttachLocked() {
	a.sshDetachLocked()
	a.ssh.listenErr = ""
	addrs := netmap.AddrsOf(a.eng.cfg.addrs)
	serve := func(port uint16, what string, run func(net.Listener) error) {
		for _, ad := range addrs {
			ap := netip.AddrPortFrom(ad, port)
			ln, err := a.eng.listen(ap)
			if err != nil {
				a.log.Error(what+" not started on an address", "addr", ap, "err", err)
				a.ssh.listenErr = strings.TrimPrefix(a.ssh.listenErr+"; ", "; ") + fmt.Sprintf("%s on %v: %v", what, ap, err)
				continue
			}
			a.log.Info(what+" listening", "addr", ap)
			a.ssh.lns = append(a.ssh.lns, ln)
			a.ssh.wg.Add(1)
			go func() {
				defer a.ssh.wg.Done()
				run(ln)
			}()
		}
	}
	if a.login != nil && a.login.SSH {
		if a.eng.tnet == nil {
			a.sshKernelLocked(addrs)
		} else {
			serve(sshPort, "ssh", a.ssh.srv.Serve)
		}
	}
	if a.ssh.rec != nil {
		serve(netmap.SSHRecorderPort, "ssh recorder", a.ssh.rec.Serve)
	}
}

// sshKernelLocked serves SSH in kernel TUN mode: on a free port of each
// tailnet address (bound to the TUN), to which the data path redirects
// port 22 of that address. A socket on ADDR:22 would conflict with an SSH
// server of the host on 0.0.0.0:22, OpenSSH's default. a.mu held.
func (a *Agent) sshKernelLocked(addrs []netip.Addr) {
	r := &tunwrap.Redirect{From: sshPort}
	for _, ad := range addrs {
		ln, err := a.eng.listen(netip.AddrPortFrom(ad, 0))
		if err != nil {
			a.log.Error("ssh not started on an address", "addr", ad, "err", err)
			a.ssh.listenErr = strings.TrimPrefix(a.ssh.listenErr+"; ", "; ") + fmt.Sprintf("ssh on %v: %v", ad, err)
			continue
		}
		to := uint16(ln.Addr().(*net.TCPAddr).Port)
		r.Targets = append(r.Targets, tunwrap.RedirectTarget{Addr: ad, To: to})
		a.log.Info("ssh listening", "addr", netip.AddrPortFrom(ad, sshPort), "local_port", to)
		a.ssh.lns = append(a.ssh.lns, ln)
		a.ssh.wg.Add(1)
		go func() {
			defer a.ssh.wg.Done()
			a.ssh.srv.Serve(ln)
		}()
	}
	a.eng.wrap.SetRedirect(r)
}

// sshDetachLocked stops the listeners and ends the sessions. a.mu held.
func (a *Agent) sshDetachLocked() {
	if a.eng != nil && a.eng.wrap != nil {
		a.eng.wrap.SetRedirect(nil)
	}
	for _, ln := range a.ssh.lns {
		ln.Close()
	}
	a.ssh.lns = nil
	a.ssh.wg.Wait()
	a.ssh.srv.CloseConns()
	if a.ssh.rec != nil {
		a.ssh.rec.CloseConns()
	}
}

// sshAuthorizer is the part of a ControlClient the SSH server uses;
// controlclient.Client has it.
type sshAuthorizer = sshserver.Authorizer

// setSSHControl gives the SSH server the coordinator client (nil: none).
func (a *Agent) setSSHControl(cc ControlClient) {
	if sa, ok := cc.(sshAuthorizer); ok && cc != nil {
		a.ssh.srv.SetAuthorizer(sa)
		return
	}
	a.ssh.srv.SetAuthorizer(nil)
}

// allowsTCP reports whether the rules in force admit a TCP connection
// from src to dst (the rules the data path judges packets by).
func (pf *packetFilter) allowsTCP(src netip.Addr, dst netip.AddrPort) bool {
	if pf.err != nil || !pf.compiled {
		return false
	}
	if pf.bootstrap {
		return true
	}
	for _, r := range pf.src {
		if len(r.IPProto) > 0 && !slices.Contains(r.IPProto, netmap.ProtoTCP) {
			continue
		}
		if !slices.ContainsFunc(r.SrcIPs, func(p netip.Prefix) bool { return p.Contains(src) }) {
			continue
		}
		for _, np := range r.DstPorts {
			if np.Net.Contains(dst.Addr()) && np.Ports.First <= dst.Port() && dst.Port() <= np.Ports.Last {
				return true
			}
		}
	}
	return false
}
