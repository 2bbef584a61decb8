package e2e

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/internal/netlab"
)

// TestTailnetHTTPS: across a kernel-TUN tailnet in namespaces, `meshd cert`
// writes n2's certificate for n2.meshd.internal, openssl s_server serves
// it on n2, and curl on n1 fetches https://n2.meshd.internal/ (and n2's
// tailnet addresses) trusting only the tailnet CA, first from
// `meshd cert --ca-file`, then from a trust store `meshd cert --install-ca`
// filled, never with -k. The same server reached as n1.meshd.internal is
// refused, and so is everything without the tailnet CA.
func TestTailnetHTTPS(t *testing.T) {
	t.Parallel()
	for _, tool := range []string{"curl", "openssl", "update-ca-certificates"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is needed (Debian packages curl, openssl, ca-certificates): %v", tool, err)
		}
	}
	lab := netlab.New(t)
	e := &env{t: t, bin: buildMeshd(t), dir: t.TempDir()}
	lan := lab.NewSegment("lan", netip.MustParsePrefix("198.18.0.0/24"))
	hosts := map[string]*netlab.Host{}
	for _, name := range []string{"coord", "n1", "n2"} {
		hosts[name] = lab.NewHost(name)
		hosts[name].Attach(lan)
	}
	e.startCoordinator(hosts["coord"], "198.18.0.1:8443")
	key := e.authKey(hosts["coord"])
	n1 := e.newNode("n1", hosts["n1"], "--tun", "meshd0")
	n2 := e.newNode("n2", hosts["n2"], "--tun", "meshd0")
	for _, n := range []*node{n1, n2} {
		e.startDaemon(n)
		e.up(n, key)
	}
	e.waitPeers(n1, "n2")
	st2 := e.status(n2)
	const name2, name1 = "n2.meshd.internal", "n1.meshd.internal"

	// n2: the certificate for its name, into a directory of ours.
	work := t.TempDir()
	certCmd := func(n *node, args ...string) (int, string) {
		cmd := exec.Command(e.bin, append([]string{"cert", "--socket", n.socket}, args...)...)
		cmd.Dir = work
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode(), string(out)
		}
		if err != nil {
			t.Fatalf("meshd cert: %v", err)
		}
		return 0, string(out)
	}
	if code, out := certCmd(n2); code != 0 {
		t.Fatalf("meshd cert on n2: exit %d\n%s", code, out)
	}
	crt, keyFile := filepath.Join(work, name2+".crt"), filepath.Join(work, name2+".key")
	if fi, err := os.Stat(keyFile); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("%s: %v %v", keyFile, fi, err)
	}
	if code, out := certCmd(n2); code != 1 || !strings.Contains(out, "nothing changed") {
		t.Errorf("meshd cert again: exit %d, want 1 saying nothing changed\n%s", code, out)
	}
	caFile := filepath.Join(work, "tailnet-ca.pem")
	if code, out := certCmd(n1, "--ca-file", caFile); code != 0 {
		t.Fatalf("meshd cert --ca-file on n1: exit %d\n%s", code, out)
	}

	// A plain TLS server on n2 with those files: not meshd's, so what is
	// tested is the certificate, not our server.
	hosts["n2"].Start("openssl", "s_server", "-quiet", "-accept", "443", "-cert", crt, "-key", keyFile, "-www")

	curl := func(host string, trust ...string) (int, string) {
		u := "https://" + host + "/"
		args := append([]string{"-sS", "--max-time", "10"}, trust...)
		if a, err := netip.ParseAddr(host); err == nil {
			if a.Is6() {
				u = "https://[" + host + "]/"
			}
		} else {
			args = append(args, "--resolve", host+":443:"+ipv4Of(st2).String())
		}
		out, err := hosts["n1"].Command(context.Background(), "curl", append(args, u)...).CombinedOutput()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode(), string(out)
		}
		if err != nil {
			t.Fatalf("curl: %v", err)
		}
		return 0, string(out)
	}
	waitFor(t, 20*time.Second, "curl https://"+name2+"/ from n1", func() (bool, string) {
		code, out := curl(name2, "--cacert", caFile)
		return code == 0 && strings.Contains(out, "s_server"), out
	})
	for _, ip := range st2.Self.IPs {
		if code, out := curl(ip.String(), "--cacert", caFile); code != 0 {
			t.Errorf("curl https://%s/ --cacert: exit %d: %s", ip, code, out)
		}
	}
	// n2's server reached under n1's name: exit 60, the name does not match.
	if code, out := curl(name1, "--cacert", caFile); code != 60 {
		t.Errorf("curl https://%s/ (n2's server): exit %d, want 60: %s", name1, code, out)
	}
	if code, out := curl(name2); code != 60 {
		t.Errorf("curl without the tailnet CA: exit %d, want 60: %s", code, out)
	}

	// --install-ca into a trust store under a root of ours (namespaces
	// share the host's /etc, which a test never touches): curl trusts n2
	// through the store's hashed directory with no --cacert.
	root := t.TempDir()
	for _, d := range []string{"etc/ssl/certs", "usr/share/ca-certificates"} {
		os.MkdirAll(filepath.Join(root, d), 0o755)
	}
	if code, out := certCmd(n1, "--install-ca", "--trust-root", root); code != 0 {
		t.Fatalf("meshd cert --install-ca: exit %d\n%s", code, out)
	}
	if code, out := curl(name2, "--capath", filepath.Join(root, "etc/ssl/certs")); code != 0 {
		t.Errorf("curl with the installed trust store: exit %d: %s", code, out)
	}
}
