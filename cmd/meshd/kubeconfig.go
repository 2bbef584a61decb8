package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/peterbourgon/ff/v3/ffcli"
	"gopkg.in/yaml.v3"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/internal/atomicfile"
)

func (c *cli) configureCmd() *ffcli.Command {
	return &ffcli.Command{
		Name:        "configure",
		ShortUsage:  "meshd configure kubeconfig NODE",
		ShortHelp:   "configure local tools for the tailnet",
		Subcommands: []*ffcli.Command{c.kubeconfigCmd()},
		Exec:        func(context.Context, []string) error { return flag.ErrHelp },
	}
}

func (c *cli) kubeconfigCmd() *ffcli.Command {
	fset := flag.NewFlagSet("kubeconfig", flag.ContinueOnError)
	socket := fset.String("socket", localapi.DefaultSocket, "local API unix socket of the daemon")
	path := fset.String("kubeconfig", "", "kubeconfig `file` to write; default: the first file in $KUBECONFIG, else ~/.kube/config")
	port := fset.Uint("port", 443, "tailnet port of the proxy (meshd k8s-proxy --listen-port)")
	return &ffcli.Command{
		Name:       "kubeconfig",
		ShortUsage: "meshd configure kubeconfig [--kubeconfig FILE] [--port N] NODE",
		ShortHelp:  "add a kubeconfig context for the Kubernetes API proxy (meshd k8s-proxy) on NODE and make it current",
		LongHelp: `Adds (or updates) a cluster, user and context named after NODE's MagicDNS name
in the kubeconfig: server https://NODE.SUFFIX, trusting the tailnet CA from this
node's daemon. Other clusters, users and contexts stay as they are; the context
becomes the current one. The user entry holds the placeholder token "unused": in
auth mode the proxy drops it and decides who you are from the tailnet (for a
noauth proxy, put your own credentials in that user). NODE is a peer's hostname or its
MagicDNS name. A run that changes nothing says so and exits 1.`,
		FlagSet: fset,
		Options: envOptions,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) != 1 {
				return &exitError{2, "configure kubeconfig: want exactly one NODE (the proxy's hostname or MagicDNS name)"}
			}
			if *port == 0 || *port > 65535 {
				return &exitError{2, fmt.Sprintf("configure kubeconfig: --port %d: want 1-65535", *port)}
			}
			file := *path
			if file == "" {
				var err error
				if file, err = defaultKubeconfig(os.Getenv); err != nil {
					return err
				}
			}
			lc := localapi.NewClient(*socket)
			st, err := lc.Status(ctx)
			if err != nil {
				return noDaemonHint(err, *socket)
			}
			name, err := proxyName(st, args[0])
			if err != nil {
				return err
			}
			ca, err := lc.TailnetCA(ctx)
			if err != nil {
				return fmt.Errorf("configure kubeconfig: the tailnet CA: %w", err)
			}
			server := "https://" + name
			if *port != 443 {
				server += ":" + strconv.FormatUint(uint64(*port), 10)
			}
			changed, err := writeKubeconfig(file, name, server, []byte(ca.CertPEM))
			if err != nil {
				return err
			}
			if !changed {
				return &exitError{1, fmt.Sprintf("configure kubeconfig: %s already has context %s for %s: nothing changed", file, name, server)}
			}
			fmt.Fprintf(c.stdout, "wrote context %s (server %s) to %s and made it current\n", name, server, file)
			return nil
		},
	}
}

// defaultKubeconfig is where kubectl looks first: the first file in
// $KUBECONFIG, else ~/.kube/config.
func defaultKubeconfig(getenv func(string) string) (string, error) {
	for p := range strings.SplitSeq(getenv("KUBECONFIG"), string(os.PathListSeparator)) {
		if p != "" {
			return p, nil
		}
	}
	home := getenv("HOME")
	if home == "" {
		return "", errors.New("configure kubeconfig: neither $KUBECONFIG nor $HOME is set: give --kubeconfig")
	}
	return filepath.Join(home, ".kube", "config"), nil
}

