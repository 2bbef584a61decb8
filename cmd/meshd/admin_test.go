package main

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/control"
	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
)

// startCoordinator runs `meshd coordinator` in-process on a loopback port
// and returns its URL and state dir.
func startCoordinator(t *testing.T) (url, dir string) {
	t.Helper()
	cr := startCoordinatorArgs(t, "--ephemeral-timeout", "1m")
	if len(cr.out) < 3 || !strings.HasPrefix(cr.out[0], "coordinator listening on ") ||
		!strings.HasPrefix(cr.out[1], "fingerprint: ") || cr.out[2] != "admin token: "+filepath.Join(cr.dir, "admin.token") {
		t.Fatalf("coordinator start-up output %q", cr.out)
	}
	return cr.url, cr.dir
}

func runAdmin(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := run(context.Background(), append([]string{"admin"}, args...), &stdout, &stderr)
	return code, stdout.String(), stderr.String()
}

func TestAdminCommands(t *testing.T) {
	url, dir := startCoordinator(t)
	tok := filepath.Join(dir, "admin.token")
	if fi, err := os.Stat(tok); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("admin.token: %v %v; want mode 0600", fi.Mode(), err)
	}
	t.Setenv("MESHD_COORDINATOR", url)
	t.Setenv("MESHD_TOKEN_FILE", tok)

	code, out, errOut := runAdmin(t, "keys", "create", "--tags", "tag:gpu,tag:prod", "--reusable", "--expiry", "24h", "--json")
	if code != 0 {
		t.Fatalf("keys create: exit %d: %s", code, errOut)
	}
	var created struct {
		ID, Key                            string
		Reusable, Ephemeral, Preauthorized bool
		Tags                               []string
		Expires                            time.Time
	}
	if err := json.Unmarshal([]byte(out), &created); err != nil {
		t.Fatalf("keys create --json output %q: %v", out, err)
	}
	if !created.Reusable || strings.Join(created.Tags, ",") != "tag:gpu,tag:prod" || !strings.HasPrefix(created.Key, "mskey-"+created.ID+"-") ||
		created.Expires.Before(time.Now().Add(23*time.Hour)) {
		t.Fatalf("created key %+v", created)
	}
	for _, field := range []string{`"id"`, `"key"`, `"reusable"`, `"ephemeral"`, `"preauthorized"`, `"tags"`, `"expires"`} {
		if !strings.Contains(out, field) {
			t.Errorf("keys create --json lacks %s", field)
		}
	}

	// Human form: the key alone on stdout.
	code, out, _ = runAdmin(t, "keys", "create", "--user", "alice@example.com")
	userKey := strings.TrimSpace(out)
	if code != 0 || !strings.HasPrefix(userKey, "mskey-") || strings.Contains(userKey, "\n") {
		t.Fatalf("keys create --user: exit %d, stdout %q", code, out)
	}
	if code, _, errOut := runAdmin(t, "keys", "create"); code != 1 || !strings.Contains(errOut, "--tags") {
		t.Errorf("keys create without tags or user: exit %d, %q", code, errOut)
	}

	// A node enrols with the user's key, verifying the coordinator from it.
	_, mk, _ := ed25519.GenerateKey(rand.Reader)
	nk := netmap.NewNodePrivate()
	c, err := controlclient.NewClient(controlclient.ClientOptions{URL: strings.TrimPrefix(url, "https://"), MachineKey: mk, NodeKey: nk})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	resp, err := c.Register(context.Background(), netmap.RegisterRequest{NodeKey: nk.Public(), Hostname: "laptop", AuthKey: userKey})
	if err != nil {
		t.Fatal(err)
	}
	id := resp.Node.ID

	code, out, _ = runAdmin(t, "nodes", "list")
	if code != 0 || !strings.Contains(out, "HOSTNAME") || !strings.Contains(out, "laptop") || !strings.Contains(out, "alice@example.com") {
		t.Fatalf("nodes list: exit %d\n%s", code, out)
	}
	idArg := resp.Node.Addresses[0].Addr().String() // not an id
	if code, _, errOut := runAdmin(t, "nodes", "tag", idArg, "tag:x"); code != 2 || !strings.Contains(errOut, "not a positive number") {
		t.Errorf("nodes tag with an address: exit %d %q", code, errOut)
	}
	sid := jsonNum(id)
	if code, _, errOut := runAdmin(t, "nodes", "tag", sid, "tag:ci"); code != 0 {
		t.Fatalf("nodes tag: exit %d %s", code, errOut)
	}
	code, out, _ = runAdmin(t, "nodes", "list", "--json")
	var nodes []control.NodeInfo
	if err := json.Unmarshal([]byte(out), &nodes); code != 0 || err != nil || len(nodes) != 1 ||
		strings.Join(nodes[0].Tags, ",") != "tag:ci" || nodes[0].User != "" || nodes[0].Addresses[0] != resp.Node.Addresses[0] {
		t.Fatalf("nodes list --json after tag: exit %d %v %+v", code, err, nodes)
	}
	if !nodes[0].KeyExpiry.IsZero() {
		t.Errorf("tagged node has key expiry %v; want never", nodes[0].KeyExpiry)
	}
	// Back to a user: tags gone, a user's key expiry.
	if code, _, errOut := runAdmin(t, "nodes", "tag", sid, "tag:ci", "--user", "bob@example.com"); code != 2 || !strings.Contains(errOut, "only the node ID") {
		t.Errorf("nodes tag with tags and --user: exit %d %q", code, errOut)
	}
	if code, out, errOut := runAdmin(t, "nodes", "tag", sid, "--user", "bob@example.com"); code != 0 || !strings.Contains(out, "returned to bob@example.com") {
		t.Fatalf("nodes tag --user: exit %d %s %s", code, out, errOut)
	}
	code, out, _ = runAdmin(t, "nodes", "list", "--json")
	nodes = nil
	if err := json.Unmarshal([]byte(out), &nodes); code != 0 || err != nil || len(nodes) != 1 || len(nodes[0].Tags) != 0 ||
		nodes[0].User != "bob@example.com" || !nodes[0].KeyExpiry.After(time.Now().Add(24*time.Hour)) {
		t.Fatalf("nodes list --json after tag --user: exit %d %v %+v", code, err, nodes)
	}
	if code, _, errOut := runAdmin(t, "nodes", "expire", sid); code != 0 {
		t.Fatalf("nodes expire: %d %s", code, errOut)
	}
	if code, _, errOut := runAdmin(t, "nodes", "delete", sid); code != 0 {
		t.Fatalf("nodes delete: %d %s", code, errOut)
	}
	if code, _, errOut := runAdmin(t, "nodes", "delete", sid); code != 1 || !strings.Contains(errOut, "no node") {
		t.Errorf("deleting twice: exit %d %q", code, errOut)
	}

	if code, _, errOut := runAdmin(t, "keys", "revoke", created.ID); code != 0 {
		t.Fatalf("keys revoke: %d %s", code, errOut)
	}
	code, out, _ = runAdmin(t, "keys", "list", "--json")
	var keys []control.AuthKey
	if err := json.Unmarshal([]byte(out), &keys); code != 0 || err != nil || len(keys) != 2 {
		t.Fatalf("keys list --json: %d %v %s", code, err, out)
	}
	states := map[string]string{}
	for _, k := range keys {
		states[k.ID] = k.State
	}
	if states[created.ID] != "revoked" {
		t.Errorf("key states %v", states)
	}
	if code, out, _ := runAdmin(t, "keys", "list"); code != 0 || !strings.Contains(out, "revoked") || !strings.Contains(out, "used") {
		t.Errorf("keys list table:\n%s", out)
	}
	if code, out, _ := runAdmin(t, "users", "list"); code != 0 || !strings.Contains(out, "alice@example.com") || !strings.Contains(out, "bob@example.com") {
		t.Errorf("users list: %d\n%s", code, out)
	}

	// The token itself through the environment, without the file.
	data, _ := os.ReadFile(tok)
	t.Setenv("MESHD_TOKEN_FILE", "")
	t.Setenv("MESHD_ADMIN_TOKEN", strings.TrimSpace(string(data)))
	if code, _, errOut := runAdmin(t, "users", "list", "--json"); code != 0 {
		t.Errorf("MESHD_ADMIN_TOKEN: exit %d %s", code, errOut)
	}
	t.Setenv("MESHD_ADMIN_TOKEN", "")
	if code, _, errOut := runAdmin(t, "users", "list"); code != 2 || !strings.Contains(errOut, "--token-file") {
		t.Errorf("no token: exit %d %q", code, errOut)
	}
	t.Setenv("MESHD_COORDINATOR", "")
	if code, _, errOut := runAdmin(t, "keys", "list", "--token-file", tok); code != 2 || !strings.Contains(errOut, "--coordinator") {
		t.Errorf("no coordinator: exit %d %q", code, errOut)
	}
}

