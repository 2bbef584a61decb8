package main

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"

	"meshd.dev/meshd/agent"
	"meshd.dev/meshd/agent/localapi"
)

// TestServeCLI drives `meshd serve` against a real agent (not up, so
// entries are configured but not listening): every change is saved, a
// change that would change nothing exits 1, bad input exits 2 before the
// daemon is asked, and status lists the entries in text and JSON.
func TestServeCLI(t *testing.T) {
	dir := t.TempDir()
	a, err := agent.New(agent.Options{StateDir: filepath.Join(dir, "state"), TUN: agent.TUNUserspace, MTU: 1280, Logger: slog.New(slog.DiscardHandler),
		Forwards: []agent.Forward{{Port: 9000, Target: "127.0.0.1:9000"}}})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	sock := filepath.Join(dir, "meshd.sock")
	ln, err := localapi.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- localapi.Serve(ctx, ln, a) }()
	stopped := false
	stopAPI := func() {
		if !stopped {
			stopped = true
			cancel()
			<-done
		}
	}
	defer stopAPI()

	steps := []struct {
		args []string
		code int
		out  string // a substring of stdout+stderr
	}{
		{[]string{"serve", "status"}, 0, "nothing is served"},
		{[]string{"serve", "--http", "8080", "--to", "3000"}, 0, "serving http://TAILNET-ADDRESS:8080/ -> http://127.0.0.1:3000"},
		{[]string{"serve", "--http", "8080", "--to", "http://127.0.0.1:3000"}, 1, "already serves http http://127.0.0.1:3000"},
		{[]string{"serve", "--tcp", "8080", "--to", "22"}, 1, "tailnet port 8080 is already served (http to http://127.0.0.1:3000)"},
		{[]string{"serve", "--tcp", "2222", "--to", "localhost:22"}, 0, "serving tcp TAILNET-ADDRESS:2222 -> localhost:22"},
		{[]string{"serve", "--tcp", "9000", "--to", "22"}, 1, "taken by --forward 9000=127.0.0.1:9000"},
		{[]string{"serve", "--https", "443", "--to", "3000"}, 1, "HTTPS needs a certificate from the tailnet CA"},
		{[]string{"serve", "--http", "80", "--to", "http://10.0.0.7:3000"}, 2, "only proxies to this machine"},
		{[]string{"serve", "--http", "80"}, 2, "needs --to TARGET"},
		{[]string{"serve", "--http", "80", "--tcp", "81", "--to", "3000"}, 2, "exactly one of"},
		{[]string{"serve", "--http", "0", "--to", "3000"}, 1, "1-65535"}, // a flag parse error, as for every command
		{[]string{"serve", "--http", "80", "--to", "3000", "off"}, 2, "--to and off together"},
		{[]string{"serve", "--http", "80", "--to", "3000", "extra"}, 2, "unexpected arguments"},
		{[]string{"serve", "--http", "80", "off"}, 1, "tailnet port 80 is not served"},
		{[]string{"serve", "--http", "2222", "off"}, 1, "served as tcp, not http"},
		{[]string{"serve", "status"}, 0, "http://TAILNET-ADDRESS:8080/  http://127.0.0.1:3000  not listening"},
		{[]string{"serve", "status"}, 0, "# the node is not up"},
		{[]string{"serve", "--tcp", "2222", "off"}, 0, "stopped serving tcp on tailnet port 2222"},
		{[]string{"serve", "reset"}, 0, "nothing is served now"},
		{[]string{"serve", "reset"}, 1, "nothing is served: nothing to change"},
		{[]string{"serve", "--http", "80", "--to", "http://[::1]:8080/app"}, 0, "serving http://TAILNET-ADDRESS/ -> http://[::1]:8080/app"},
	}
	for _, s := range steps {
		var out bytes.Buffer
		// --socket right after serve, as `meshd` users and the e2e
		// helpers put it, for the subcommands too.
		args := append([]string{"serve", "--socket", sock}, s.args[1:]...)
		code := run(context.Background(), args, &out, &out)
		if code != s.code || !strings.Contains(out.String(), s.out) {
			t.Errorf("meshd %s: exit %d, want %d with %q:\n%s", strings.Join(s.args, " "), code, s.code, s.out, out.String())
		}
	}

	var out bytes.Buffer
	if code := run(context.Background(), []string{"serve", "status", "--json", "--socket", sock}, &out, &out); code != 0 { // the subcommand's own flag
		t.Fatalf("status --json: exit %d: %s", code, out.String())
	}
	var st localapi.ServeStatus
	if err := json.Unmarshal(out.Bytes(), &st); err != nil || len(st.Entries) != 1 || st.Entries[0].Port != 80 ||
		st.Entries[0].Proto != "http" || st.Entries[0].Target != "http://[::1]:8080/app" {
		t.Fatalf("status --json: %v\n%s", err, out.String())
	}
	// Saved: a new agent on the state dir has the entry.
	stopAPI()
	a.Close()
	a2, err := agent.New(agent.Options{StateDir: filepath.Join(dir, "state"), TUN: agent.TUNUserspace, MTU: 1280, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer a2.Close()
	if st, _ := a2.ServeStatus(context.Background()); len(st.Entries) != 1 || st.Entries[0].Port != 80 {
		t.Fatalf("after a restart: %+v", st)
	}
}
