package localapi

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"

	servecfg "meshd.dev/meshd/agent/serve"
)

// serveBackend records serve edits and refuses a removal of port 1.
type serveBackend struct {
	fakeBackend
	calls []string
}

func (b *serveBackend) ServeStatus(context.Context) (*ServeStatus, error) {
	b.calls = append(b.calls, "status")
	return &ServeStatus{DNSName: "n.t.", Entries: []servecfg.EntryStatus{{Entry: servecfg.Entry{Proto: servecfg.TCP, Port: 22, Target: "127.0.0.1:22"}}}}, nil
}

func (b *serveBackend) ServeAdd(_ context.Context, r ServeRequest) (*ServeStatus, error) {
	b.calls = append(b.calls, "add "+r.Proto+" "+r.Target)
	return &ServeStatus{}, nil
}

func (b *serveBackend) ServeRemove(_ context.Context, r ServeRequest) (*ServeStatus, error) {
	if r.Port == 1 {
		return nil, errors.New("serve: tailnet port 1 is not served: nothing to change")
	}
	b.calls = append(b.calls, "remove "+r.Proto)
	return &ServeStatus{}, nil
}

func (b *serveBackend) ServeReset(context.Context) (*ServeStatus, error) {
	b.calls = append(b.calls, "reset")
	return &ServeStatus{}, nil
}

// TestServeEndpoints: the client's serve calls reach the backend's
// methods with their arguments, and a refusal comes back as its message.
func TestServeEndpoints(t *testing.T) {
	b := &serveBackend{}
	c := serve(t, b)
	ctx := context.Background()
	st, err := c.ServeStatus(ctx)
	if err != nil || st.DNSName != "n.t." || len(st.Entries) != 1 || st.Entries[0].Port != 22 {
		t.Fatalf("status: %+v, %v", st, err)
	}
	if _, err := c.ServeAdd(ctx, ServeRequest{Proto: "http", Port: 80, Target: "3000"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ServeRemove(ctx, ServeRequest{Proto: "tcp", Port: 22}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ServeRemove(ctx, ServeRequest{Proto: "tcp", Port: 1}); err == nil || !strings.Contains(err.Error(), "port 1 is not served") {
		t.Fatalf("refused removal: %v", err)
	}
	if _, err := c.ServeReset(ctx); err != nil {
		t.Fatal(err)
	}
	if want := []string{"status", "add http 3000", "remove tcp", "reset"}; !slices.Equal(b.calls, want) {
		t.Fatalf("backend calls %q, want %q", b.calls, want)
	}
	// A backend without serve has no such endpoints.
	if _, err := serve(t, &fakeBackend{}).ServeStatus(ctx); err == nil || !strings.Contains(err.Error(), "404") {
		t.Fatalf("serve status on a backend without serve: %v", err)
	}
}
