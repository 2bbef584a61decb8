package agent

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/netmap"
)

// runningAgent is a daemon on a state dir that tests stop and start again.
type runningAgent struct {
	*Agent
	stop func()
}

// startAgent runs a daemon on dir, or returns New's error.
func startAgent(t *testing.T, dir string) (*runningAgent, error) {
	t.Helper()
	a, err := New(Options{StateDir: dir, TUN: TUNUserspace, LoopbackOnly: true, EndpointInterval: time.Second, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
		a.Close()
	}
	t.Cleanup(stop)
	return &runningAgent{Agent: a, stop: stop}, nil
}

// enrolledDir returns the state dir of a node enrolled with m and stopped.
func enrolledDir(t *testing.T, m *testMesh, name string) (string, netmap.NodeID) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), name)
	a, err := startAgent(t, dir)
	if err != nil {
		t.Fatal(err)
	}
	st, err := a.Up(context.Background(), localapi.UpRequest{AuthKey: m.key, Coordinator: m.url, Hostname: name})
	if err != nil {
		t.Fatal(err)
	}
	waitStatus(t, a.Agent, "a saved map", func(*localapi.Status) bool {
		_, err := os.Stat(filepath.Join(dir, netmapFile))
		return err == nil
	})
	a.stop()
	return dir, st.Self.ID
}

// TestCorruptMapCacheNotFatal: a corrupt netmap.json is moved aside and the
// daemon starts anyway, as the same node, with a fresh map from the
// coordinator.
func TestCorruptMapCacheNotFatal(t *testing.T) {
	m := newTestMesh(t)
	dir, id := enrolledDir(t, m, "a")
	m.join("b")
	garbage := []byte(`{"epoch": "e", "version": 3, "full": tru`)
	if err := os.WriteFile(filepath.Join(dir, netmapFile), garbage, 0o600); err != nil {
		t.Fatal(err)
	}
	a, err := startAgent(t, dir)
	if err != nil {
		t.Fatalf("start with a corrupt map cache: %v", err)
	}
	st := waitStatus(t, a.Agent, "a fresh map with peer b", func(st *localapi.Status) bool {
		return st.BackendState == localapi.StateRunning && peerNamed(st, "b") != nil
	})
	if st.Self.ID != id {
		t.Fatalf("restarted as node %d, was %d", st.Self.ID, id)
	}
	aside, _ := filepath.Glob(filepath.Join(dir, netmapFile+".corrupt-*"))
	if len(aside) != 1 {
		t.Fatalf("moved-aside copies: %v", aside)
	}
	if got, _ := os.ReadFile(aside[0]); !bytes.Equal(got, garbage) {
		t.Fatalf("moved-aside copy holds %q", got)
	}
	waitStatus(t, a.Agent, "the fresh map saved", func(*localapi.Status) bool {
		nm, err := readSavedMap(dir)
		return err == nil && nm.Self.ID == id
	})
}

// readSavedMap decodes dir's netmap.json without moving it aside (the
// daemon holds the dir's lock).
func readSavedMap(dir string) (*netmap.NetworkMap, error) {
	b, err := os.ReadFile(filepath.Join(dir, netmapFile))
	if err != nil {
		return nil, err
	}
	var resp netmap.MapResponse
	if err := netmap.DecodeJSON(bytes.NewReader(b), maxStateFile, &resp); err != nil {
		return nil, err
	}
	var nm netmap.NetworkMap
	return &nm, nm.Apply(&resp)
}

// TestCorruptIdentityNeverBecomesNew: a corrupt or missing identity of an
// enrolled node stops the daemon, on the first start and on every start
// after, until the operator restores it or chooses a new identity; it is
// never silently replaced.
func TestCorruptIdentityNeverBecomesNew(t *testing.T) {
	m := newTestMesh(t)
	for _, tc := range []struct {
		name     string
		damage   func(t *testing.T, path string)
		want     []string // in the error of the second start
		giveUp   []string // what the operator removes to start over
		firstErr bool     // the first start reports a CorruptFileError
	}{
		{"corrupt", func(t *testing.T, path string) { os.WriteFile(path, []byte(`{"machine_key": "AAAA`), 0o600) },
			[]string{"moved aside as corrupt", "restore identity.json", "login.json"}, []string{identityFile + ".corrupt-*", loginFile}, true},
		{"deleted", func(t *testing.T, path string) { os.Remove(path) },
			[]string{"identity.json is missing", "says this machine is enrolled", "remove"}, []string{loginFile}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir, _ := enrolledDir(t, m, "n-"+tc.name)
			path := filepath.Join(dir, identityFile)
			tc.damage(t, path)
			_, err := startAgent(t, dir)
			var ce *CorruptFileError
			if err == nil || tc.firstErr != errors.As(err, &ce) {
				t.Fatalf("first start: %v", err)
			}
			for i := range 2 {
				_, err = startAgent(t, dir)
				if err == nil {
					t.Fatalf("start %d after the damage made a new identity", i+2)
				}
				for _, w := range tc.want {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("start %d: error lacks %q: %v", i+2, w, err)
					}
				}
				if _, serr := os.Stat(path); !errors.Is(serr, os.ErrNotExist) {
					t.Fatalf("start %d wrote an identity: %v", i+2, serr)
				}
			}
			// The operator's choice: start over as a new machine.
			for _, g := range tc.giveUp {
				files, _ := filepath.Glob(filepath.Join(dir, g))
				for _, f := range files {
					os.Remove(f)
				}
			}
			a, err := startAgent(t, dir)
			if err != nil {
				t.Fatalf("after removing %v: %v", tc.giveUp, err)
			}
			if st, _ := a.Status(context.Background()); st.BackendState != localapi.StateNeedsLogin {
				t.Fatalf("new identity is %s, want NeedsLogin", st.BackendState)
			}
		})
	}
}

// TestCorruptLoginKeepsIdentity: a corrupt login.json stops the first start;
// the next one is logged out but keeps the machine's identity, so enrolling
// again is the same machine to the coordinator.
func TestCorruptLoginKeepsIdentity(t *testing.T) {
	m := newTestMesh(t)
	dir, id := enrolledDir(t, m, "a")
	before, err := os.ReadFile(filepath.Join(dir, identityFile))
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, loginFile), []byte(`{"coordinator_url": `), 0o600)
	var ce *CorruptFileError
	if _, err := startAgent(t, dir); !errors.As(err, &ce) {
		t.Fatalf("first start: %v, want a CorruptFileError", err)
	}
	a, err := startAgent(t, dir)
	if err != nil {
		t.Fatal(err)
	}
	if after, _ := os.ReadFile(filepath.Join(dir, identityFile)); !bytes.Equal(before, after) {
		t.Fatal("identity changed")
	}
	st, err := a.Up(context.Background(), localapi.UpRequest{AuthKey: m.key, Coordinator: m.url, Hostname: "a"})
	if err != nil || st.Self.ID != id {
		t.Fatalf("enrolled again as %v (%v), want node %d", st, err, id)
	}
}
