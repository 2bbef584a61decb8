package kubecap

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	tests := []struct {
		name, in string
		groups   []string
		enforce  bool
		err      string // substring; "" means valid
	}{
		{"groups", `{"impersonate":{"groups":["system:masters","eng"]}}`, []string{"system:masters", "eng"}, false, ""},
		{"empty object", `{}`, nil, false, ""},
		{"tailscale recorder fields", `{"recorder":["tag:rec"],"enforceRecorder":true}`, nil, true, ""},
		{"unknown top field", `{"impersonate":{"groups":["a"]},"impersonat":{}}`, nil, false, `unknown field "impersonat"`},
		{"unknown nested field", `{"impersonate":{"group":["a"]}}`, nil, false, `unknown field "group"`},
		{"users not supported", `{"impersonate":{"users":["root"]}}`, nil, false, `unknown field "users"`},
		{"groups not strings", `{"impersonate":{"groups":[1]}}`, nil, false, "cannot unmarshal"},
		{"blank group", `{"impersonate":{"groups":[" "]}}`, nil, false, "empty group name"},
		{"control character", `{"impersonate":{"groups":["a\nImpersonate-User: x"]}}`, nil, false, "control character"},
		{"trailing data", `{} {}`, nil, false, "data after"},
		{"not an object", `["a"]`, nil, false, "cannot unmarshal"},
		{"blank recorder", `{"recorder":[""]}`, nil, false, "recorder"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := Parse([]byte(tt.in))
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("Parse(%s) = %+v, %v; want error containing %q", tt.in, r, err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Parse(%s): %v", tt.in, err)
			}
			var got []string
			if r.Impersonate != nil {
				got = r.Impersonate.Groups
			}
			if !slices.Equal(got, tt.groups) || r.EnforceRecorder != tt.enforce {
				t.Errorf("Parse(%s) = groups %q enforce %v; want %q %v", tt.in, got, r.EnforceRecorder, tt.groups, tt.enforce)
			}
		})
	}
}

func raws(ss ...string) []json.RawMessage {
	var out []json.RawMessage
	for _, s := range ss {
		out = append(out, json.RawMessage(s))
	}
	return out
}

func TestFromCapabilities(t *testing.T) {
	tests := []struct {
		name    string
		caps    map[string][]json.RawMessage
		granted bool
		groups  []string
		enforce bool
		wantErr bool
	}{
		{"none", nil, false, nil, false, false},
		{"other capabilities only", map[string][]json.RawMessage{"meshd.dev/cap/webapp": raws(`{"impersonate":{"groups":["x"]}}`)}, false, nil, false, false},
		{"tailscale name", map[string][]json.RawMessage{"tailscale.com/cap/kubernetes": raws(`{"impersonate":{"groups":["b","a"]}}`)}, true, []string{"a", "b"}, false, false},
		{"both names, union, deduplicated", map[string][]json.RawMessage{
			"tailscale.com/cap/kubernetes": raws(`{"impersonate":{"groups":["viewers"]}}`, `{"impersonate":{"groups":["eng","viewers"]}}`),
			"meshd.dev/cap/kubernetes":     raws(`{"impersonate":{"groups":["system:masters"]}}`),
		}, true, []string{"eng", "system:masters", "viewers"}, false, false},
		{"granted without groups", map[string][]json.RawMessage{"meshd.dev/cap/kubernetes": raws(`{}`)}, true, nil, false, false},
		{"enforce recorder from any rule", map[string][]json.RawMessage{"meshd.dev/cap/kubernetes": raws(`{"impersonate":{"groups":["a"]}}`, `{"enforceRecorder":true}`)}, true, []string{"a"}, true, false},
		{"bad value skipped, good one applies", map[string][]json.RawMessage{"meshd.dev/cap/kubernetes": raws(`{"impersonate":{"groups":["a"]},"x":1}`, `{"impersonate":{"groups":["b"]}}`)}, true, []string{"b"}, false, true},
		{"only bad values: not granted", map[string][]json.RawMessage{"meshd.dev/cap/kubernetes": raws(`{"x":1}`)}, false, nil, false, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g, err := FromCapabilities(tt.caps)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, want error %v", err, tt.wantErr)
			}
			if g.Granted != tt.granted || !slices.Equal(g.Groups, tt.groups) || g.EnforceRecorder != tt.enforce {
				t.Errorf("got %+v; want granted %v groups %q enforce %v", g, tt.granted, tt.groups, tt.enforce)
			}
		})
	}
}

// FuzzParse: no panic, and a value Parse accepts has only groups a header
// can carry.
func FuzzParse(f *testing.F) {
	seeds, _ := filepath.Glob("testdata/seeds/*.json")
	for _, s := range seeds {
		b, err := os.ReadFile(s)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := Parse(b)
		if err != nil || r.Impersonate == nil {
			return
		}
		for _, g := range r.Impersonate.Groups {
			if strings.TrimSpace(g) == "" || strings.ContainsAny(g, "\r\n\x00") {
				t.Fatalf("accepted group %q", g)
			}
		}
	})
}
