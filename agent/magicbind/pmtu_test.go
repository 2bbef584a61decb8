package magicbind

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/nat/disco"
	"meshd.dev/meshd/nat/endpoint"
	"meshd.dev/meshd/netmap"
)

func TestProbeSizes(t *testing.T) {
	for _, tt := range []struct {
		mtu  int
		want []int
	}{
		{8920, []int{1280, 1420, 8920}},
		{9000, []int{1280, 1420, 8920, 9000}},
		{1420, []int{1280, 1420}},
		{1280, []int{1280}},
		{576, []int{576}},
		{65535, []int{1280, 1420, 8920}}, // 65535+32 does not fit a datagram
	} {
		if got := probeSizes(tt.mtu); !slices.Equal(got, tt.want) {
			t.Errorf("probeSizes(%d) = %v, want %v", tt.mtu, got, tt.want)
		}
	}
}

// pmtuPeer is a bind peer driven by a fake clock: its selector has one
// candidate that answers, so the path turns direct after one pong.
type pmtuPeer struct {
	t   *testing.T
	b   *Bind
	p   *peer
	now time.Time
	ep  netip.AddrPort
}

func newPMTUPeer(t *testing.T, mtu int) *pmtuPeer {
	b := New(Options{
		NodeKey: netmap.NewNodePrivate(), DiscoKey: netmap.NewDiscoPrivate(), OverlayMTU: mtu,
		Paths: endpoint.Config{ActiveTimeout: 45 * time.Second, TrustDuration: time.Hour},
	})
	b.mu.Lock()
	p := b.peerLocked(netmap.NewNodePrivate().Public())
	b.mu.Unlock()
	pp := &pmtuPeer{t: t, b: b, p: p, now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC), ep: netip.MustParseAddrPort("198.18.2.2:41641")}
	p.sel.SetCandidates([]netip.AddrPort{pp.ep})
	return pp
}

// goDirect makes the path direct to ep (active peer, answered ping).
func (pp *pmtuPeer) goDirect(ep netip.AddrPort) {
	pp.ep = ep
	pp.p.sel.SetCandidates([]netip.AddrPort{ep})
	pp.p.sel.NoteActivity(pp.now)
	pp.p.sel.Reprobe()
	for _, pr := range pp.p.sel.Poll(pp.now).Pings {
		if pr.To == ep {
			pp.p.sel.HandlePong(pp.now, pr.TxID, ep)
		}
	}
	if a, ok := pp.p.sel.Path(pp.now); !ok || a != ep {
		pp.t.Fatalf("path %v %v, want direct to %v", a, ok, ep)
	}
}

// active advances the clock by d with traffic to the peer all along.
func (pp *pmtuPeer) active(d time.Duration) {
	pp.now = pp.now.Add(d)
	pp.p.sel.NoteActivity(pp.now)
}

// poll advances the clock and polls the prober; pongs come back for the
// probes of at most maxOK bytes (overlay size).
func (pp *pmtuPeer) poll(d time.Duration, maxOK int) (sent []int, res *pmtuResult) {
	pp.now = pp.now.Add(d)
	probes, res, _ := pp.b.pmtuPollLocked(pp.p, pp.now)
	for _, pr := range probes {
		if pr.to != pp.ep {
			pp.t.Fatalf("probe to %v, want the direct path %v", pr.to, pp.ep)
		}
		sent = append(sent, pr.size)
	}
	for _, pr := range probes {
		if pr.size <= maxOK {
			probe, r := pp.b.pmtuPongLocked(pp.p, pp.now, pr.tx, pr.to)
			if !probe {
				pp.t.Fatalf("pong to a %d-byte probe not recognised", pr.size)
			}
			if r != nil {
				res = r
			}
		}
	}
	return sent, res
}

func TestPMTUBlackholeDetected(t *testing.T) {
	pp := newPMTUPeer(t, 8920)
	// Not direct yet (nor active): nothing is probed.
	if sent, _ := pp.poll(0, 0); len(sent) != 0 {
		t.Fatalf("probed %v without a direct path", sent)
	}
	pp.goDirect(pp.ep)
	sent, res := pp.poll(0, 1420)
	if !slices.Equal(sent, []int{1280, 1420, 8920}) || res != nil {
		t.Fatalf("first round sent %v (result %+v), want the ladder 1280 1420 8920 and no result yet", sent, res)
	}
	// The 8920 probe is tried pmtuAttempts times in all before it counts
	// as lost: one lost datagram is no blackhole.
	for i := 2; i <= pmtuAttempts; i++ {
		if sent, res = pp.poll(time.Second, 1420); !slices.Equal(sent, []int{8920}) || res != nil {
			t.Fatalf("attempt %d sent %v (result %+v), want only 8920 again", i, sent, res)
		}
	}
	_, res = pp.poll(time.Second, 1420)
	if res == nil || !res.lost || res.pathMTU != 1420 || res.addr != pp.ep {
		t.Fatalf("result %+v, want full size lost, path MTU 1420 on %v", res, pp.ep)
	}
	// Quiet until the interval is up; the next round with the same
	// outcome reports nothing new (the warning is logged once).
	for range 4 {
		pp.active(time.Minute)
		if sent, _ := pp.poll(0, 1420); len(sent) != 0 {
			t.Fatalf("probed %v before the interval was up", sent)
		}
	}
	pp.active(time.Minute)
	if sent, _ := pp.poll(0, 1420); !slices.Equal(sent, []int{1280, 1420, 8920}) {
		t.Fatalf("after the interval sent %v, want a new round", sent)
	}
	for range pmtuAttempts {
		if _, res = pp.poll(time.Second, 1420); res != nil {
			t.Fatalf("unchanged outcome reported again: %+v", res)
		}
	}
	// The path heals (someone fixed the MTU): one result, not lost.
	pp.active(5 * time.Minute)
	if _, res = pp.poll(0, 8920); res == nil || res.lost || res.pathMTU != 8920 || !res.was.lost {
		t.Fatalf("healed path: result %+v, want path MTU 8920, no loss, previously lost", res)
	}
}