// proxyName is the MagicDNS name (no trailing dot) of the peer node names:
// its hostname or its DNS name.
func proxyName(st *localapi.Status, node string) (string, error) {
	want := strings.TrimSuffix(strings.ToLower(node), ".")
	for _, p := range st.Peers {
		dns := strings.TrimSuffix(strings.ToLower(p.DNSName), ".")
		if want != strings.ToLower(p.Hostname) && want != dns {
			continue
		}
		if dns == "" {
			return "", fmt.Errorf("configure kubeconfig: node %s has no MagicDNS name (the coordinator sends none)", node)
		}
		return dns, nil
	}
	return "", &exitError{1, fmt.Sprintf("configure kubeconfig: no peer %q in this node's network map (see meshd status)", node)}
}

// writeKubeconfig adds or replaces the cluster, user and context name in
// file (YAML or JSON, as kubectl reads both) and makes the context current,
// keeping everything else. It reports whether the file changed.
func writeKubeconfig(file, name, server string, caPEM []byte) (bool, error) {
	old, err := os.ReadFile(file)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return false, fmt.Errorf("configure kubeconfig: %w", err)
	}
	cfg := map[string]any{}
	if len(bytes.TrimSpace(old)) > 0 {
		if err := yaml.Unmarshal(old, &cfg); err != nil {
			return false, fmt.Errorf("configure kubeconfig: %s is not a kubeconfig (left unchanged): %w", file, err)
		}
		if cfg == nil {
			cfg = map[string]any{}
		}
	}
	if _, ok := cfg["apiVersion"]; !ok {
		cfg["apiVersion"] = "v1"
	}
	if _, ok := cfg["kind"]; !ok {
		cfg["kind"] = "Config"
	}
	entries := []struct {
		list, key string
		val       map[string]any
	}{
		{"clusters", "cluster", map[string]any{"server": server, "certificate-authority-data": base64.StdEncoding.EncodeToString(caPEM)}},
		// A user without any credential makes kubectl prompt for a
		// username and password; the proxy (auth mode) removes this token
		// and decides who the caller is from the tailnet, as Tailscale's
		// kubeconfig does.
		{"users", "user", map[string]any{"token": "unused"}},
		{"contexts", "context", map[string]any{"cluster": name, "user": name}},
	}
	for _, e := range entries {
		list, err := namedList(cfg[e.list])
		if err != nil {
			return false, fmt.Errorf("configure kubeconfig: %s: %s: %w (left unchanged)", file, e.list, err)
		}
		item := map[string]any{"name": name, e.key: e.val}
		replaced := false
		for i, x := range list {
			if m, ok := x.(map[string]any); ok && m["name"] == name {
				list[i], replaced = item, true
			}
		}
		if !replaced {
			list = append(list, item)
		}
		cfg[e.list] = list
	}
	cfg["current-context"] = name
	out, err := yaml.Marshal(cfg)
	if err != nil {
		return false, fmt.Errorf("configure kubeconfig: %w", err)
	}
	if bytes.Equal(out, old) {
		return false, nil
	}
	if err := os.MkdirAll(filepath.Dir(file), 0o700); err != nil {
		return false, fmt.Errorf("configure kubeconfig: %w", err)
	}
	if err := atomicfile.Write(file, out, 0o600); err != nil {
		return false, fmt.Errorf("configure kubeconfig: %w", err)
	}
	return true, nil
}

// namedList is a kubeconfig list (clusters, users, contexts): absent or
// null is empty; anything but a list of objects is an error.
func namedList(v any) ([]any, error) {
	if v == nil {
		return nil, nil
	}
	l, ok := v.([]any)
	if !ok {
		return nil, fmt.Errorf("not a list")
	}
	for _, x := range l {
		if _, ok := x.(map[string]any); !ok {
			return nil, fmt.Errorf("an entry is not an object")
		}
	}
	return l, nil
}
