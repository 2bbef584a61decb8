package control

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"unicode"

	"meshd.dev/meshd/control/controlclient"
)

// FuzzPolicyUpload feeds arbitrary file names and policy bytes to the
// coordinator's policy-set path: never a panic; a rejection is
// controlclient.ErrPolicyInvalid naming only the sanitised base name and leaves the
// policy in force untouched; an acceptance puts exactly those bytes in
// force.
func FuzzPolicyUpload(f *testing.F) {
	f.Add("policy.hujson", []byte(abPolicy))
	f.Add("/etc/meshd/bc.hujson", []byte(bcPolicy))
	f.Add("../../x\n.hujson", []byte("{\n\t\"grants\": [\n}"))
	f.Add("", []byte(BootstrapPolicyText))
	ctx := context.Background()
	s, err := NewServer(ctx, ServerOptions{StateDir: f.TempDir(), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { s.Close() })
	f.Fuzz(func(t *testing.T, name string, data []byte) {
		base := policyFileName(name)
		if base == "" || strings.Contains(base, "/") || strings.ContainsFunc(base, unicode.IsControl) || len(base) > 128 {
			t.Fatalf("policyFileName(%q) = %q: want a bounded base name without separators or control characters", name, base)
		}
		before := s.CurrentPolicy()
		info, err := s.ApplyPolicy(ctx, name, data)
		after := s.CurrentPolicy()
		if err != nil {
			var pe *PolicyError
			if !errors.Is(err, controlclient.ErrPolicyInvalid) || !errors.As(err, &pe) || len(pe.Problems) == 0 {
				t.Fatalf("rejection %v: want a *PolicyError wrapping controlclient.ErrPolicyInvalid", err)
			}
			if !strings.HasPrefix(pe.Problems[0], base+":") {
				t.Fatalf("first problem %q does not start with %q", pe.Problems[0], base+":")
			}
			if after.SHA256 != before.SHA256 || after.Bootstrap != before.Bootstrap {
				t.Fatalf("a rejected policy changed the one in force: %+v -> %+v", before, after)
			}
			return
		}
		if info.Text != string(data) || after.SHA256 != info.SHA256 || after.File != base || after.Bootstrap {
			t.Fatalf("accepted policy not in force as uploaded: %+v, in force %+v", info, after)
		}
	})
}
