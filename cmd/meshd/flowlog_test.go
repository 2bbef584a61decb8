package main

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"meshd.dev/meshd/agent"
)

// TestFlowLogFlags: the flow log flags are checked; a --flow-log-* flag
// without --flow-log is an error (it would change nothing); "-" is
// standard output and a file is created 0600.
func TestFlowLogFlags(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "flows.jsonl")
	for _, tc := range []struct {
		args    []string
		wantErr string
		stdout  bool
		file    bool
	}{
		{args: nil},
		{args: []string{"--flow-log", "-"}, stdout: true},
		{args: []string{"--flow-log", file, "--flow-log-interval", "10s", "--flow-log-max-size", "1", "--flow-log-files", "0"}, file: true},
		{args: []string{"--flow-log-interval", "10s"}, wantErr: "need --flow-log"},
		{args: []string{"--flow-log-files", "2"}, wantErr: "need --flow-log"},
		{args: []string{"--flow-log", "flows.jsonl"}, wantErr: "absolute path"},
		{args: []string{"--flow-log", "-", "--flow-log-interval", "100ms"}, wantErr: "at least 1s"},
		{args: []string{"--flow-log", "-", "--flow-log-max-size", "0"}, wantErr: "--flow-log-max-size"},
		{args: []string{"--flow-log", "-", "--flow-log-files", "-1"}, wantErr: "--flow-log-files"},
		{args: []string{"--flow-log", "-", "--flow-log-max-flows", "0"}, wantErr: "--flow-log-max-flows"},
		{args: []string{"--flow-log", filepath.Join(dir, "missing", "flows.jsonl")}, wantErr: "no such file"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			var f flowLogFlags
			fs := flag.NewFlagSet("", flag.ContinueOnError)
			f.register(fs)
			if err := fs.Parse(tc.args); err != nil {
				t.Fatal(err)
			}
			var opts agent.Options
			var stdout bytes.Buffer
			err := f.apply(&opts, &stdout)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			switch {
			case tc.stdout && opts.FlowLog != &stdout:
				t.Errorf("--flow-log - writes to %T, not standard output", opts.FlowLog)
			case !tc.stdout && !tc.file && opts.FlowLog != nil:
				t.Errorf("no --flow-log, but a sink %T", opts.FlowLog)
			case tc.file:
				if st, err := os.Stat(file); err != nil || st.Mode().Perm() != 0o600 {
					t.Errorf("flow log file: %v %v", st, err)
				}
			}
		})
	}
}
