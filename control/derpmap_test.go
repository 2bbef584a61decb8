package control

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"meshd.dev/meshd/netmap"
)

func TestLoadDERPMapGood(t *testing.T) {
	m, err := LoadDERPMap("testdata/derpmap.hujson")
	if err != nil {
		t.Fatal(err)
	}
	want := &netmap.DERPMap{Regions: []netmap.DERPRegion{
		{ID: 1, Code: "lab", Name: "Lab rack", Nodes: []netmap.DERPNode{
			{Name: "1a", Host: "198.18.1.2", DERPPort: 443, STUNPort: 3478},
			{Name: "1b", Host: "relay-b.lab.example", DERPPort: 8443, STUNPort: -1,
				CertFingerprint: "6a2f9c0e5b1d4e8f7a3c2b1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f"},
		}},
		{ID: 2, Code: "stun", Nodes: []netmap.DERPNode{{Name: "2a", Host: "2001:db8::2", STUNOnly: true, STUNPort: 3478}}},
	}}
	if !reflect.DeepEqual(m, want) {
		t.Fatalf("parsed\n%+v\nwant\n%+v", m, want)
	}
	// What FormatDERPMap writes reads back the same.
	again, err := ParseDERPMap("formatted", FormatDERPMap(m))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(again, m) {
		t.Fatalf("round trip changed the map:\n%+v", again)
	}
}

func TestParseDERPMapErrors(t *testing.T) {
	const node = `{"name": "1a", "host": "198.18.1.2", "derp_port": 443}`
	for _, tc := range []struct {
		name, in string
		want     []string // each problem, in order, with its position
	}{
		{"syntax", "{\n  \"regions\": [\n    {\"id\": 1,,}\n  ]\n}", []string{"m.hujson:3:14: syntax error: invalid character"}},
		{"not an object", `[1]`, []string{"m.hujson:1:1: DERP map must be an object"}},
		{"no regions", `{}`, []string{`m.hujson:1:1: DERP map has no "regions"`}},
		{"empty regions", `{"regions": []}`, []string{`m.hujson:1:13: "regions" is empty`}},
		{"unknown top field", `{"regions": [{"id": 1, "code": "a", "nodes": [` + node + `]}], "omitDefaultRegions": true}`,
			[]string{`m.hujson:1:106: DERP map: unknown field "omitDefaultRegions" (known: regions)`}},
		{"misspelt node field", "{\"regions\": [{\"id\": 1, \"code\": \"a\", \"nodes\": [\n  {\"name\": \"1a\", \"host\": \"h\", \"derp_port\": 443, \"stunport\": 3478}]}]}",
			[]string{`m.hujson:2:49: region 1 node 1: unknown field "stunport" (known: cert_fingerprint, derp_port, host, name, stun_only, stun_port)`}},
		{"port is a string", "{\"regions\": [{\"id\": 1, \"code\": \"a\", \"nodes\": [\n {\"name\": \"1a\", \"host\": \"h\", \"derp_port\": \"443\"}]}]}",
			[]string{`m.hujson:2:43: region 1 node 1: "derp_port" must be a whole number`}},
		{"port out of range", `{"regions": [{"id": 1, "code": "a", "nodes": [{"name": "1a", "host": "h", "derp_port": 70000}]}]}`,
			[]string{`m.hujson:1:88: region 1 node 1: derp_port 70000 out of range`}},
		{"no derp port", `{"regions": [{"id": 1, "code": "a", "nodes": [{"name": "1a", "host": "h"}]}]}`,
			[]string{`m.hujson:1:47: region 1 node 1 needs a "derp_port"`}},
		{"zero id", `{"regions": [{"id": 0, "code": "a", "nodes": [` + node + `]}]}`,
			[]string{`m.hujson:1:21: region 1: id must be positive, got 0`}},
		{"duplicate id", "{\"regions\": [\n{\"id\": 7, \"code\": \"a\", \"nodes\": [" + node + "]},\n{\"id\": 7, \"code\": \"b\", \"nodes\": [{\"name\": \"2a\", \"host\": \"h\", \"derp_port\": 1}]}]}",
			[]string{`m.hujson:3:8: region 2: region id 7 listed twice`}},
		{"duplicate node name", "{\"regions\": [\n{\"id\": 1, \"code\": \"a\", \"nodes\": [" + node + "]},\n{\"id\": 2, \"code\": \"b\", \"nodes\": [" + node + "]}]}",
			[]string{`m.hujson:3:43: region 2 node 1: node name "1a" used twice`}},
		{"no code, no nodes", `{"regions": [{"id": 1}]}`,
			[]string{`m.hujson:1:14: region 1 has no "code"`, `m.hujson:1:14: region 1 has no "nodes"`}},
		{"empty nodes", `{"regions": [{"id": 1, "code": "a", "nodes": []}]}`,
			[]string{`m.hujson:1:46: region 1: "nodes" is empty`}},
		{"host with port", `{"regions": [{"id": 1, "code": "a", "nodes": [{"name": "1a", "host": "h:443", "derp_port": 443}]}]}`,
			[]string{`m.hujson:1:70: region 1 node 1: host "h:443" must be a host name or IP address, without scheme or port`}},
		{"host missing", `{"regions": [{"id": 1, "code": "a", "nodes": [{"name": "1a", "derp_port": 443}]}]}`,
			[]string{`m.hujson:1:47: region 1 node 1 has no "host"`}},
		{"bad fingerprint", `{"regions": [{"id": 1, "code": "a", "nodes": [{"name": "1a", "host": "h", "derp_port": 1, "cert_fingerprint": "abc"}]}]}`,
			[]string{`m.hujson:1:111: region 1 node 1: cert_fingerprint must be 64 hex digits`}},
		{"stun only without port", `{"regions": [{"id": 1, "code": "a", "nodes": [{"name": "1a", "host": "h", "stun_only": true}]}]}`,
			[]string{`m.hujson:1:47: region 1 node 1 is stun_only but has no stun_port`}},
		{"duplicate field", `{"regions": [{"id": 1, "id": 2, "code": "a", "nodes": [` + node + `]}]}`,
			[]string{`m.hujson:1:24: region 1: field "id" given twice`}},
		{"two problems at once", "{\"regions\": [\n{\"id\": -1, \"code\": \"a\", \"nodes\": [" + node + "]},\n{\"id\": 2, \"code\": \"\", \"nodes\": [{\"name\": \"2a\", \"host\": \"h\", \"derp_port\": 1}]}]}",
			[]string{`m.hujson:2:8: region 1: id must be positive, got -1`, `m.hujson:3:1: region 2 has no "code"`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := ParseDERPMap("m.hujson", []byte(tc.in))
			if err == nil {
				t.Fatalf("parsed %+v, want an error", m)
			}
			var de *DERPMapError
			if !errors.As(err, &de) {
				t.Fatalf("error %T %v, want *DERPMapError", err, err)
			}
			if len(de.Problems) != len(tc.want) {
				t.Fatalf("problems:\n%s\nwant %d", strings.Join(de.Problems, "\n"), len(tc.want))
			}
			for i, w := range tc.want {
				if !strings.HasPrefix(de.Problems[i], w) {
					t.Errorf("problem %d:\n%s\nwant prefix\n%s", i, de.Problems[i], w)
				}
			}
		})
	}
}

