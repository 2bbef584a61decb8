package control

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/control/controlclient"
)

// relayRequest sends a request with token as the bearer, pinned to ts.
func relayRequest(t *testing.T, ts *testServer, method, path, token string) *http.Response {
	t.Helper()
	// No client timeout: a revocation stream must stay open until the
	// coordinator ends it.
	req, err := http.NewRequestWithContext(t.Context(), method, ts.url+path, strings.NewReader(`{"keys":[]}`))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	hc := &http.Client{Transport: controlclient.PinnedTransport(ts.Fingerprint())}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

func mustReadToken(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// TestRotateTokens: rotating the admin or the relay token through the admin
// API retires the old one at once (and closes a relay's revocation stream
// opened with it), writes the new one to the state dir, audits it, and
// survives a restart. Only the admin token may rotate; a relay token holder
// may not.
func TestRotateTokens(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	ts := startServer(t, ServerOptions{StateDir: dir})
	relayPath, err := ts.EnableRelayVerify()
	if err != nil {
		t.Fatal(err)
	}
	oldRelay := mustReadToken(t, relayPath)
	oldAdmin := mustReadToken(t, ts.AdminTokenPath())
	ac, err := NewAdminClient(ts.url, oldAdmin)
	if err != nil {
		t.Fatal(err)
	}

	// No token, or a made-up one, rotates nothing.
	for _, tok := range []string{"", "msadm-" + strings.Repeat("a", 32) + "-" + ts.Fingerprint()} {
		if resp := relayRequest(t, ts, http.MethodPost, "/admin/v1/tokens/admin/rotate", tok); resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("rotating with token %q: HTTP %d, want 401", tok, resp.StatusCode)
		}
	}
	if got := mustReadToken(t, ts.AdminTokenPath()); got != oldAdmin {
		t.Fatal("a refused rotation changed admin.token")
	}
	// The relay token opens the relay API only.
	if resp := relayRequest(t, ts, http.MethodPost, "/admin/v1/tokens/relay/rotate", oldRelay); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("a relay token holder rotating a token: HTTP %d, want 401", resp.StatusCode)
	}
	if _, err := ac.RotateToken(ctx, "root"); !errors.Is(err, controlclient.ErrBadRequest) {
		t.Fatalf("rotate an unknown kind: %v, want a bad request", err)
	}

	// A relay holds its revocation stream with the old relay token.
	stream := relayRequest(t, ts, http.MethodGet, relayRevocationsPath, oldRelay)
	if stream.StatusCode != http.StatusOK {
		t.Fatalf("revocation stream: HTTP %d", stream.StatusCode)
	}
	lines := bufio.NewReader(stream.Body)
	if l, err := lines.ReadString('\n'); err != nil || !strings.Contains(l, "ready") {
		t.Fatalf("revocation stream's first line %q, %v", l, err)
	}
	rr, err := ac.RotateToken(ctx, TokenRelay)
	if err != nil {
		t.Fatal(err)
	}
	if rr.Kind != TokenRelay || rr.Path != relayPath || rr.Token == oldRelay || !strings.HasPrefix(rr.Token, relayTokenPrefix+"-") {
		t.Fatalf("rotated relay token %+v", rr)
	}
	if got := mustReadToken(t, relayPath); got != rr.Token {
		t.Fatalf("relay.token holds %q, want the new token", got)
	}
	done := make(chan error, 1)
	go func() {
		_, err := io.Copy(io.Discard, lines)
		done <- err
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the revocation stream opened with the old relay token is still open after the rotation")
	}
	if resp := relayRequest(t, ts, http.MethodPost, relayVerifyPath, oldRelay); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("old relay token after rotation: HTTP %d, want 401", resp.StatusCode)
	}
	if resp := relayRequest(t, ts, http.MethodPost, relayVerifyPath, rr.Token); resp.StatusCode != http.StatusOK {
		t.Fatalf("new relay token: HTTP %d, want 200", resp.StatusCode)
	}

	ar, err := ac.RotateToken(ctx, TokenAdmin)
	if err != nil {
		t.Fatal(err)
	}
	if got := mustReadToken(t, ts.AdminTokenPath()); got != ar.Token || ar.Token == oldAdmin {
		t.Fatalf("admin.token holds %q after rotating to %q (old %q)", got, ar.Token, oldAdmin)
	}
	if _, err := ac.Nodes(ctx); !errors.Is(err, controlclient.ErrUnauthorized) {
		t.Fatalf("old admin token after rotation: %v, want unauthorized", err)
	}
	nac, err := NewAdminClient(ts.url, ar.Token)
	if err != nil {
		t.Fatal(err)
	}
	var actions []string
	if err := nac.AuditLog(ctx, time.Time{}, func(e AuditEvent) bool {
		actions = append(actions, e.Action)
		return true
	}); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{AuditRelayTokenRotate, AuditAdminTokenRotate} {
		if !strings.Contains(strings.Join(actions, " "), want) {
			t.Errorf("audit log %v lacks %s", actions, want)
		}
	}

	// A restart keeps both new tokens.
	ts.stop(t)
	ts2 := startServer(t, ServerOptions{StateDir: dir})
	if _, err := ts2.EnableRelayVerify(); err != nil {
		t.Fatal(err)
	}
	if got := mustReadToken(t, ts2.AdminTokenPath()); got != ar.Token {
		t.Fatalf("after a restart admin.token is %q, want the rotated %q", got, ar.Token)
	}
	if _, err := adminClient(t, ts2).Nodes(ctx); err != nil {
		t.Fatalf("rotated admin token after a restart: %v", err)
	}
	if resp := relayRequest(t, ts2, http.MethodPost, relayVerifyPath, rr.Token); resp.StatusCode != http.StatusOK {
		t.Fatalf("rotated relay token after a restart: HTTP %d, want 200", resp.StatusCode)
	}
}

// TestRotateRelayTokenNeedsRelayVerify: a coordinator that verifies no
// relays has no relay token to rotate, and says so.
func TestRotateRelayTokenNeedsRelayVerify(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	_, err := adminClient(t, ts).RotateToken(context.Background(), TokenRelay)
	if !errors.Is(err, controlclient.ErrBadRequest) || !strings.Contains(err.Error(), "does not verify relays") {
		t.Fatalf("rotate the relay token without relay verification: %v", err)
	}
}
