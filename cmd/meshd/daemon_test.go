package main

import (
	"flag"
	"io"
	"testing"

	"github.com/peterbourgon/ff/v3"

	"meshd.dev/meshd/agent"
)

// TestPortFlag: the daemon tells a --port given (flag or MESHD_PORT),
// which must be free, from the default, which may fall back.
func TestPortFlag(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		env     string // MESHD_PORT
		want    int
		wantErr bool
	}{
		{"default", nil, "", agent.AutoPort, false},
		{"explicit default port", []string{"--port", "41641"}, "", 41641, false},
		{"explicit other port", []string{"--port", "5000"}, "", 5000, false},
		{"random", []string{"--port", "0"}, "", 0, false},
		{"from the environment", nil, "41641", 41641, false},
		{"out of range", []string{"--port", "70000"}, "", 0, true},
		{"negative", []string{"--port", "-1"}, "", 0, true},
		{"not a number", []string{"--port", "wg"}, "", 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("MESHD_PORT", tt.env)
			fs := flag.NewFlagSet("daemon", flag.ContinueOnError)
			fs.SetOutput(io.Discard)
			var af agentFlags
			af.register(fs)
			err := ff.Parse(fs, tt.args, envOptions...)
			if (err != nil) != tt.wantErr {
				t.Fatalf("parse %q (MESHD_PORT=%q): %v", tt.args, tt.env, err)
			}
			if err == nil && af.port.option() != tt.want {
				t.Fatalf("parse %q (MESHD_PORT=%q): Options.Port %d, want %d", tt.args, tt.env, af.port.option(), tt.want)
			}
		})
	}
}
