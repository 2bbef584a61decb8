package main

import (
	"encoding/base64"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

const existingKubeconfig = `apiVersion: v1
kind: Config
clusters:
- name: prod
  cluster:
    server: https://prod.example:6443
    insecure-skip-tls-verify: true
users:
- name: prod-admin
  user:
    token: secret-token
contexts:
- name: prod
  context: {cluster: prod, user: prod-admin, namespace: web}
current-context: prod
preferences: {colors: true}
`

// TestWriteKubeconfig: a new file, a merge into an existing kubeconfig
// that keeps its other entries, an update in place, no change on a rerun,
// and a file that is not a kubeconfig left alone. kubectl reads the result.
func TestWriteKubeconfig(t *testing.T) {
	dir := t.TempDir()
	ca := []byte("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
	read := func(p string) map[string]any {
		t.Helper()
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		m := map[string]any{}
		if err := yaml.Unmarshal(b, &m); err != nil {
			t.Fatal(err)
		}
		return m
	}

	fresh := filepath.Join(dir, "new", "config")
	if changed, err := writeKubeconfig(fresh, "proxy.meshd.internal", "https://proxy.meshd.internal", ca); err != nil || !changed {
		t.Fatalf("new file: %v %v", changed, err)
	}
	if fi, err := os.Stat(fresh); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("mode: %v %v", fi, err)
	}
	m := read(fresh)
	cl := m["clusters"].([]any)[0].(map[string]any)["cluster"].(map[string]any)
	if cl["server"] != "https://proxy.meshd.internal" || cl["certificate-authority-data"] != base64.StdEncoding.EncodeToString(ca) || m["current-context"] != "proxy.meshd.internal" {
		t.Errorf("new file: %v", m)
	}
	if changed, err := writeKubeconfig(fresh, "proxy.meshd.internal", "https://proxy.meshd.internal", ca); err != nil || changed {
		t.Errorf("rerun: changed %v err %v, want unchanged", changed, err)
	}

	merged := filepath.Join(dir, "config")
	os.WriteFile(merged, []byte(existingKubeconfig), 0o600)
	if changed, err := writeKubeconfig(merged, "k8s.meshd.internal", "https://k8s.meshd.internal:8443", ca); err != nil || !changed {
		t.Fatalf("merge: %v %v", changed, err)
	}
	if _, err := writeKubeconfig(merged, "k8s.meshd.internal", "https://k8s.meshd.internal", ca); err != nil {
		t.Fatalf("update: %v", err)
	}
	m = read(merged)
	if n := len(m["contexts"].([]any)); n != 2 {
		t.Errorf("contexts: %d, want prod and the proxy's", n)
	}
	if m["preferences"].(map[string]any)["colors"] != true {
		t.Errorf("preferences lost: %v", m)
	}
	if kubectl, err := exec.LookPath("kubectl"); err == nil {
		out, err := exec.Command(kubectl, "--kubeconfig", merged, "config", "view", "--raw", "-o",
			"jsonpath={.current-context} {.contexts[*].name} {.clusters[?(@.name=='k8s.meshd.internal')].cluster.server} {.users[?(@.name=='prod-admin')].user.token} {.contexts[?(@.name=='prod')].context.namespace}").CombinedOutput()
		if err != nil || strings.TrimSpace(string(out)) != "k8s.meshd.internal k8s.meshd.internal prod https://k8s.meshd.internal secret-token web" {
			t.Errorf("kubectl config view: %v %q", err, out)
		}
	} else {
		t.Fatalf("kubectl is needed (Debian package kubernetes-client): %v", err)
	}

	for _, bad := range []string{"clusters: 3\n", "- a\n- b\n", "contexts: [1]\n", "{"} {
		p := filepath.Join(dir, "bad")
		os.WriteFile(p, []byte(bad), 0o600)
		if _, err := writeKubeconfig(p, "x", "https://x", ca); err == nil {
			t.Errorf("%q: no error", bad)
		}
		if b, _ := os.ReadFile(p); string(b) != bad {
			t.Errorf("%q: file changed to %q", bad, b)
		}
	}
}

func TestDefaultKubeconfig(t *testing.T) {
	for _, tt := range []struct {
		env  map[string]string
		want string
		err  bool
	}{
		{map[string]string{"KUBECONFIG": "/a:/b", "HOME": "/h"}, "/a", false},
		{map[string]string{"KUBECONFIG": ":/b", "HOME": "/h"}, "/b", false},
		{map[string]string{"HOME": "/h"}, "/h/.kube/config", false},
		{map[string]string{}, "", true},
	} {
		got, err := defaultKubeconfig(func(k string) string { return tt.env[k] })
		if got != tt.want || (err != nil) != tt.err {
			t.Errorf("%v: %q %v", tt.env, got, err)
		}
	}
}

// TestReadmeKubernetesPolicy: the README's example policy for the proxy
// passes `meshd policy check` without warnings.
func TestReadmeKubernetesPolicy(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(b), "<!-- k8s-policy -->\n```hujson\n")
	pol, _, ok2 := strings.Cut(rest, "```")
	if !ok || !ok2 {
		t.Fatal("README: no policy block after <!-- k8s-policy -->")
	}
	code, out, stderr := runPolicy(t, "check", writePolicy(t, "readme.hujson", pol))
	if code != 0 || !strings.Contains(out, "0 warning(s)") || !strings.Contains(pol, "tailscale.com/cap/kubernetes") {
		t.Errorf("README policy: exit %d\n%s%s", code, out, stderr)
	}
}

// FuzzWriteKubeconfig: whatever the existing file holds, no panic; a
// refused file is left as it was; an accepted one ends up a kubeconfig
// with the context current and a rerun changes nothing.
func FuzzWriteKubeconfig(f *testing.F) {
	seeds, _ := filepath.Glob("testdata/kubeconfig/*")
	for _, s := range seeds {
		b, err := os.ReadFile(s)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, old []byte) {
		p := filepath.Join(t.TempDir(), "config")
		if err := os.WriteFile(p, old, 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := writeKubeconfig(p, "k8s.meshd.internal", "https://k8s.meshd.internal", []byte("ca")); err != nil {
			if b, _ := os.ReadFile(p); string(b) != string(old) {
				t.Fatalf("refused (%v) but changed the file", err)
			}
			return
		}
		b, _ := os.ReadFile(p)
		m := map[string]any{}
		if err := yaml.Unmarshal(b, &m); err != nil || m["current-context"] != "k8s.meshd.internal" {
			t.Fatalf("result %q: %v", b, err)
		}
		if changed, err := writeKubeconfig(p, "k8s.meshd.internal", "https://k8s.meshd.internal", []byte("ca")); err != nil || changed {
			t.Fatalf("rerun: changed %v err %v\n%s", changed, err, b)
		}
	})
}
