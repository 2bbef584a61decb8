package localapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

type fakeBackend struct {
	ups   []UpRequest
	downs int
}

func (f *fakeBackend) Up(_ context.Context, req UpRequest) (*Status, error) {
	if req.AuthKey == "bad" {
		return nil, errors.New("register: auth key unknown (check the key)")
	}
	f.ups = append(f.ups, req)
	return &Status{BackendState: StateRunning, Self: &Node{ID: 7, Hostname: req.Hostname}}, nil
}

func (f *fakeBackend) Down(context.Context) error { f.downs++; return nil }

func (f *fakeBackend) Status(context.Context) (*Status, error) {
	return &Status{BackendState: StateStopped, Peers: []Peer{{Node: Node{ID: 2, Hostname: "p"}, Path: "none"}}}, nil
}

func (f *fakeBackend) Drops(context.Context) (*Drops, error) {
	return &Drops{Drops: []Drop{{
		Time: time.Unix(1700000000, 0).UTC(), Dir: "in", Reason: "no_rule", Proto: 6,
		Src: netip.MustParseAddr("100.64.0.1"), Dst: netip.MustParseAddr("100.64.0.2"), SrcPort: 40000, DstPort: 9090,
		Len: 60, AllowedNowBy: "grants[0]",
	}}}, nil
}

func TestLocalAPIRoundTrip(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "meshd.sock")
	ln, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, want 0600", fi.Mode().Perm())
	}
	b := &fakeBackend{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, ln, b) }()
	defer func() {
		cancel()
		<-done
	}()

	// A second daemon on the same socket is refused, not allowed to steal it.
	if _, err := Listen(sock); err == nil || !strings.Contains(err.Error(), "already listening") {
		t.Errorf("second Listen: %v", err)
	}

	c := NewClient(sock)
	st, err := c.Up(ctx, UpRequest{AuthKey: "k", Coordinator: "https://c", Hostname: "h1", Tags: []string{"tag:a"}})
	if err != nil {
		t.Fatal(err)
	}
	if st.Self.ID != 7 || st.Self.Hostname != "h1" || len(b.ups) != 1 || b.ups[0].Tags[0] != "tag:a" {
		t.Fatalf("up: %+v, backend saw %+v", st, b.ups)
	}
	if _, err := c.Up(ctx, UpRequest{AuthKey: "bad"}); err == nil || err.Error() != "register: auth key unknown (check the key)" {
		t.Fatalf("up with bad key: %v", err)
	}
	if err := c.Down(ctx); err != nil || b.downs != 1 {
		t.Fatalf("down: %v, downs=%d", err, b.downs)
	}
	st, err = c.Status(ctx)
	if err != nil || st.BackendState != StateStopped || len(st.Peers) != 1 || st.Peers[0].Path != "none" {
		t.Fatalf("status: %+v, %v", st, err)
	}
	d, err := c.Drops(ctx)
	want, _ := b.Drops(ctx)
	if err != nil || len(d.Drops) != 1 || d.Drops[0] != want.Drops[0] {
		t.Fatalf("drops: %+v, %v; want %+v", d, err, want)
	}

	// Profiles: the binary heap profile is gzip (pprof's format), the text
	// goroutine dump names this test's goroutine, and a bad name is refused
	// before any request.
	var heap bytes.Buffer
	if err := c.Profile(ctx, "heap", nil, &heap); err != nil || !bytes.HasPrefix(heap.Bytes(), []byte{0x1f, 0x8b}) {
		t.Fatalf("heap profile: %v, %d bytes starting %x", err, heap.Len(), heap.Bytes()[:min(4, heap.Len())])
	}
	var gr bytes.Buffer
	if err := c.Profile(ctx, "goroutine", url.Values{"debug": {"1"}}, &gr); err != nil || !strings.Contains(gr.String(), "TestLocalAPIRoundTrip") {
		t.Fatalf("goroutine profile: %v\n%s", err, gr.String())
	}
	if err := c.Profile(ctx, "nosuch", nil, io.Discard); err == nil || !strings.Contains(err.Error(), "404") {
		t.Fatalf("unknown profile: %v", err)
	}
	if err := c.Profile(ctx, "../v0/status", nil, io.Discard); err == nil || !strings.Contains(err.Error(), "want one of") {
		t.Fatalf("profile name with a slash: %v", err)
	}
}

