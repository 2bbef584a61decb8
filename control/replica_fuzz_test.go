package control

import (
	"strings"
	"testing"
)

// FuzzParseAnnouncement: announcements arrive from the database; none
// panics the parser, and what parses names a replica and positive ids.
func FuzzParseAnnouncement(f *testing.F) {
	for _, s := range []string{"o:meshd-coordinator-1:1,2,3", "f:r:9", "h:r", "o:r:", "x:r:1", "o::1", "o:r:0", "o:r:1,,2"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, msg string) {
		kind, name, ids, err := parseAnnouncement(msg)
		if err != nil {
			return
		}
		if name == "" || !strings.ContainsRune("ofh", rune(kind)) {
			t.Fatalf("%q parsed to kind %q name %q", msg, kind, name)
		}
		if kind != 'h' && len(ids) == 0 {
			t.Fatalf("%q: a presence announcement without ids", msg)
		}
		for _, id := range ids {
			if id == 0 {
				t.Fatalf("%q: node id 0", msg)
			}
		}
	})
}

func TestParseAnnouncement(t *testing.T) {
	for _, tc := range []struct {
		in   string
		kind byte
		name string
		n    int
		bad  bool
	}{
		{"o:r1:1,2,3", 'o', "r1", 3, false},
		{"f:r1:7", 'f', "r1", 1, false},
		{"h:r1", 'h', "r1", 0, false},
		{"h:", 0, "", 0, true},
		{"o:r1", 0, "", 0, true},
		{"o:r1:", 0, "", 0, true},
		{"o::1", 0, "", 0, true},
		{"o:r1:0", 0, "", 0, true},
		{"o:r1:1,x", 0, "", 0, true},
		{"o:r1:9223372036854775808", 0, "", 0, true}, // beyond SQL's int64
		{"z:r1:1", 0, "", 0, true},
		{"", 0, "", 0, true},
	} {
		kind, name, ids, err := parseAnnouncement(tc.in)
		if (err != nil) != tc.bad || kind != tc.kind || name != tc.name || len(ids) != tc.n {
			t.Errorf("parseAnnouncement(%q) = %q %q %v %v", tc.in, kind, name, ids, err)
		}
	}
}

// FuzzParseRelayAnnouncement: relay announcements arrive from the
// database; none panics the parser, what parses is a usable relay, and it
// announces itself back as it parsed.
func FuzzParseRelayAnnouncement(f *testing.F) {
	for _, s := range []string{
		"r:meshd-coordinator-1:1733280000000000000,8443,3478,,coord-a.example",
		"r:r:1,443,-1,0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef,::1",
		"r:r:1,0,0,,h", "r:r:1,70000,0,,h", "r:r:1,443,0,,", "r::1,443,0,,h", "r:r:x,443,0,,h", "r:r:1,443,0,,a b", "o:r:1",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, msg string) {
		name, rr, err := parseRelayAnnouncement(msg)
		if err != nil {
			return
		}
		if name == "" || rr.node.Host == "" || rr.node.DERPPort <= 0 || rr.node.DERPPort > 65535 {
			t.Fatalf("%q parsed to %q %+v", msg, name, rr)
		}
		name2, rr2, err := parseRelayAnnouncement(rr.announcement(name))
		if err != nil || name2 != name || rr2 != rr {
			t.Fatalf("%q: announced back as %q, which parses to %q %+v, %v", msg, rr.announcement(name), name2, rr2, err)
		}
	})
}
