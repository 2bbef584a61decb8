package e2e

import (
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"meshd.dev/meshd/internal/netlab"
)

// lanHosts makes one namespace per name, all on one LAN segment
// (198.18.0.0/24) with addresses in the order given: the first is .1.
func lanHosts(lab *netlab.Lab, names ...string) map[string]*netlab.Host {
	lan := lab.NewSegment("lan", netip.MustParsePrefix("198.18.0.0/24"))
	hosts := make(map[string]*netlab.Host, len(names))
	for _, name := range names {
		hosts[name] = lab.NewHost(name)
		hosts[name].Attach(lan)
	}
	return hosts
}

// writeTemp writes text to a new file name in a test temp dir and returns
// its path.
func writeTemp(t *testing.T, name, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}