func TestClientNoDaemon(t *testing.T) {
	dir := t.TempDir()
	// Missing socket, and a stale socket file nobody listens on.
	stale := filepath.Join(dir, "stale.sock")
	ln, err := Listen(stale)
	if err != nil {
		t.Fatal(err)
	}
	ln.(interface{ SetUnlinkOnClose(bool) }).SetUnlinkOnClose(false)
	ln.Close()
	for _, sock := range []string{filepath.Join(dir, "missing.sock"), stale} {
		_, err := NewClient(sock).Status(context.Background())
		if !errors.Is(err, ErrNoDaemon) {
			t.Errorf("%s: got %v, want ErrNoDaemon", sock, err)
		}
	}
	// A stale socket is replaced by a new daemon.
	ln, err = Listen(stale)
	if err != nil {
		t.Fatalf("Listen over stale socket: %v", err)
	}
	ln.Close()
}

// waitingBackend leaves NeedsApproval after a number of WaitState calls
// that end without a change (as when one /v0/watch request reaches its
// bound), or never when block is set.
type waitingBackend struct {
	fakeBackend
	unchanged int // WaitState calls that return the state unchanged
	block     bool
	calls     int
}

func (w *waitingBackend) WaitState(ctx context.Context, from string) (*Status, error) {
	w.calls++
	if w.block {
		<-ctx.Done()
	}
	if w.block || w.calls <= w.unchanged {
		return &Status{BackendState: from}, nil
	}
	return &Status{BackendState: StateRunning, Self: &Node{ID: 7}}, nil
}

func serve(t *testing.T, b Backend) *Client {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "meshd.sock")
	ln, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, ln, b) }()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	return NewClient(sock)
}

// TestWaitState: the client keeps asking until the state changes, gives
// up when its context ends, and a daemon without the endpoint is an error,
// not a loop.
func TestWaitState(t *testing.T) {
	ctx := context.Background()
	b := &waitingBackend{unchanged: 2}
	st, err := serve(t, b).WaitState(ctx, StateNeedsApproval)
	if err != nil || st.BackendState != StateRunning || st.Self.ID != 7 || b.calls != 3 {
		t.Fatalf("WaitState = %+v, %v after %d calls; want Running after 3", st, err, b.calls)
	}

	cctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if _, err := serve(t, &waitingBackend{block: true}).WaitState(cctx, StateNeedsApproval); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WaitState after the caller's deadline: %v", err)
	}

	if _, err := serve(t, &fakeBackend{}).WaitState(ctx, StateNeedsApproval); err == nil || !strings.Contains(err.Error(), "404") {
		t.Fatalf("WaitState without the endpoint: %v", err)
	}
}

// TestUpRequestCannotNamePaths: a local user drives DNS through `up` with
// a bool and nothing else. The request type has no path in it, so a path
// a client puts in a request (the resolver file, its backup, the state
// dir) is dropped at the API and never reaches the daemon, which takes
// every path from its own flags: the local API cannot make it write a
// file the user chooses. A value of the wrong type is refused.
func TestUpRequestCannotNamePaths(t *testing.T) {
	tests := []struct {
		name string
		body string
		want int // status code
	}{
		{"accept-dns off", `{"accept_dns":false}`, 200},
		{"resolver file path", `{"accept_dns":true,"resolv_conf":"/etc/evil-resolv.conf","ResolvConf":"/etc/evil-resolv.conf"}`, 200},
		{"backup path", `{"backup_file":"/etc/evil-backup","BackupFile":"/etc/evil-backup"}`, 200},
		{"state dir", `{"state_dir":"/etc/evil-state","StateDir":"/etc/evil-state"}`, 200},
		{"accept-dns as a path", `{"accept_dns":"/etc/evil-resolv.conf"}`, 400},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := &fakeBackend{}
			rec := httptest.NewRecorder()
			Handler(b).ServeHTTP(rec, httptest.NewRequest("POST", "/v0/up", strings.NewReader(tt.body)))
			if rec.Code != tt.want {
				t.Fatalf("status %d (%s), want %d", rec.Code, rec.Body, tt.want)
			}
			if tt.want != 200 {
				if len(b.ups) != 0 {
					t.Fatal("a refused request reached the daemon")
				}
				return
			}
			if len(b.ups) != 1 {
				t.Fatalf("backend saw %d requests", len(b.ups))
			}
			seen, _ := json.Marshal(b.ups[0])
			if strings.Contains(string(seen), "/etc/") {
				t.Fatalf("a path reached the daemon: %s", seen)
			}
		})
	}
}
