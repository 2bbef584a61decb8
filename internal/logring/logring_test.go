package logring

import (
	"fmt"
	"log/slog"
	"strings"
	"testing"
)

// TestRingBounds: the ring keeps the newest lines within both budgets and
// counts what it dropped.
func TestRingBounds(t *testing.T) {
	for _, tc := range []struct {
		name               string
		maxLines, maxBytes int
		write              []string
		want               []string
		dropped            uint64
	}{
		{"under budget", 3, 100, []string{"a\n", "b\n"}, []string{"a", "b"}, 0},
		{"by count", 3, 100, []string{"a\n", "b\n", "c\n", "d\n", "e\n"}, []string{"c", "d", "e"}, 2},
		{"by bytes", 10, 6, []string{"aaa\n", "bbb\n", "cc\n"}, []string{"bbb", "cc"}, 1},
		{"several lines in one write", 2, 100, []string{"a\nb\nc\n"}, []string{"b", "c"}, 1},
		{"a line over the byte budget is cut", 10, 4, []string{"abcdefgh\n"}, []string{"abcd"}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := New(tc.maxLines, tc.maxBytes)
			for _, w := range tc.write {
				if n, err := r.Write([]byte(w)); n != len(w) || err != nil {
					t.Fatalf("Write = %d, %v", n, err)
				}
			}
			got, dropped := r.Lines()
			if fmt.Sprint(got) != fmt.Sprint(tc.want) || dropped != tc.dropped {
				t.Fatalf("lines %q dropped %d, want %q dropped %d", got, dropped, tc.want, tc.dropped)
			}
		})
	}
}

// TestRedact: no secret meshd prints survives a write into the ring.
func TestRedact(t *testing.T) {
	secrets := []string{
		"mskey-0123abcd-s3cr3tsecret-fpfpfpfp",
		"msadm-s3cr3tsecret-fpfpfp",
		"msrly-s3cr3tsecret-fpfpfp",
		"privkey:" + strings.Repeat("ab", 32),
		"discopriv:" + strings.Repeat("cd", 32),
		"private_key=" + strings.Repeat("ef", 32),
		"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIK\n-----END PRIVATE KEY-----",
		"-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIK",
	}
	r := New(0, 0)
	log := slog.New(Handler(slog.DiscardHandler, r, slog.LevelDebug))
	for _, s := range secrets {
		log.Info("up", "authkey", s, "msg", "key="+s+" end")
	}
	lines, _ := r.Lines()
	all := strings.Join(lines, "\n")
	for _, s := range secrets {
		body := s[strings.IndexAny(s, "-:=")+1:]
		if strings.Contains(all, body) || strings.Contains(all, "s3cr3t") || strings.Contains(all, "MC4CAQ") || strings.Contains(all, "MHcCAQ") {
			t.Errorf("secret %q survived:\n%s", s, all)
		}
	}
	if !strings.Contains(all, "mskey-[REDACTED]") || !strings.Contains(all, "privkey:[REDACTED]") || !strings.Contains(all, " end") {
		t.Errorf("redacted lines lost their shape:\n%s", all)
	}
	// Public keys stay: they are what a bug report is read for.
	pub := "nodekey:" + strings.Repeat("12", 32)
	if got := string(Redact([]byte(pub))); got != pub {
		t.Errorf("public key changed to %q", got)
	}
}