func TestLoadDERPMapFileErrors(t *testing.T) {
	dir := t.TempDir()
	if _, err := LoadDERPMap(filepath.Join(dir, "missing.hujson")); err == nil || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
	big := filepath.Join(dir, "big.hujson")
	if err := os.WriteFile(big, []byte(`{"regions": []}`+strings.Repeat(" ", MaxDERPMapSize)), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadDERPMap(big); err == nil || !strings.Contains(err.Error(), big+":1:1: DERP map is larger than") {
		t.Errorf("oversized file: %v", err)
	}
}

// FuzzParseDERPMap: any input either parses to a map that netmap accepts and
// that survives a round trip, or fails with positioned problems; never a
// panic.
func FuzzParseDERPMap(f *testing.F) {
	if b, err := os.ReadFile("testdata/derpmap.hujson"); err == nil {
		f.Add(b)
	}
	f.Add([]byte(`{"regions":[{"id":1,"code":"lab","nodes":[{"name":"1a","host":"198.18.1.2","derp_port":443,"stun_port":3478}]}]}`))
	f.Add([]byte(`{"regions":[{"id":1,"code":"a","nodes":[{"name":"1a","host":"h","derp_port":"x"}]},{"id":1}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := ParseDERPMap("f", data)
		if err != nil {
			var de *DERPMapError
			if !errors.As(err, &de) || len(de.Problems) == 0 {
				t.Fatalf("error %T without problems: %v", err, err)
			}
			for _, p := range de.Problems {
				if !strings.HasPrefix(p, "f:") {
					t.Fatalf("problem without position: %q", p)
				}
			}
			return
		}
		if err := m.Validate(); err != nil {
			t.Fatalf("accepted a map netmap refuses: %v", err)
		}
		again, err := ParseDERPMap("f", FormatDERPMap(m))
		if err != nil {
			t.Fatalf("formatted map does not parse: %v", err)
		}
		if !reflect.DeepEqual(again, m) {
			t.Fatalf("round trip changed the map: %+v -> %+v", m, again)
		}
	})
}
