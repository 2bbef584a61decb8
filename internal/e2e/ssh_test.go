package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"meshd.dev/meshd/agent/sshrec"
	"meshd.dev/meshd/internal/netlab"
	"meshd.dev/meshd/netmap"
)

const policySSH = `// ssh
{
	"groups": {"group:eng": ["alice@example.com"]},
	"tagOwners": {"tag:gpu": [], "tag:vendor": [], "tag:recorder": []},
	"grants": [
		{"src": ["group:eng", "bob@example.com", "tag:vendor"], "dst": ["tag:gpu"], "ip": ["tcp:22"]},
		{"src": ["group:eng"], "dst": ["tag:gpu"], "ip": ["tcp:8080"]},
		{"src": ["tag:gpu"], "dst": ["tag:recorder"], "ip": ["tcp:8022"]},
	],
	"ssh": [
		{"action": "accept", "src": ["group:eng"], "dst": ["tag:gpu"], "users": ["autogroup:nonroot"], "acceptEnv": ["LANG", "MESHD_T*"]},
		{"action": "check", "src": ["tag:vendor"], "dst": ["tag:gpu"], "users": ["vendor"], "checkPeriod": "1h",
		 "recorder": ["tag:recorder"], "enforceRecorder": true},
	],
	"sshTests": [
		{"src": "alice@example.com", "dst": ["tag:gpu"], "accept": ["alice"], "deny": ["root"]},
		{"src": "tag:vendor", "dst": ["tag:gpu"], "check": ["vendor"], "deny": ["alice", "root"]},
	],
}
`

// sshUsers writes the namespace's passwd and group (copies of the
// machine's plus test users whose homes are in a temporary directory):
// `ip netns exec` mounts them over /etc for the daemon, so the test never
// adds users to the machine. It returns the homes by user.
func sshUsers(t *testing.T, host *netlab.Host) map[string]string {
	t.Helper()
	base, err := os.MkdirTemp("", "meshd-ssh-homes-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	if err := os.Chmod(base, 0o755); err != nil {
		t.Fatal(err)
	}
	passwd, err := os.ReadFile("/etc/passwd")
	if err != nil {
		t.Fatal(err)
	}
	group, err := os.ReadFile("/etc/group")
	if err != nil {
		t.Fatal(err)
	}
	homes := map[string]string{}
	for i, name := range []string{"alice", "vendor"} {
		uid := 2001 + i
		home := filepath.Join(base, name)
		if err := os.Mkdir(home, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(home, uid, uid); err != nil {
			t.Fatal(err)
		}
		homes[name] = home
		passwd = fmt.Appendf(passwd, "%s:x:%d:%d::%s:/bin/bash\n", name, uid, uid, home)
		group = fmt.Appendf(group, "%s:x:%d:\n", name, uid)
	}
	group = fmt.Appendf(group, "gpuusers:x:2100:alice\n")
	etc := filepath.Dir(host.ResolvConf())
	if err := os.WriteFile(filepath.Join(etc, "passwd"), passwd, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(etc, "group"), group, 0o644); err != nil {
		t.Fatal(err)
	}
	return homes
}

// sshClient runs OpenSSH's ssh (or scp, sftp) in host with a throwaway key.
type sshClient struct {
	host *netlab.Host
	key  string
}

func (c sshClient) opts() []string {
	return []string{"-F", "/dev/null", "-i", c.key, "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
		"-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=15",
		// Banners (the refusals, the wait for approval) show at LogLevel INFO, the default.
	}
}

// run runs tool with args and returns exit status, stdout and stderr.
func (c sshClient) run(stdin io.Reader, tool string, args ...string) (int, string, string) {
	cmd := c.host.Command(context.Background(), tool, append(c.opts(), args...)...)
	var out, errb bytes.Buffer
	cmd.Stdin, cmd.Stdout, cmd.Stderr = stdin, &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		code = -1
		errb.WriteString(err.Error())
	}
	return code, out.String(), errb.String()
}