func jsonNum(id netmap.NodeID) string {
	b, _ := json.Marshal(id)
	return string(b)
}

func TestCoordinatorFlags(t *testing.T) {
	var stderr bytes.Buffer
	if code := run(context.Background(), []string{"coordinator", "--listen", "127.0.0.1:0"}, io.Discard, &stderr); code != 2 || !strings.Contains(stderr.String(), "--state-dir") {
		t.Errorf("without --state-dir: exit %d %q", code, stderr.String())
	}
	stderr.Reset()
	// A PostgreSQL database that cannot be reached: a clear error that
	// names it, without its password.
	if code := run(context.Background(), []string{"coordinator", "--state-dir", t.TempDir(), "--db", "postgres://meshd:s3cret@127.0.0.1:1/tailnet"}, io.Discard, &stderr); code != 1 ||
		!strings.Contains(stderr.String(), "postgres meshd@127.0.0.1:1/tailnet") || strings.Contains(stderr.String(), "s3cret") {
		t.Errorf("unreachable postgres: exit %d %q", code, stderr.String())
	}
	stderr.Reset()
	if code := run(context.Background(), []string{"coordinator", "--state-dir", t.TempDir(), "--db", "mysql://x"}, io.Discard, &stderr); code != 1 || !strings.Contains(stderr.String(), "postgres://") {
		t.Errorf("unknown database: exit %d %q", code, stderr.String())
	}
}

