package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/internal/logring"
	"meshd.dev/meshd/nat/netcheck"
)

func (c *cli) bugreportCmd() *ffcli.Command {
	fs := flag.NewFlagSet("bugreport", flag.ContinueOnError)
	socket := fs.String("socket", localapi.DefaultSocket, "local API unix socket of the daemon")
	out := fs.String("out", "", "write the archive to this `file` (default: meshd-bugreport-HOST-TIME.tar.gz in the current directory)")
	stateDir := fs.String("state-dir", "/var/lib/meshd", "the node's state `directory`, for the DERP map netcheck measures against (only netmap.json is read)")
	cpu := fs.Duration("cpu-profile", 5*time.Second, "how long to profile the daemon's CPU (0: no CPU profile)")
	return &ffcli.Command{
		Name:       "bugreport",
		ShortUsage: "meshd bugreport [--out FILE] [--socket PATH] [--state-dir DIR] [--cpu-profile 5s]",
		ShortHelp:  "write one .tar.gz of status, netcheck, recent daemon logs, metrics, profiles and versions for a bug report",
		LongHelp: `Collects what a bug report needs from the running daemon into one archive:
status.json, drops.json, netcheck.json, logs.txt (the daemon's recent log
lines), metrics.txt (if the daemon serves metrics), goroutines.txt,
heap.pb.gz, cpu.pb.gz, version.txt, and errors.txt for any part that could not
be collected. It never includes private keys, auth keys or tokens: the
daemon masks them in its log lines, the other parts hold none, and every
text file is masked again before it is written (docs/audit.md). The archive
is mode 0600.`,
		FlagSet: fs,
		Options: envOptions,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return &exitError{2, fmt.Sprintf("bugreport: unexpected arguments %q", args)}
			}
			if *cpu < 0 || *cpu > time.Minute {
				return &exitError{2, fmt.Sprintf("bugreport: --cpu-profile %v: want 0 to 1m", *cpu)}
			}
			path := *out
			if path == "" {
				host, _ := os.Hostname()
				path = fmt.Sprintf("meshd-bugreport-%s-%s.tar.gz", host, time.Now().UTC().Format("20060102T150405Z"))
			}
			cl := localapi.NewClient(*socket)
			// Fail early and clearly when there is no daemon: an archive of
			// errors helps nobody.
			if _, err := cl.Status(ctx); err != nil {
				return noDaemonHint(err, *socket)
			}
			files := collectBugreport(ctx, cl, *stateDir, *cpu)
			if err := writeBugreport(path, files); err != nil {
				return fmt.Errorf("bugreport: %w", err)
			}
			fmt.Fprintf(c.stdout, "wrote %s (%d files)\n", path, len(files))
			return nil
		},
	}
}

// bugreportFile is one file of the archive.
type bugreportFile struct {
	name string
	data []byte
	// binary files (gzipped profiles) cannot be masked; they hold stacks
	// and sizes, never memory contents.
	binary bool
}