// TestSSH: OpenSSH's ssh, scp and sftp against `meshd up --ssh` in
// kernel TUN mode, logins decided by the policy's ssh rules.
func TestSSH(t *testing.T) {
	t.Parallel()
	lab := netlab.New(t)
	for _, tool := range []string{"ssh", "scp", "sftp", "ssh-keygen"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is missing: apt-get install openssh-client", tool)
		}
	}
	e := &env{t: t, bin: buildMeshd(t), dir: t.TempDir()}
	// The sftp subsystem runs this binary as the login user.
	if err := os.Chmod(filepath.Dir(e.bin), 0o755); err != nil {
		t.Fatal(err)
	}
	hosts := lanHosts(lab, "coord", "gpu", "gpu2", "alice", "bob", "vendor", "rec")
	homes := sshUsers(t, hosts["gpu"])
	homes2 := sshUsers(t, hosts["gpu2"])
	pol := writeTemp(t, "ssh.hujson", policySSH)
	e.runCoordinator(hosts["coord"], "198.18.0.1:8443", "// ssh", "--policy", pol)
	keys := map[string]string{
		"gpu": e.key("--tags", "tag:gpu"), "gpu2": e.key("--tags", "tag:gpu"), "alice": e.key("--user", "alice@example.com"),
		"bob": e.key("--user", "bob@example.com"), "vendor": e.key("--tags", "tag:vendor"),
		"rec": e.key("--tags", "tag:recorder"),
	}
	// The host's own SSH server on 0.0.0.0:22, as OpenSSH listens by
	// default: meshd must serve the tailnet addresses' port 22 beside it.
	var hostSSHD net.Listener
	if err := hosts["gpu"].Do(func() (err error) { hostSSHD, err = net.Listen("tcp", "0.0.0.0:22"); return err }); err != nil {
		t.Fatal(err)
	}
	defer hostSSHD.Close()
	var hostSSHDConns atomic.Int32
	go func() {
		for {
			c, err := hostSSHD.Accept()
			if err != nil {
				return
			}
			hostSSHDConns.Add(1)
			c.Write([]byte("SSH-2.0-host\r\n"))
			c.Close()
		}
	}()
	nodes := map[string]*node{}
	for _, name := range []string{"gpu", "gpu2", "alice", "bob", "vendor"} {
		tun := "meshd0"
		if name == "gpu2" {
			tun = "userspace" // the netstack: SSH listens inside it
		}
		n := e.newNode(name, hosts[name], "--tun", tun)
		nodes[name] = n
		e.startDaemon(n)
		args := []string{"up", "--authkey", keys[name], "--coordinator", e.coordURL, "--hostname", name}
		if strings.HasPrefix(name, "gpu") {
			args = append(args, "--ssh")
		}
		if out, err := e.cli(n, args...); err != nil {
			t.Fatalf("meshd up %s: %v\n%s", name, err, out)
		}
	}
	// The recorder: `meshd recorder --dir` runs a whole node.
	castDir := filepath.Join(e.dir, "casts")
	rec := e.newNode("rec", hosts["rec"])
	rec.proc = start(t, "rec", e.cmd(hosts["rec"], "recorder", "--dir", castDir, "--state-dir", rec.stateDir, "--socket", rec.socket,
		"--tun", "meshd0", "--resolv-conf", hosts["rec"].ResolvConf()))
	waitFor(t, 15*time.Second, "recorder socket", func() (bool, string) {
		_, err := os.Stat(rec.socket)
		return err == nil, fmt.Sprint(err)
	})
	e.up(rec, keys["rec"])

	gpu := nodes["gpu"]
	e.waitPeers(gpu, "alice", "bob", "vendor", "rec")
	e.waitPeers(nodes["gpu2"], "alice")
	if st := e.status(gpu); !st.SSH {
		t.Fatal("status --json of gpu: ssh is off after up --ssh")
	}
	if st := e.status(nodes["alice"]); st.SSH {
		t.Fatal("status --json of alice: ssh is on without --ssh")
	}
	gpuIP := ipv4Of(e.status(gpu)).String()

	keyFile := filepath.Join(e.dir, "client_key")
	if out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", keyFile).CombinedOutput(); err != nil {
		t.Fatalf("ssh-keygen: %v: %s", err, out)
	}
	client := func(name string) sshClient { return sshClient{host: hosts[name], key: keyFile} }
	alice := client("alice")

	// Allowed: a command runs as alice, with her groups, home and
	// login environment.
	var code int
	var out, errOut string
	waitFor(t, 30*time.Second, "alice's first ssh login", func() (bool, string) {
		code, out, errOut = alice.run(nil, "ssh", "alice@"+gpuIP, "id; echo HOME=$HOME USER=$USER LOGNAME=$LOGNAME SHELL=$SHELL; pwd")
		return code == 0, fmt.Sprintf("exit %d: %s%s", code, out, errOut)
	})
	for _, want := range []string{"uid=2001(alice) gid=2001(alice) groups=2001(alice),2100(gpuusers)",
		"HOME=" + homes["alice"] + " USER=alice LOGNAME=alice SHELL=/bin/bash", "\n" + homes["alice"] + "\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("alice's session printed %q, want %q in it", out, want)
		}
	}
	// The host's sshd saw none of it, and still serves the LAN.
	if n := hostSSHDConns.Load(); n != 0 {
		t.Errorf("the host's sshd got %d tailnet connections", n)
	}
	gpuLAN := hosts["gpu"].Addrs()[0].Addr()
	if err := hosts["alice"].Do(func() error {
		c, err := net.DialTimeout("tcp", netip.AddrPortFrom(gpuLAN, 22).String(), 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		b, err := io.ReadAll(c)
		if string(b) != "SSH-2.0-host\r\n" {
			return fmt.Errorf("the LAN's port 22 answered %q, %v", b, err)
		}
		return nil
	}); err != nil {
		t.Error(err)
	}
	// The same in netstack mode.
	gpu2IP := ipv4Of(e.status(nodes["gpu2"])).String()
	waitFor(t, 30*time.Second, "alice's ssh login to the netstack node", func() (bool, string) {
		code, out, errOut = alice.run(nil, "ssh", "alice@"+gpu2IP, "id -u; pwd; exit 5")
		return code == 5, fmt.Sprintf("exit %d: %s%s", code, out, errOut)
	})
	if out != "2001\n"+homes2["alice"]+"\n" {
		t.Errorf("netstack node: %q", out)
	}
	// Only the variables acceptEnv names pass.
	if code, out, errOut = alice.run(nil, "ssh", "-o", "SetEnv=LANG=C.UTF-8 MESHD_TEST=yes EVIL=1 HOME=/tmp", "alice@"+gpuIP, "echo $LANG/$MESHD_TEST/$EVIL/$HOME"); code != 0 || out != "C.UTF-8/yes//"+homes["alice"]+"\n" {
		t.Errorf("acceptEnv: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	// Exit codes propagate.
	if code, out, errOut = alice.run(nil, "ssh", "alice@"+gpuIP, "echo to-stderr >&2; exit 7"); code != 7 || !strings.Contains(errOut, "to-stderr") {
		t.Errorf("exit 7: ssh exited %d, stdout %q, stderr %q", code, out, errOut)
	}
	// A login shell on a PTY.
	code, out, errOut = alice.run(strings.NewReader("tty; echo shell-$((6*7)); exit 3\n"), "ssh", "-tt", "alice@"+gpuIP)
	if code != 3 || !strings.Contains(out, "/dev/pts/") || !strings.Contains(out, "shell-42") {
		t.Errorf("pty shell: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	// autogroup:nonroot does not include root.
	if code, out, errOut = alice.run(nil, "ssh", "root@"+gpuIP, "id"); code != 255 || strings.Contains(out, "uid=0") || !strings.Contains(errOut, "no ssh rule") {
		t.Errorf("root as alice: exit %d, stdout %q, stderr %q; want refused with the reason", code, out, errOut)
	}
	// A user the rule allows but the machine lacks is refused clearly.
	if code, _, errOut = alice.run(nil, "ssh", "nosuchuser@"+gpuIP, "id"); code != 255 || !strings.Contains(errOut, `no local user "nosuchuser"`) {
		t.Errorf("unknown local user: exit %d, stderr %q", code, errOut)
	}
	// bob may reach port 22 but no ssh rule names him.
	if code, out, errOut = client("bob").run(nil, "ssh", "bob@"+gpuIP, "id"); code != 255 || !strings.Contains(errOut, "no ssh rule") {
		t.Errorf("bob: exit %d, stdout %q, stderr %q; want refused", code, out, errOut)
	}

	// Local forwarding (ssh -W is a direct-tcpip channel) reaches what
	// the policy lets alice reach on gpu, and nothing else.
	var echoLn net.Listener
	if err := hosts["gpu"].Do(func() (err error) { echoLn, err = net.Listen("tcp", "0.0.0.0:8080"); return err }); err != nil {
		t.Fatal(err)
	}
	defer echoLn.Close()
	go func() {
		for {
			c, err := echoLn.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	if code, out, errOut = alice.run(strings.NewReader("through the tunnel\n"), "ssh", "-W", gpuIP+":8080", "alice@"+gpuIP); code != 0 || out != "through the tunnel\n" {
		t.Errorf("ssh -W to an allowed port: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	if code, out, errOut = alice.run(strings.NewReader("x\n"), "ssh", "-W", gpuIP+":9", "alice@"+gpuIP); code == 0 || out != "" || !strings.Contains(errOut, "does not let this caller reach") {
		t.Errorf("ssh -W to a port the policy closes: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	if code, out, errOut = alice.run(strings.NewReader("x\n"), "ssh", "-W", "198.18.0.1:8443", "alice@"+gpuIP); code == 0 || out != "" {
		t.Errorf("ssh -W to the LAN: exit %d, stdout %q, stderr %q", code, out, errOut)
	}

	// 100 MB by scp (the SFTP protocol) arrives intact.
	big := filepath.Join(e.dir, "big")
	data := make([]byte, 100<<20)
	rand.Read(data)
	if err := os.WriteFile(big, data, 0o644); err != nil {
		t.Fatal(err)
	}
	want := sha256.Sum256(data)
	start := time.Now()
	if code, out, errOut = alice.run(nil, "scp", big, "alice@"+gpuIP+":big"); code != 0 {
		t.Fatalf("scp 100 MB: exit %d: %s%s", code, out, errOut)
	}
	t.Logf("scp of 100 MB took %v", time.Since(start))
	got, err := os.ReadFile(filepath.Join(homes["alice"], "big"))
	if err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(got) != want {
		t.Fatalf("scp: the copy differs (%d bytes)", len(got))
	}
	if st, err := os.Stat(filepath.Join(homes["alice"], "big")); err != nil || st.Sys().(*syscall.Stat_t).Uid != 2001 {
		t.Errorf("scp: the copy is not alice's: %v", err)
	}
	// sftp too.
	code, out, errOut = alice.run(strings.NewReader("ls -l big\n"), "sftp", "-b", "-", "alice@"+gpuIP)
	if code != 0 || !strings.Contains(out, "big") {
		t.Errorf("sftp ls: exit %d, stdout %q, stderr %q", code, out, errOut)
	}

	// Check mode: the vendor's login waits for an admin, and is recorded.
	vendor := client("vendor")
	type result struct {
		code     int
		out, err string
	}
	done := make(chan result, 1)
	go func() {
		c, o, er := vendor.run(nil, "ssh", "vendor@"+gpuIP, "echo recorded-$((6*7)); id -un")
		done <- result{c, o, er}
	}()
	var checks []netmap.SSHApproval
	waitFor(t, 30*time.Second, "the vendor's login to wait for approval", func() (bool, string) {
		code, out := e.admin(hosts["coord"], "ssh", "list", "--json")
		checks = nil
		if code != 0 || json.Unmarshal([]byte(out), &checks) != nil || len(checks) != 1 {
			return false, out
		}
		return true, ""
	})
	select {
	case r := <-done:
		t.Fatalf("the check-mode login finished before any approval: %+v", r)
	case <-time.After(time.Second):
	}
	if c := checks[0]; c.LocalUser != "vendor" || c.Hostname != "gpu" || c.Caller.Hostname != "vendor" {
		t.Fatalf("pending check %+v", c)
	}
	if code, out := e.admin(hosts["coord"], "ssh", "approve", checks[0].ID); code != 0 {
		t.Fatalf("admin ssh approve: exit %d: %s", code, out)
	}
	var r result
	select {
	case r = <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("the approved login did not finish")
	}
	if r.code != 0 || !strings.Contains(r.out, "recorded-42\nvendor\n") || !strings.Contains(r.err, "meshd admin ssh approve "+checks[0].ID) {
		t.Fatalf("approved vendor login: exit %d, stdout %q, stderr %q", r.code, r.out, r.err)
	}
	// The cast holds the output, and says who, where and as whom.
	var cast []byte
	waitFor(t, 10*time.Second, "the recording", func() (bool, string) {
		files, _ := filepath.Glob(filepath.Join(castDir, "*.cast"))
		if len(files) != 1 {
			return false, fmt.Sprint(files)
		}
		cast, _ = os.ReadFile(files[0])
		return bytes.Contains(cast, []byte("exit 0")), string(cast)
	})
	hdr, err := sshrec.ParseHeader(cast[:bytes.IndexByte(cast, '\n')])
	if err != nil {
		t.Fatalf("cast header: %v\n%s", err, cast)
	}
	if m := hdr.Meshd; m.LocalUser != "vendor" || m.Node != "gpu" || m.Caller.Hostname != "vendor" || m.Sender == nil || m.Sender.Hostname != "gpu" {
		t.Errorf("cast header %+v", m)
	}
	if !bytes.Contains(cast, []byte("recorded-42")) {
		t.Errorf("the cast lacks the command's output:\n%s", cast)
	}
	// Approved for checkPeriod: the next login needs no approval.
	if code, out, errOut = vendor.run(nil, "ssh", "vendor@"+gpuIP, "echo again"); code != 0 || out != "again\n" {
		t.Fatalf("second vendor login within checkPeriod: exit %d, %q %q", code, out, errOut)
	}
	// The session's end is in the coordinator's audit log, reported by
	// gpu: which approval, how it ended.
	waitFor(t, 15*time.Second, "the vendor session's end in the audit log", func() (bool, string) {
		code, out := e.admin(hosts["coord"], "audit", "--json")
		if code != 0 {
			return false, out
		}
		for line := range strings.Lines(out) {
			var ev struct {
				Actor   struct{ Hostname string } `json:"actor"`
				Action  string                    `json:"action"`
				Details struct {
					Check      string `json:"check"`
					Kind       string `json:"kind"`
					LocalUser  string `json:"local_user"`
					ExitStatus int    `json:"exit_status"`
					Recorded   bool   `json:"recorded"`
				} `json:"details"`
			}
			if json.Unmarshal([]byte(line), &ev) != nil || ev.Action != "session.end" || ev.Details.Check != checks[0].ID {
				continue
			}
			d := ev.Details
			return ev.Actor.Hostname == "gpu" && d.Kind == "exec" && d.LocalUser == "vendor" && d.ExitStatus == 0 && d.Recorded, line
		}
		return false, out
	})

	// enforceRecorder: a recorder lost mid-session ends the session.
	lostCmd := hosts["vendor"].Command(context.Background(), "ssh", append(vendor.opts(), "vendor@"+gpuIP, "echo started; sleep 60; echo survived")...)
	lostOut, err := lostCmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var lostErr bytes.Buffer
	lostCmd.Stderr = &lostErr
	if err := lostCmd.Start(); err != nil {
		t.Fatal(err)
	}
	first := make([]byte, len("started\n"))
	if _, err := io.ReadFull(lostOut, first); err != nil || string(first) != "started\n" {
		t.Fatalf("recorded session: %q, %v, stderr %q", first, err, lostErr.String())
	}
	rec.proc.kill()
	ended := make(chan error, 1)
	go func() {
		rest, _ := io.ReadAll(lostOut)
		if bytes.Contains(rest, []byte("survived")) {
			t.Errorf("the session outlived its recorder: %q", rest)
		}
		ended <- lostCmd.Wait()
	}()
	select {
	case err := <-ended:
		if err == nil || !strings.Contains(lostErr.String(), "recorder was lost") {
			t.Errorf("session after the recorder died: %v, stderr %q", err, lostErr.String())
		}
	case <-time.After(30 * time.Second):
		lostCmd.Process.Kill()
		t.Fatal("the session went on without its recorder")
	}

	// enforceRecorder: with the recorder down, the login is refused.
	code, out, errOut = vendor.run(nil, "ssh", "vendor@"+gpuIP, "echo unrecorded")
	if code == 0 || strings.Contains(out, "unrecorded") || !strings.Contains(errOut, "must be recorded") {
		t.Fatalf("vendor with the recorder down: exit %d, stdout %q, stderr %q; want refused", code, out, errOut)
	}

	// --ssh survives a restart of the daemon; --ssh=false turns it off.
	gpu.proc.kill()
	e.startDaemon(gpu)
	waitFor(t, 30*time.Second, "ssh after the daemon restarted", func() (bool, string) {
		code, out, errOut = alice.run(nil, "ssh", "alice@"+gpuIP, "echo back")
		return code == 0 && out == "back\n", fmt.Sprintf("exit %d: %s%s", code, out, errOut)
	})
	if out, err := e.cli(gpu, "up", "--ssh"); err == nil || !strings.Contains(out, "already runs the SSH server") {
		t.Errorf("up --ssh on a node that has it: %v: %s", err, out)
	}
	if out, err := e.cli(gpu, "up", "--ssh=false"); err != nil {
		t.Fatalf("up --ssh=false: %v: %s", err, out)
	}
	if st := e.status(gpu); st.SSH {
		t.Error("status --json: ssh on after --ssh=false")
	}
	if code, out, errOut = alice.run(nil, "ssh", "-o", "ConnectTimeout=3", "alice@"+gpuIP, "echo still"); code == 0 || out != "" {
		t.Errorf("ssh after --ssh=false: exit %d, %q %q", code, out, errOut)
	}

}
