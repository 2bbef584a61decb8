package main

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/agent"
)

// TestBugreport runs a node (`up --foreground`, in process) and `meshd
// bugreport` against it: the archive holds the status, netcheck, the
// daemon's recent log lines, profiles and versions, is mode 0600, and
// contains none of the node's private keys (in any encoding) nor the auth
// key it enrolled with, in any file, profiles decompressed included.
func TestBugreport(t *testing.T) {
	cr := startCoordinatorArgs(t)
	t.Setenv("MESHD_COORDINATOR", cr.url)
	t.Setenv("MESHD_TOKEN_FILE", filepath.Join(cr.dir, "admin.token"))
	t.Setenv("MESHD_AUTHKEY", "")
	code, out, errOut := runAdmin(t, "keys", "create", "--tags", "tag:bug")
	if code != 0 {
		t.Fatalf("keys create: %d %s", code, errOut)
	}
	authKey := strings.TrimSpace(out)
	dir := t.TempDir()
	stateDir, sock := filepath.Join(dir, "state"), filepath.Join(dir, "s.sock")
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"up", "--foreground", "--authkey", authKey, "--hostname", "bug", "--state-dir", stateDir,
			"--socket", sock, "--tun", "userspace", "--port", "0", "--loopback-only"}, pw, io.Discard)
		pw.Close()
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	running := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			if strings.Contains(sc.Text(), "running as bug") {
				close(running)
			}
		}
	}()
	select {
	case <-running:
	case <-time.After(30 * time.Second):
		t.Fatal("the node did not come up")
	}

	archive := filepath.Join(dir, "report.tar.gz")
	var stdout, stderr bytes.Buffer
	if code := run(context.Background(), []string{"bugreport", "--socket", sock, "--state-dir", stateDir, "--out", archive, "--cpu-profile", "1s"}, &stdout, &stderr); code != 0 {
		t.Fatalf("bugreport: exit %d: %s", code, stderr.String())
	}
	if st, err := os.Stat(archive); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("archive: %v %v, want mode 0600", st, err)
	}
	files := readArchive(t, archive)
	for _, name := range []string{"version.txt", "status.json", "drops.json", "logs.txt", "netcheck.json", "goroutines.txt", "heap.pb.gz", "cpu.pb.gz", "metrics.txt"} {
		if len(files[name]) == 0 {
			t.Errorf("archive lacks %s (errors.txt: %s)", name, files["errors.txt"])
		}
	}
	var st struct {
		Self struct{ Hostname string } `json:"self"`
	}
	if err := json.Unmarshal(files["status.json"], &st); err != nil || st.Self.Hostname != "bug" {
		t.Errorf("status.json: %v: %.200s", err, files["status.json"])
	}
	if !strings.Contains(string(files["logs.txt"]), "packet filter updated") {
		t.Errorf("logs.txt lacks the daemon's lines:\n%s", files["logs.txt"])
	}
	// The daemon's metrics, as `meshd metrics` prints them.
	if !strings.Contains(string(files["metrics.txt"]), "meshd_") {
		t.Errorf("metrics.txt has no meshd_ series:\n%.500s", files["metrics.txt"])
	}

	// The secrets, in every form they could take.
	b, err := os.ReadFile(filepath.Join(stateDir, "identity.json"))
	if err != nil {
		t.Fatal(err)
	}
	var id agent.Identity
	if err := json.Unmarshal(b, &id); err != nil {
		t.Fatal(err)
	}
	nk := id.NodeKey.Raw()
	secrets := map[string]string{
		"auth key":             authKey,
		"auth key secret":      strings.Split(authKey, "-")[2],
		"node key (hex)":       hex.EncodeToString(nk[:]),
		"node key (base64)":    base64.StdEncoding.EncodeToString(nk[:]),
		"machine key (hex)":    hex.EncodeToString(id.MachineKey.Seed()),
		"machine key (base64)": base64.StdEncoding.EncodeToString(id.MachineKey),
	}
	for name, data := range files {
		for what, s := range secrets {
			if bytes.Contains(data, []byte(s)) {
				t.Errorf("%s contains the %s", name, what)
			}
		}
	}
}

// readArchive returns the files of a bugreport archive by base name, with
// gzipped profiles decompressed.
func readArchive(t *testing.T, path string) map[string][]byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(zr)
	out := map[string][]byte{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		if strings.HasSuffix(h.Name, ".gz") {
			zr, err := gzip.NewReader(bytes.NewReader(data))
			if err != nil {
				t.Fatalf("%s: %v", h.Name, err)
			}
			if data, err = io.ReadAll(zr); err != nil {
				t.Fatalf("%s: %v", h.Name, err)
			}
		}
		out[filepath.Base(h.Name)] = data
	}
}
