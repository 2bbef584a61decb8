package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
)

func repoFile(t *testing.T, rel string) string {
	t.Helper()
	_, self, _, _ := runtime.Caller(0)
	p := filepath.Join(filepath.Dir(self), "..", "..", rel)
	if _, err := os.Stat(p); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestContainerEntrypoint runs dist/container/entrypoint.sh with a fake
// meshd on PATH that records its arguments and environment.
func TestContainerEntrypoint(t *testing.T) {
	script := repoFile(t, "dist/container/entrypoint.sh")
	if out, err := exec.Command("sh", "-n", script).CombinedOutput(); err != nil {
		t.Fatalf("sh -n: %v\n%s", err, out)
	}
	host, err := os.Hostname()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name     string
		env      []string
		args     []string
		login    bool // state dir already holds a registration
		wantArgs []string
		wantEnv  []string // must be in meshd's environment
		noEnv    []string // must not be
		wantCode int
	}{
		{
			name: "defaults",
			env:  []string{"MESHD_AUTHKEY=mskey-1", "MESHD_COORDINATOR=https://c:8443"},
			wantArgs: []string{"up", "--foreground", "--state-dir", "/var/lib/meshd", "--tun", "userspace",
				"--socket", "/var/lib/meshd/meshd.sock", "--hostname", host},
			wantEnv: []string{"MESHD_AUTHKEY=mskey-1", "MESHD_COORDINATOR=https://c:8443"},
			noEnv:   []string{"MESHD_TUN=", "MESHD_STATE_DIR="},
		},
		{
			name: "overrides and extra args",
			env: []string{"MESHD_AUTHKEY=mskey-2", "MESHD_COORDINATOR=https://c:8443", "MESHD_STATE_DIR={state}",
				"MESHD_TUN=meshd0", "MESHD_HOSTNAME=inference-1", "MESHD_FORWARD=8000=127.0.0.1:8000"},
			args: []string{"--port", "0"},
			wantArgs: []string{"up", "--foreground", "--state-dir", "{state}", "--tun", "meshd0",
				"--socket", "{state}/meshd.sock", "--hostname", "inference-1", "--port", "0"},
			wantEnv: []string{"MESHD_AUTHKEY=mskey-2", "MESHD_FORWARD=8000=127.0.0.1:8000"},
			noEnv:   []string{"MESHD_HOSTNAME="},
		},
		{
			name:     "no coordinator, nothing registered",
			env:      []string{"MESHD_AUTHKEY=mskey-3", "MESHD_STATE_DIR={state}"},
			wantCode: 64,
		},
		{
			name:     "restart from state without settings",
			env:      []string{"MESHD_STATE_DIR={state}", "MESHD_HOSTNAME=h"},
			login:    true,
			wantArgs: []string{"up", "--foreground", "--state-dir", "{state}", "--tun", "userspace", "--socket", "{state}/meshd.sock", "--hostname", "h"},
			noEnv:    []string{"MESHD_AUTHKEY="},
		},
		{
			// A recreated container (new hostname) on the old volume: the
			// registered name stays, so the container hostname is not passed.
			name:     "restart from state, default hostname",
			env:      []string{"MESHD_STATE_DIR={state}", "MESHD_AUTHKEY=mskey-4"},
			login:    true,
			wantArgs: []string{"up", "--foreground", "--state-dir", "{state}", "--tun", "userspace", "--socket", "{state}/meshd.sock"},
			wantEnv:  []string{"MESHD_AUTHKEY=mskey-4"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			state := filepath.Join(dir, "state")
			os.MkdirAll(state, 0o700)
			if tc.login {
				os.WriteFile(filepath.Join(state, "login.json"), []byte(`{"coordinator_url":"https://c"}`), 0o600)
			}
			bin := filepath.Join(dir, "bin")
			os.MkdirAll(bin, 0o755)
			record := filepath.Join(dir, "record")
			fake := "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done > " + record + ".args\nenv > " + record + ".env\n"
			if err := os.WriteFile(filepath.Join(bin, "meshd"), []byte(fake), 0o755); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command("sh", append([]string{script}, tc.args...)...)
			cmd.Env = []string{"PATH=" + bin + ":/usr/bin:/bin"}
			for _, e := range tc.env {
				cmd.Env = append(cmd.Env, strings.ReplaceAll(e, "{state}", state))
			}
			out, err := cmd.CombinedOutput()
			code := 0
			if ee, ok := err.(*exec.ExitError); ok {
				code = ee.ExitCode()
			} else if err != nil {
				t.Fatal(err)
			}
			if code != tc.wantCode {
				t.Fatalf("exit %d, want %d; output:\n%s", code, tc.wantCode, out)
			}
			if tc.wantCode != 0 {
				if !strings.Contains(string(out), "MESHD_COORDINATOR") {
					t.Fatalf("error does not say what to set: %s", out)
				}
				return
			}
			argsOut, err := os.ReadFile(record + ".args")
			if err != nil {
				t.Fatalf("fake meshd not run: %v; output:\n%s", err, out)
			}
			got := strings.Split(strings.TrimSuffix(string(argsOut), "\n"), "\n")
			var want []string
			for _, a := range tc.wantArgs {
				want = append(want, strings.ReplaceAll(a, "{state}", state))
			}
			if !slices.Equal(got, want) {
				t.Fatalf("meshd args:\n got %q\nwant %q", got, want)
			}
			envOut, _ := os.ReadFile(record + ".env")
			env := strings.Split(string(envOut), "\n")
			for _, w := range tc.wantEnv {
				if !slices.Contains(env, w) {
					t.Errorf("meshd env lacks %s", w)
				}
			}
			for _, n := range tc.noEnv {
				if slices.ContainsFunc(env, func(e string) bool { return strings.HasPrefix(e, n) }) {
					t.Errorf("meshd env has %s...", n)
				}
			}
		})
	}
}

// TestSystemdUnit checks the unit with systemd's own verifier, pointing
// ExecStart at a freshly built binary.
func TestSystemdUnit(t *testing.T) {
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Skip("systemd-analyze not installed; nothing to verify the unit with")
	}
	unit, err := os.ReadFile(repoFile(t, "dist/systemd/meshd.service"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"NoNewPrivileges=yes", "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW",
		"StateDirectory=meshd", "RuntimeDirectory=meshd", "ProtectSystem=strict", "Restart=on-failure", "DeviceAllow=/dev/net/tun rw"} {
		if !strings.Contains(string(unit), "\n"+want+"\n") {
			t.Errorf("unit lacks %q", want)
		}
	}
	bin := buildMeshd(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "meshd.service")
	os.WriteFile(path, []byte(strings.ReplaceAll(string(unit), "/usr/local/bin/meshd", bin)), 0o644)
	if out, err := exec.Command("systemd-analyze", "verify", path).CombinedOutput(); err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}
