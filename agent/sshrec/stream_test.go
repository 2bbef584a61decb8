package sshrec

import (
	"bufio"
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

func TestParseEvent(t *testing.T) {
	for _, tc := range []struct {
		line string
		want string // "" when valid
	}{
		{`[0.5, "o", "hello\r\n"]`, ""},
		{`[0, "r", "80x24"]`, ""},
		{`[12.000001,"m","exit 0"]`, ""},
		{`[1, "x", "a"]`, `type "x"`},
		{`[-1, "o", "a"]`, "non-negative"},
		{`[1, "o"]`, "2 elements"},
		{`[1, "o", 5]`, "data is not a string"},
		{`["1", "o", "a"]`, "time"},
		{`{"t": 1}`, "event:"},
		{``, "event:"},
		{`[1e400, "o", "a"]`, "time"},
	} {
		_, err := ParseEvent([]byte(tc.line))
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%q: %v", tc.line, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%q: err %v, want %q", tc.line, err, tc.want)
		}
	}
}

func TestParseHeader(t *testing.T) {
	for _, tc := range []struct{ line, want string }{
		{`{"version": 2, "width": 80, "height": 24, "timestamp": 1, "meshd": {"local_user": "alice"}}`, ""},
		{`{"version": 1, "width": 80, "height": 24}`, "version 1"},
		{`{"version": 2, "width": -1, "height": 24}`, "terminal size"},
		{`{"version": 2, "width": 80, "height": 24, "extra": 1}`, "unknown field"},
		{`{"version": 2} {}`, "trailing"},
		{`[]`, "header:"},
	} {
		_, err := ParseHeader([]byte(tc.line))
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%q: %v", tc.line, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%q: err %v, want %q", tc.line, err, tc.want)
		}
	}
}

// TestAppendEventRoundTrip: what the SSH node writes is what the recorder
// accepts, whatever the session printed (control characters, invalid
// UTF-8, newlines, quotes).
func TestAppendEventRoundTrip(t *testing.T) {
	for data, want := range map[string]string{
		"": "", "plain": "plain", "a\nb\r\n": "a\nb\r\n", "\x1b[1;31mred\x1b[0m": "\x1b[1;31mred\x1b[0m",
		"\"quoted\\\"": "\"quoted\\\"", "\u2028": "\u2028",
		"\xff\xfe bad utf-8": "\uFFFD\uFFFD bad utf-8", // each invalid byte, as encoding/json does
	} {
		line := AppendEvent(nil, Event{Time: 1.25, Type: "o", Data: data})
		if bytes.Count(line, []byte("\n")) != 1 || line[len(line)-1] != '\n' {
			t.Fatalf("%q: not one line: %q", data, line)
		}
		ev, err := ParseEvent(line[:len(line)-1])
		if err != nil || ev.Type != "o" || ev.Time != 1.25 {
			t.Fatalf("%q: %+v, %v", data, ev, err)
		}
		if ev.Data != want {
			t.Fatalf("%q came back as %q", data, ev.Data)
		}
	}
}

func TestReadLineBound(t *testing.T) {
	long := strings.Repeat("a", MaxLine+2) + "\n"
	if _, err := readLine(bufio.NewReaderSize(strings.NewReader(long), 4096)); err == nil {
		t.Fatal("a line over MaxLine was read")
	}
	ok := strings.Repeat("a", MaxLine) + "\nnext\n"
	br := bufio.NewReaderSize(strings.NewReader(ok), 4096)
	if l, err := readLine(br); err != nil || len(l) != MaxLine {
		t.Fatalf("a line of MaxLine: %d, %v", len(l), err)
	}
	if l, err := readLine(br); err != nil || string(l) != "next" {
		t.Fatalf("the next line: %q, %v", l, err)
	}
}

// FuzzStream: any line is either refused with an error or, when it
// parses, a line asciinema can read (a JSON value of the right shape).
func FuzzStream(f *testing.F) {
	f.Add([]byte(`[0.5, "o", "hello"]`))
	f.Add([]byte(`{"version": 2, "width": 80, "height": 24, "timestamp": 1, "meshd": {}}`))
	f.Add([]byte(`[1, "m", "exit 0"]`))
	f.Fuzz(func(t *testing.T, line []byte) {
		if ev, err := ParseEvent(line); err == nil {
			var raw []any
			if json.Unmarshal(line, &raw) != nil || len(raw) != 3 {
				t.Fatalf("accepted %q", line)
			}
			back := AppendEvent(nil, ev)
			if _, err := ParseEvent(back[:len(back)-1]); err != nil {
				t.Fatalf("re-encoded %q does not parse: %v", back, err)
			}
		}
		if h, err := ParseHeader(line); err == nil {
			if h.Version != 2 {
				t.Fatalf("accepted version %d", h.Version)
			}
			if _, err := json.Marshal(h); err != nil {
				t.Fatal(err)
			}
		}
		br := bufio.NewReaderSize(bytes.NewReader(line), 16)
		for {
			l, err := readLine(br)
			if err != nil {
				break
			}
			if bytes.IndexByte(l, '\n') >= 0 || len(l) > MaxLine {
				t.Fatalf("readLine returned %q", l)
			}
		}
	})
}
