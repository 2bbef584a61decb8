package store

import "testing"

// FuzzParseChange: notifications arrive from the database; none panics
// the parser, and a node change always names a node.
func FuzzParseChange(f *testing.F) {
	for _, s := range []string{"p", "n:1", "m:admin_token_sha256", "o:r:1", "n:", "n:0", "n:-1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, payload string) {
		c, err := parseChange(payload)
		if err == nil && c.Kind == ChangeNode && c.Node == 0 {
			t.Fatalf("%q: a node change without a node", payload)
		}
	})
}
