package main

import (
	"bytes"
	"errors"
	"flag"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

// manifestDocs decodes every YAML document of a dist/kubernetes file.
func manifestDocs(t *testing.T, name string) []map[string]any {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "dist", "kubernetes", name))
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	var docs []map[string]any
	for {
		var d map[string]any
		err := dec.Decode(&d)
		if errors.Is(err, io.EOF) {
			return docs
		}
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		docs = append(docs, d)
	}
}

func get(v any, path ...any) any {
	for _, p := range path {
		switch k := p.(type) {
		case string:
			m, _ := v.(map[string]any)
			v = m[k]
		case int:
			l, _ := v.([]any)
			if k >= len(l) {
				return nil
			}
			v = l[k]
		}
	}
	return v
}

// envFlags checks that every MESHD_* variable of a container is a flag of
// fs (ff reads MESHD_FLAG_NAME), or one the entrypoint consumes: a typo
// there would be silently ignored by Kubernetes and meshd alike.
func envFlags(t *testing.T, file string, container any, fs *flag.FlagSet, entrypoint []string) {
	t.Helper()
	env, _ := get(container, "env").([]any)
	if len(env) == 0 {
		t.Fatalf("%s: container without env", file)
	}
	for _, e := range env {
		name, _ := get(e, "name").(string)
		flagName := strings.ReplaceAll(strings.ToLower(strings.TrimPrefix(name, "MESHD_")), "_", "-")
		if !strings.HasPrefix(name, "MESHD_") || (fs.Lookup(flagName) == nil && !slices.Contains(entrypoint, name)) {
			t.Errorf("%s: env %s is no flag of the command", file, name)
		}
	}
}

func TestDistKubernetesProxy(t *testing.T) {
	const file = "k8s-proxy.yaml"
	docs := manifestDocs(t, file)
	kinds := map[string]map[string]any{}
	for _, d := range docs {
		kinds[d["kind"].(string)] = d
	}
	role := kinds["ClusterRole"]
	rules, _ := role["rules"].([]any)
	if len(rules) != 1 || !slices.Equal(toStrings(get(rules[0], "verbs")), []string{"impersonate"}) ||
		!slices.Equal(toStrings(get(rules[0], "resources")), []string{"users", "groups"}) {
		t.Errorf("ClusterRole must allow impersonating users and groups only: %v", rules)
	}
	sa := get(kinds["ServiceAccount"], "metadata", "name")
	if get(kinds["ClusterRoleBinding"], "subjects", 0, "name") != sa || get(kinds["ClusterRoleBinding"], "roleRef", "name") != get(role, "metadata", "name") {
		t.Errorf("the binding does not bind the role to the service account")
	}
	pod := get(kinds["StatefulSet"], "spec", "template", "spec")
	if get(pod, "serviceAccountName") != sa {
		t.Errorf("the proxy does not run as its service account")
	}
	c := get(pod, "containers", 0)
	if !slices.Equal(toStrings(get(c, "command")), []string{"meshd", "k8s-proxy"}) {
		t.Errorf("command %v", get(c, "command"))
	}
	cli := &cli{stdout: io.Discard, stderr: io.Discard}
	envFlags(t, file, c, cli.k8sProxyCmd().FlagSet, nil)
}

func TestDistKubernetesDaemonSet(t *testing.T) {
	const file = "daemonset.yaml"
	docs := manifestDocs(t, file)
	if len(docs) != 1 || docs[0]["kind"] != "DaemonSet" {
		t.Fatalf("want one DaemonSet, got %v", docs)
	}
	pod := get(docs[0], "spec", "template", "spec")
	if get(pod, "hostNetwork") != true {
		t.Errorf("the node daemon must run in the host's network namespace")
	}
	// The image's entrypoint (`meshd up --foreground`) takes these itself.
	cli := &cli{stdout: io.Discard, stderr: io.Discard}
	envFlags(t, file, get(pod, "containers", 0), cli.upCmd().FlagSet, []string{"MESHD_STATE_DIR", "MESHD_TUN", "MESHD_SOCKET", "MESHD_HOSTNAME"})
}

func toStrings(v any) []string {
	l, _ := v.([]any)
	var out []string
	for _, x := range l {
		s, _ := x.(string)
		out = append(out, s)
	}
	return out
}

// TestDistKubernetesProbes: the node's containers have startup, readiness
// and liveness probes, all running the image's entrypoint probe (ready for
// startup and readiness, live for liveness), so a node that is not running
// is not Ready and the sidecar's app starts only once it is.
func TestDistKubernetesProbes(t *testing.T) {
	for _, tt := range []struct {
		file string
		path []any // to the meshd container
	}{
		{"sidecar.yaml", []any{"spec", "template", "spec", "initContainers", 0}},
		{"daemonset.yaml", []any{"spec", "template", "spec", "containers", 0}},
	} {
		c := get(manifestDocs(t, tt.file)[0], tt.path...)
		if get(c, "name") != "meshd" {
			t.Fatalf("%s: no meshd container at %v", tt.file, tt.path)
		}
		for probe, want := range map[string]string{"startupProbe": "ready", "readinessProbe": "ready", "livenessProbe": "live"} {
			cmd := toStrings(get(c, probe, "exec", "command"))
			if !slices.Equal(cmd, []string{"/usr/local/bin/meshd-entrypoint", "probe", want}) {
				t.Errorf("%s: %s runs %v, want the entrypoint's probe %s", tt.file, probe, cmd, want)
			}
		}
	}
}
