package sshrec

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"meshd.dev/meshd/agent/whois"
)

// TestRecorder: only peers may send recordings; the cast names the
// sender whois knows, whatever the stream claims; a bad line ends the
// stream and keeps what came before it.
func TestRecorder(t *testing.T) {
	for _, tc := range []struct {
		name   string
		who    *whois.Response // nil: not a peer
		stream string
		want   []string // lines of the cast; nil: no file
	}{
		{
			name:   "not a peer",
			stream: "{\"version\":2,\"width\":80,\"height\":24,\"timestamp\":1,\"meshd\":{}}\n[1,\"o\",\"x\"]\n",
		},
		{
			name:   "the node itself",
			who:    &whois.Response{Node: whois.Node{ID: 1, Hostname: "me"}, Self: true},
			stream: "{\"version\":2,\"width\":80,\"height\":24,\"timestamp\":1,\"meshd\":{}}\n",
		},
		{
			name: "forged sender, then a bad line",
			who:  &whois.Response{Node: whois.Node{ID: 7, Hostname: "gpu"}},
			stream: "{\"version\":2,\"width\":80,\"height\":24,\"timestamp\":1,\"meshd\":{\"local_user\":\"alice\",\"sender\":{\"node_id\":9,\"hostname\":\"forged\"}}}\n" +
				"[0.1,\"o\",\"hello\"]\n[0.2,\"zz\",\"bad\"]\n[0.3,\"o\",\"after\"]\n",
			want: []string{`"sender":{"node_id":7,"hostname":"gpu"}`, `[0.1,"o","hello"]`},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			r := &Recorder{Dir: dir, Logger: slog.New(slog.DiscardHandler), WhoIs: func(netip.Addr) (*whois.Response, bool) {
				return tc.who, tc.who != nil
			}}
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			go r.Serve(ln)
			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			c.Write([]byte(tc.stream))
			// The recorder closes the stream when done with it (a reset
			// when it closes with the stream unread).
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, err := io.Copy(io.Discard, c); err != nil && !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("the recorder kept the stream open: %v", err)
			}
			c.Close()
			files, _ := filepath.Glob(filepath.Join(dir, "*.cast"))
			if tc.want == nil {
				if len(files) != 0 {
					t.Fatalf("a recording was written: %v", files)
				}
				return
			}
			if len(files) != 1 {
				t.Fatalf("files %v", files)
			}
			b, _ := os.ReadFile(files[0])
			lines := bytes.Split(bytes.TrimSuffix(b, []byte("\n")), []byte("\n"))
			if len(lines) != len(tc.want) {
				t.Fatalf("cast:\n%s", b)
			}
			for i, w := range tc.want {
				if !bytes.Contains(lines[i], []byte(w)) {
					t.Errorf("line %d %s, want %s in it", i, lines[i], w)
				}
			}
			if st, _ := os.Stat(files[0]); st.Mode().Perm() != 0o600 {
				t.Errorf("cast mode %v", st.Mode())
			}
		})
	}
}