// collectBugreport gathers every part; a part that fails is named in
// errors.txt instead.
func collectBugreport(ctx context.Context, cl *localapi.Client, stateDir string, cpu time.Duration) []bugreportFile {
	var files []bugreportFile
	var errs []string
	add := func(name string) func([]byte, error) {
		return func(data []byte, err error) {
			if err != nil {
				errs = append(errs, fmt.Sprintf("%s: %v", name, err))
				return
			}
			files = append(files, bugreportFile{name: name, data: data, binary: strings.HasSuffix(name, ".gz")})
		}
	}
	asJSON := func(v any, err error) ([]byte, error) {
		if err != nil {
			return nil, err
		}
		return json.MarshalIndent(v, "", "  ")
	}
	add("version.txt")(versionText(), nil)
	add("status.json")(asJSON(cl.Status(ctx)))
	add("drops.json")(asJSON(cl.Drops(ctx)))
	if logs, err := cl.Logs(ctx); err != nil {
		add("logs.txt")(nil, err)
	} else {
		var b bytes.Buffer
		if logs.Dropped > 0 {
			fmt.Fprintf(&b, "(%d older lines not kept)\n", logs.Dropped)
		}
		for _, l := range logs.Lines {
			b.WriteString(l)
			b.WriteByte('\n')
		}
		add("logs.txt")(b.Bytes(), nil)
	}
	add("netcheck.json")(runNetcheckJSON(ctx, stateDir))
	// The metrics, where the daemon serves them on its local API.
	fetch := func(f func(w *bytes.Buffer) error) ([]byte, error) {
		var b bytes.Buffer
		err := f(&b)
		return b.Bytes(), err
	}
	add("metrics.txt")(fetch(func(w *bytes.Buffer) error { return cl.Get(ctx, "/v0/metrics", w) }))
	// debug=1: stacks grouped, without the argument words debug=2 prints.
	add("goroutines.txt")(fetch(func(w *bytes.Buffer) error { return cl.Profile(ctx, "goroutine", url.Values{"debug": {"1"}}, w) }))
	add("heap.pb.gz")(fetch(func(w *bytes.Buffer) error { return cl.Profile(ctx, "heap", nil, w) }))
	if cpu > 0 {
		secs := url.Values{"seconds": {strconv.Itoa(max(1, int(cpu.Seconds())))}}
		add("cpu.pb.gz")(fetch(func(w *bytes.Buffer) error { return cl.Profile(ctx, "profile", secs, w) }))
	}
	if len(errs) > 0 {
		files = append(files, bugreportFile{name: "errors.txt", data: []byte(strings.Join(errs, "\n") + "\n")})
	}
	return files
}

// runNetcheckJSON measures against the DERP map of the node's last map.
func runNetcheckJSON(ctx context.Context, stateDir string) ([]byte, error) {
	m, err := savedDERPMap(stateDir)
	if err != nil {
		return nil, err
	}
	r, err := netcheck.Run(ctx, netcheck.Options{DERPMap: m, Timeout: 3 * time.Second})
	if err != nil {
		return nil, err
	}
	return json.MarshalIndent(newNetcheckJSON(m, r), "", "  ")
}

// versionText is this binary's version, build settings and the system's.
func versionText() []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "time: %s\ngo: %s\nos/arch: %s/%s\ncpus: %d\n", time.Now().UTC().Format(time.RFC3339), runtime.Version(), runtime.GOOS, runtime.GOARCH, runtime.NumCPU())
	if bi, ok := debug.ReadBuildInfo(); ok {
		fmt.Fprintf(&b, "meshd: %s %s\n", bi.Main.Path, bi.Main.Version)
		for _, s := range bi.Settings {
			if strings.HasPrefix(s.Key, "vcs.") || s.Key == "-pgo" || s.Key == "GOAMD64" || s.Key == "CGO_ENABLED" {
				fmt.Fprintf(&b, "%s: %s\n", s.Key, s.Value)
			}
		}
	}
	if v, err := os.ReadFile("/proc/version"); err == nil {
		fmt.Fprintf(&b, "kernel: %s", v)
	}
	return b.Bytes()
}

// writeBugreport writes files as a .tar.gz at path (mode 0600), through a
// temporary file renamed into place, masking secrets in every text file.
func writeBugreport(path string, files []bugreportFile) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".meshd-bugreport-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	if err := tmp.Chmod(0o600); err != nil {
		return err
	}
	zw := gzip.NewWriter(tmp)
	tw := tar.NewWriter(zw)
	now := time.Now()
	for _, f := range files {
		data := f.data
		if !f.binary {
			data = logring.Redact(data)
		}
		if err := tw.WriteHeader(&tar.Header{Name: "meshd-bugreport/" + f.name, Mode: 0o600, Size: int64(len(data)), ModTime: now, Typeflag: tar.TypeReg}); err != nil {
			return err
		}
		if _, err := tw.Write(data); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return err
	}
	if err := tmp.Sync(); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
