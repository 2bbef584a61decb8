package localapi

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
)

// logBackend keeps log lines, as the daemon does with its ring.
type logBackend struct {
	fakeBackend
	keeps bool
}

func (b *logBackend) RecentLogs() (*Logs, bool) {
	if !b.keeps {
		return nil, false
	}
	return &Logs{Lines: []string{"a", "b"}, Dropped: 3}, true
}

// TestLogs: /v0/logs serves the backend's recent lines; a backend that
// keeps none says so (404), as does one without the interface.
func TestLogs(t *testing.T) {
	for _, tc := range []struct {
		name    string
		b       Backend
		wantErr string
	}{
		{"keeps lines", &logBackend{keeps: true}, ""},
		{"keeps none", &logBackend{}, "keeps no log lines"},
		{"no interface", &fakeBackend{}, "404"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "s")
			ln, err := Listen(sock)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- Serve(ctx, ln, tc.b) }()
			defer func() { cancel(); <-done }()
			l, err := NewClient(sock).Logs(ctx)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Logs: %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || strings.Join(l.Lines, ",") != "a,b" || l.Dropped != 3 {
				t.Fatalf("Logs = %+v, %v", l, err)
			}
		})
	}
}
