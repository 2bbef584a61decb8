package main

import (
	"flag"
	"fmt"
	"io"
	"path/filepath"
	"time"

	"meshd.dev/meshd/agent"
	"meshd.dev/meshd/flowlog"
)

// flowLogFlags are the daemon's flow log flags (docs/flowlog.md).
type flowLogFlags struct {
	path     string
	interval time.Duration
	maxSize  int
	files    int
	maxFlows int
}

func (f *flowLogFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.path, "flow-log", "", `write the flow log (one JSON line per flow per interval) to this absolute FILE, rotated by size, or "-" for standard output`)
	fs.DurationVar(&f.interval, "flow-log-interval", flowlog.DefaultInterval, "how long the flow log aggregates a flow before it writes a line (at least 1s)")
	fs.IntVar(&f.maxSize, "flow-log-max-size", flowlog.DefaultMaxSize>>20, "rotate the flow log file when it would pass this many MiB")
	fs.IntVar(&f.files, "flow-log-files", flowlog.DefaultKeep, "how many rotated flow log files to keep besides the current one")
	fs.IntVar(&f.maxFlows, "flow-log-max-flows", flowlog.DefaultMaxFlows, "flows the flow log tracks per interval; packets of flows beyond it are counted as overflow, not logged")
}

// apply checks the flags and sets opts' flow log. Every flow log flag
// needs --flow-log: one without it would change nothing.
func (f *flowLogFlags) apply(opts *agent.Options, stdout io.Writer) error {
	if f.path == "" {
		if f.interval != flowlog.DefaultInterval || f.maxSize != flowlog.DefaultMaxSize>>20 || f.files != flowlog.DefaultKeep || f.maxFlows != flowlog.DefaultMaxFlows {
			return fmt.Errorf("--flow-log-* flags need --flow-log FILE|-")
		}
		return nil
	}
	switch {
	case f.interval < time.Second:
		return fmt.Errorf("--flow-log-interval %v: want at least 1s", f.interval)
	case f.maxSize < 1:
		return fmt.Errorf("--flow-log-max-size %d: want at least 1 (MiB)", f.maxSize)
	case f.files < 0:
		return fmt.Errorf("--flow-log-files %d: want 0 or more", f.files)
	case f.maxFlows < 1:
		return fmt.Errorf("--flow-log-max-flows %d: want at least 1", f.maxFlows)
	}
	opts.FlowLogInterval, opts.FlowLogMaxFlows = f.interval, f.maxFlows
	if f.path == "-" {
		opts.FlowLog = stdout
		return nil
	}
	if !filepath.IsAbs(f.path) {
		return fmt.Errorf("--flow-log %q: want an absolute path or -", f.path)
	}
	// The file stays open for the life of the process: each line is one
	// unbuffered write, so nothing is lost when the process exits.
	rf, err := flowlog.OpenRotating(f.path, int64(f.maxSize)<<20, f.files)
	if err != nil {
		return fmt.Errorf("--flow-log: %w", err)
	}
	opts.FlowLog = rf
	return nil
}
