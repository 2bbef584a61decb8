package policy

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"meshd.dev/meshd/netmap"
)

// FuzzParse feeds arbitrary bytes to the parser. It must never panic; a
// rejected policy must explain itself with positions inside the input; an
// accepted one must compile for a fleet, lint, explain and diff without
// panicking either, and its peer lists and capabilities must be the same
// from the index (Peers, PeerCapsFor) as per pair (CanSee, PeerCaps).
func FuzzParse(f *testing.F) {
	seed, err := os.ReadFile("testdata/seed.hujson")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(seed)
	// The conformance corpus: every construct meshd enforces, refuses or
	// warns about, in the spellings Tailscale users write.
	corpus, err := filepath.Glob("testdata/conformance/*.hujson")
	if err != nil || len(corpus) == 0 {
		f.Fatalf("conformance corpus: %v", err)
	}
	for _, file := range corpus {
		b, err := os.ReadFile(file)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"grants": [{"src": ["*"], "dst": ["*"], "ip": ["*"]}]}`))
	f.Add([]byte(`{"acls": [{"action": "accept", "src": ["10.0.0.0/8"], "dst": ["[fd7a::1]:22,80-90"], "proto": "udp"}]}`))
	f.Add([]byte(`{"tagOwners": {"tag:a": ["tag:a"]}, "grants": [{"src": ["tag:a"], "dst": ["autogroup:self"], "ip": ["icmp:*"], "app": {"x.dev/c": [{}]}}]}`))
	f.Add([]byte(`{"tagOwners": {"tag:a": [], "tag:r": []}, "ssh": [{"action": "check", "src": ["autogroup:member"], "dst": ["autogroup:self", "tag:a"], "users": ["localpart:*@example.com", "autogroup:nonroot"], "checkPeriod": "1h", "acceptEnv": ["LC_*"], "recorder": ["tag:r"], "enforceRecorder": true}], "sshTests": [{"src": "alice@example.com", "dst": ["tag:a"], "check": ["alice"], "deny": ["root"]}]}`))
	nodes := []*netmap.Node{
		testNode(1, "alice@example.com"), testNode(2, "bob@example.com"),
		testNode(3, "", "tag:inference-server"), testNode(4, "carol@tenant-a.example"),
		testNode(5, "", "tag:a"), testNode(6, "", "tag:prod"),
	}
	base := mustParse(f, `{}`)
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := Parse("fuzz.hujson", data)
		if err != nil {
			var perr *Error
			if !errors.As(err, &perr) || len(perr.Problems) == 0 {
				t.Fatalf("error without problems: %v", err)
			}
			for _, pr := range perr.Problems {
				if pr.Pos.Line < 1 || pr.Pos.Col < 1 || pr.Msg == "" {
					t.Fatalf("problem without a position or message: %+v", pr)
				}
			}
			return
		}
		e := NewEngine(p)
		e.SetNodes(nodes)
		for _, n := range nodes {
			for _, r := range e.FilterFor(n, nil) {
				if len(r.SrcIPs) == 0 || len(r.DstPorts) == 0 && len(r.CapGrants) == 0 {
					t.Fatalf("empty rule compiled: %+v", r)
				}
			}
			// The index-based answers agree with the per-pair ones.
			checkPeerQueries(t, e, n, nodes, "fuzzed policy")
		}
		p.Lint()
		Diff(base, p)
		Diff(p, base)
		_, _ = p.Explain("alice@example.com", "tag:inference-server:22", "")
		_, _ = p.ExplainSSH("alice@example.com", "tag:inference-server", "root")
		for _, a := range nodes {
			for _, b := range nodes {
				v := p.SSH(a, b, "root")
				if v.Action != "" && v.Action != netmap.SSHAccept && v.Action != netmap.SSHCheck {
					t.Fatalf("ssh action %q", v.Action)
				}
				v.IsRecorder(b)
			}
		}
		_ = p.CheckTags("alice@example.com", nil, []string{"tag:a"})
	})
}