func TestAdminFlagsAfterArguments(t *testing.T) {
	url, dir := startCoordinator(t)
	tok := filepath.Join(dir, "admin.token")
	t.Setenv("MESHD_COORDINATOR", "")
	t.Setenv("MESHD_TOKEN_FILE", "")
	code, out, errOut := runAdmin(t, "keys", "create", "--tags", "tag:a", "--json", "--coordinator", url, "--token-file", tok)
	if code != 0 {
		t.Fatalf("keys create: exit %d: %s", code, errOut)
	}
	var k struct{ ID string }
	if err := json.Unmarshal([]byte(out), &k); err != nil {
		t.Fatalf("keys create output %q: %v", out, err)
	}
	// The connection flags come after the positional ID here.
	if code, _, errOut := runAdmin(t, "keys", "revoke", k.ID, "--coordinator", url, "--token-file", tok); code != 0 {
		t.Fatalf("keys revoke ID --coordinator ...: exit %d: %s", code, errOut)
	}
	code, out, errOut = runAdmin(t, "keys", "list", "--json", "--coordinator", url, "--token-file", tok)
	if code != 0 || !strings.Contains(out, `"revoked"`) {
		t.Fatalf("keys list after revoke: exit %d %s %s", code, out, errOut)
	}
	if code, _, errOut := runAdmin(t, "keys", "revoke", k.ID, "--no-such-flag"); code != 2 || !strings.Contains(errOut, "no-such-flag") {
		t.Fatalf("unknown flag after the argument: exit %d %q", code, errOut)
	}
}

// TestAdminTokenRotate: `meshd admin token rotate admin` replaces the
// admin token and rewrites the token file it was given, so the next
// command works and the old token does not; `rotate relay --out` writes the
// new relay token; bad arguments exit 2 and rotate nothing.
func TestAdminTokenRotate(t *testing.T) {
	url, dir := startCoordinator(t)
	tokPath := filepath.Join(t.TempDir(), "admin.token")
	orig, err := os.ReadFile(filepath.Join(dir, "admin.token"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(tokPath, orig, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("MESHD_COORDINATOR", url)
	t.Setenv("MESHD_TOKEN_FILE", tokPath)

	for _, args := range [][]string{{"token", "rotate"}, {"token", "rotate", "root"}, {"token", "rotate", "admin", "relay"}} {
		if code, _, errOut := runAdmin(t, args...); code != 2 || !strings.Contains(errOut, "want admin or relay") {
			t.Errorf("%v: exit %d, %q; want 2 and what to pass", args, code, errOut)
		}
	}
	if b, _ := os.ReadFile(tokPath); !bytes.Equal(b, orig) {
		t.Fatal("a refused rotate changed the token file")
	}

	code, out, errOut := runAdmin(t, "token", "rotate", "admin")
	if code != 0 || !strings.Contains(out, "new admin token written to "+tokPath) || !strings.Contains(errOut, "old one no longer works") {
		t.Fatalf("token rotate admin: exit %d\n%s\n%s", code, out, errOut)
	}
	now, _ := os.ReadFile(tokPath)
	if bytes.Equal(now, orig) || !bytes.HasPrefix(now, []byte("msadm-")) {
		t.Fatalf("token file after rotation: %q", now)
	}
	if fi, _ := os.Stat(tokPath); fi.Mode().Perm() != 0o600 {
		t.Fatalf("token file mode %v, want 0600", fi.Mode().Perm())
	}
	if code, _, errOut := runAdmin(t, "nodes", "list"); code != 0 {
		t.Fatalf("nodes list with the rotated token: exit %d: %s", code, errOut)
	}
	if code, _, _ := runAdmin(t, "nodes", "list", "--admin-token", strings.TrimSpace(string(orig)), "--token-file", ""); code == 0 {
		t.Fatal("the old admin token still works after rotation")
	}

	relayOut := filepath.Join(t.TempDir(), "relay.token")
	code, out, errOut = runAdmin(t, "token", "rotate", "relay", "--out", relayOut)
	if code != 0 || !strings.Contains(out, "new relay token written to "+relayOut) {
		t.Fatalf("token rotate relay: exit %d\n%s\n%s", code, out, errOut)
	}
	relay, _ := os.ReadFile(filepath.Join(dir, "relay.token"))
	if got, _ := os.ReadFile(relayOut); len(got) == 0 || !bytes.Equal(got, relay) {
		t.Fatalf("--out holds %q, the coordinator's relay.token %q", got, relay)
	}
}