func TestPMTUIdleAndPathChange(t *testing.T) {
	pp := newPMTUPeer(t, 8920)
	pp.goDirect(pp.ep)
	if _, res := pp.poll(0, 8920); res == nil || res.lost {
		t.Fatalf("clean path: %+v, want a result without loss", res)
	}
	// Idle (no sends for ActiveTimeout): never probed, even when due.
	if sent, _ := pp.poll(time.Hour, 8920); len(sent) != 0 {
		t.Fatalf("idle peer probed: %v", sent)
	}
	// A new direct path is probed at once, without waiting for the
	// interval; a round cut short by a path change reports nothing.
	pp.goDirect(netip.MustParseAddrPort("198.18.3.3:41641"))
	if sent, _ := pp.poll(0, 0); len(sent) != 3 {
		t.Fatalf("new path: sent %v, want a full round", sent)
	}
	pp.goDirect(netip.MustParseAddrPort("198.18.4.4:41641"))
	sent, res := pp.poll(0, 0)
	if res != nil || len(sent) != 3 {
		t.Fatalf("after a path change mid-round: sent %v result %+v, want a new full round and no result", sent, res)
	}
	// A pong from another address than the probed path is no evidence.
	pp.now = pp.now.Add(time.Second)
	probes, _, _ := pp.b.pmtuPollLocked(pp.p, pp.now)
	for _, pr := range probes {
		if probe, r := pp.b.pmtuPongLocked(pp.p, pp.now, pr.tx, netip.MustParseAddrPort("192.0.2.9:1")); !probe || r != nil {
			t.Fatalf("pong from elsewhere: probe=%v result=%+v", probe, r)
		}
	}
	if probe, _ := pp.b.pmtuPongLocked(pp.p, pp.now, disco.NewTxID(), pp.ep); probe {
		t.Fatal("an unknown transaction was taken for a probe")
	}
}

func TestPMTUDisabled(t *testing.T) {
	pp := newPMTUPeer(t, 0)
	pp.goDirect(pp.ep)
	if sent, _ := pp.poll(0, 0); len(sent) != 0 {
		t.Fatalf("OverlayMTU 0 probed %v", sent)
	}
}

func TestMTUProblemText(t *testing.T) {
	for _, tt := range []struct {
		path, overlay int
		want          []string
	}{
		{1420, 8920, []string{"peer gpu-2: direct path drops packets over 1420 bytes (overlay MTU 8920; TCP to it is clamped, larger packets are answered with ICMP packet-too-big", "meshd daemon --mtu 1420", "ICMP fragmentation-needed"}},
		{0, 8920, []string{"drops even 1280-byte packets", "ICMP fragmentation-needed"}},
	} {
		got := MTUProblemText("gpu-2", tt.path, tt.overlay)
		for _, w := range tt.want {
			if !strings.Contains(got, w) {
				t.Errorf("MTUProblemText(%d, %d) = %q, want it to mention %q", tt.path, tt.overlay, got, w)
			}
		}
	}
}

func TestPMTUOverlayChange(t *testing.T) {
	pp := newPMTUPeer(t, 1420)
	pp.goDirect(pp.ep)
	if _, res := pp.poll(0, 8920); res == nil || res.lost || res.overlay != 1420 {
		t.Fatalf("first round: %+v, want a clean result for overlay 1420", res)
	}
	if !pp.p.pmtu.current(pp.ep, int(pp.b.overlayMTU.Load())) {
		t.Fatalf("result %+v not current for overlay 1420", pp.p.pmtu)
	}
	// The agent moved to the jumbo fabric: the old result says nothing
	// about 8920-byte packets, so it is not shown and the path is probed
	// again at once, not after PMTUInterval.
	pp.b.SetOverlayMTU(8920)
	if pp.p.pmtu.current(pp.ep, int(pp.b.overlayMTU.Load())) {
		t.Fatalf("result %+v for overlay 1420 still shown at 8920", pp.p.pmtu)
	}
	pp.active(time.Second)
	sent, _ := pp.poll(0, 1420)
	if !slices.Equal(sent, []int{1280, 1420, 8920}) {
		t.Fatalf("after the MTU change sent %v, want the ladder up to 8920 at once", sent)
	}
	var res *pmtuResult
	for range pmtuAttempts {
		_, res = pp.poll(time.Second, 1420)
	}
	if res == nil || !res.lost || res.pathMTU != 1420 || res.overlay != 8920 {
		t.Fatalf("result %+v, want 8920 lost, path MTU 1420", res)
	}
}
