package agent

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/control/controlclient/controltest"
)

// TestLogout: `meshd logout` on a node that is not ephemeral expires its
// key at the coordinator, stops it, forgets the registration (the next up
// needs the auth key again) and says so; a second logout has nothing to
// do and says that. While the coordinator is unreachable a logout changes
// nothing.
func TestLogout(t *testing.T) {
	m := newFakeMesh(t)
	a := m.join("a")
	b := m.join("b")
	waitStatus(t, a, "a to see b", func(st *localapi.Status) bool { return peerNamed(st, "b") != nil })
	ctx := context.Background()

	m.fake.SetDown(true)
	if _, err := b.Logout(ctx); err == nil || !strings.Contains(err.Error(), "nothing changed") {
		t.Fatalf("logout with the coordinator down: %v, want an error saying nothing changed", err)
	}
	if _, err := os.Stat(filepath.Join(b.store.Dir(), loginFile)); err != nil {
		t.Fatalf("a failed logout removed the login: %v", err)
	}
	m.fake.SetDown(false)

	res, err := b.Logout(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !res.Expired || res.Deleted {
		t.Fatalf("logout of a node that is not ephemeral: %+v, want its key expired", res)
	}
	waitStatus(t, a, "b gone from a's peers", func(st *localapi.Status) bool { return peerNamed(st, "b") == nil })
	st, err := b.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.BackendState != localapi.StateNeedsLogin {
		t.Fatalf("state after logout %q, want %q", st.BackendState, localapi.StateNeedsLogin)
	}
	for _, f := range []string{loginFile, netmapFile} {
		if _, err := os.Stat(filepath.Join(b.store.Dir(), f)); !os.IsNotExist(err) {
			t.Fatalf("%s after logout: %v, want it removed", f, err)
		}
	}
	if _, err := b.Logout(ctx); err == nil || !strings.Contains(err.Error(), "not logged in") {
		t.Fatalf("second logout: %v, want 'not logged in'", err)
	}
	// Back with the auth key: the same node, from the same identity.
	if _, err := b.Up(ctx, localapi.UpRequest{AuthKey: m.key, Coordinator: m.url, Hostname: "b"}); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, a, "b back in a's peers", func(st *localapi.Status) bool { return peerNamed(st, "b") != nil })
}

// TestEphemeralLogoutOnStop: an ephemeral node's daemon logs it out as it
// stops, so the coordinator deletes it at once; one taken down first with
// `meshd down` is left enrolled, and a stop during an up (which may wait
// long for an approval) does not wait for it and leaves the node to the
// coordinator's timeout.
func TestEphemeralLogoutOnStop(t *testing.T) {
	const key = "mskey-controltest"
	fake := controltest.New(controltest.Options{AuthKey: key, Tags: []string{"tag:ci"}, Ephemeral: true})
	m := &testMesh{t: t, fake: fake, url: "https://controltest.invalid", key: key}
	watcher := m.join("watcher")
	for _, tc := range []struct {
		name    string
		down    bool
		busy    bool
		deleted bool
	}{
		{"job", false, false, true},
		{"paused", true, false, false},
		{"upping", false, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts := m.options(filepath.Join(t.TempDir(), tc.name))
			a, err := New(opts)
			if err != nil {
				t.Fatal(err)
			}
			defer a.Close()
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- a.Run(ctx) }()
			if _, err := a.Up(context.Background(), localapi.UpRequest{AuthKey: key, Coordinator: m.url, Hostname: tc.name}); err != nil {
				t.Fatal(err)
			}
			waitStatus(t, watcher, tc.name+" in the watcher's peers", func(st *localapi.Status) bool { return peerNamed(st, tc.name) != nil })
			if tc.down {
				if err := a.Down(context.Background()); err != nil {
					t.Fatal(err)
				}
			}
			if tc.busy {
				a.upMu.Lock() // as an up in flight holds it
				defer a.upMu.Unlock()
			}
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("the daemon did not stop")
			}
			if tc.deleted {
				waitStatus(t, watcher, tc.name+" deleted", func(st *localapi.Status) bool { return peerNamed(st, tc.name) == nil })
			}
			// Delete succeeds only for a node the fake still has.
			err = fake.Delete(tc.name)
			if tc.deleted != (err != nil) {
				t.Fatalf("after the daemon stopped, the coordinator still had the node: %v; want %v", err == nil, !tc.deleted)
			}
		})
	}
}
