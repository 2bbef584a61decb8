package magicbind

import (
	"context"
	"log/slog"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"meshd.dev/meshd/internal/netlab"
	"meshd.dev/meshd/netmap"
)

// warnCounter counts the path MTU warnings a bind logs, passing every
// record on to the test log.
type warnCounter struct {
	slog.Handler
	n *atomic.Int32
}

func (w warnCounter) Handle(ctx context.Context, r slog.Record) error {
	if r.Level == slog.LevelWarn && strings.HasPrefix(r.Message, "path MTU problem") {
		w.n.Add(1)
	}
	return w.Handler.Handle(ctx, r)
}

func (w warnCounter) WithAttrs(as []slog.Attr) slog.Handler {
	return warnCounter{w.Handler.WithAttrs(as), w.n}
}

func (w warnCounter) WithGroup(g string) slog.Handler {
	return warnCounter{w.Handler.WithGroup(g), w.n}
}

// TestPMTULab: a (9000-byte link) -- router -- (1500-byte link) b, the
// binds' sockets in those namespaces, overlay MTU 8920. a's full-size
// packets reach the router with DF and cannot cross the 1500 link.
//
//   - When the router's "fragmentation needed" ICMP is dropped (the cloud
//     blackhole), a reports the problem with the largest size that got
//     through (1420), once in its log however many rounds run; small
//     traffic still flows.
//   - When the ICMP gets back, a's kernel learns the path MTU and
//     fragments full-size packets locally (as it does WireGuard's): they
//     arrive and no problem is reported.
//
// b's own sends leave its 1500 interface fragmented locally, so b sees no
// problem either way.
func TestPMTULab(t *testing.T) {
	for _, tt := range []struct {
		name      string
		dropICMP  bool
		aPathMTU  int
		aProblem  bool
		wantWarns int32
	}{
		{"icmp dropped", true, 1420, true, 1},
		{"icmp delivered", false, 8920, false, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			lab := netlab.New(t)
			ha, r, hb := lab.NewHost("a"), lab.NewHost("r"), lab.NewHost("b")
			aAddr, rA := lab.Link(ha, r, netip.MustParsePrefix("198.18.1.0/24"), 9000)
			rB, bAddr := lab.Link(r, hb, netip.MustParsePrefix("198.18.2.0/24"), 1500)
			r.EnableForwarding()
			ha.AddRoute(netip.MustParsePrefix("198.18.2.0/24"), rA)
			hb.AddRoute(netip.MustParsePrefix("198.18.1.0/24"), rB)
			if tt.dropICMP {
				r.MustRun("iptables", "-A", "OUTPUT", "-p", "icmp", "--icmp-type", "fragmentation-needed", "-j", "DROP")
			}
			var warns atomic.Int32
			mk := func(h *netlab.Host, name, ip string, addr netip.Addr, count bool) *testNode {
				return newTestNodeSetup(t, name, ip, nodeSetup{in: h.Do, addr: addr, opts: func(o *Options) {
					o.OverlayMTU = 8920
					o.PMTUTimeout = 300 * time.Millisecond
					// Several rounds within the test: the warning must
					// still be logged only once.
					o.PMTUInterval = 700 * time.Millisecond
					if count {
						o.Logger = slog.New(warnCounter{o.Logger.Handler(), &warns})
					}
				}})
			}
			a := mk(ha, "a", "100.64.0.1", aAddr, true)
			b := mk(hb, "b", "100.64.0.2", bAddr, false)
			connect(t, a, b, netmap.DERPMap{}, true)
			transfer(t, a, b, 64<<10)
			waitPath(t, a, b, PathDirect, 5*time.Second)

			// Keep traffic flowing both ways (the peers stay active and
			// so are probed) until both have a result and a has run a
			// few more rounds.
			var st, back PeerStatus
			deadline := time.Now().Add(15 * time.Second)
			rounds := 0
			for {
				transfer(t, a, b, 16<<10)
				transfer(t, b, a, 16<<10)
				st, back = a.bind.PeerStatus(b.key.Public()), b.bind.PeerStatus(a.key.Public())
				if st.PathMTU != 0 && back.PathMTU != 0 {
					rounds++
				}
				if rounds >= 4 || time.Now().After(deadline) {
					break
				}
				time.Sleep(300 * time.Millisecond)
			}
			if st.Path != PathDirect || st.PathMTU != tt.aPathMTU || st.MTUProblem != tt.aProblem || st.OverlayMTU != 8920 {
				t.Errorf("a -> b: %+v, want direct with path MTU %d, problem %v, overlay 8920", st, tt.aPathMTU, tt.aProblem)
			}
			if back.Path != PathDirect || back.PathMTU != 8920 || back.MTUProblem {
				t.Errorf("b -> a: %+v, want direct with path MTU 8920 and no problem", back)
			}
			if n := warns.Load(); n != tt.wantWarns {
				t.Errorf("a logged %d path MTU warnings, want %d", n, tt.wantWarns)
			}
		})
	}
}
