package endpoint

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"meshd.dev/meshd/nat/disco"
)

var (
	t0     = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	pubEP  = netip.MustParseAddrPort("198.51.100.7:41641")
	lanEP  = netip.MustParseAddrPort("10.0.0.7:41641")
	v6EP   = netip.MustParseAddrPort("[2001:db8::7]:41641")
	ms     = time.Millisecond
	second = time.Second
)

// peer wraps a Selector with a clock and the "network": which addresses
// answer pings and with what round trip.
type peer struct {
	t   *testing.T
	s   *Selector
	now time.Time
	rtt map[netip.AddrPort]time.Duration // absent: the path is dead
	cmm int                              // call-me-maybes requested
}

func newPeer(t *testing.T, eps ...netip.AddrPort) *peer {
	p := &peer{t: t, s: New(Config{}), now: t0, rtt: map[netip.AddrPort]time.Duration{}}
	p.s.SetCandidates(eps)
	p.s.NoteActivity(p.now)
	return p
}

// step advances the clock by d, keeps the peer active, polls, and delivers
// pongs for pings to live paths after their round trip. It returns the
// addresses pinged.
func (p *peer) step(d time.Duration) []netip.AddrPort {
	p.now = p.now.Add(d)
	p.s.NoteActivity(p.now)
	act := p.s.Poll(p.now)
	if act.CallMeMaybe {
		p.cmm++
	}
	var pinged []netip.AddrPort
	for _, pr := range act.Pings {
		pinged = append(pinged, pr.To)
	}
	// Deliver pongs in order of arrival.
	slices.SortFunc(act.Pings, func(a, b Probe) int { return int(p.rtt[a.To] - p.rtt[b.To]) })
	for _, pr := range act.Pings {
		if rtt, ok := p.rtt[pr.To]; ok {
			if !p.s.HandlePong(p.now.Add(rtt), pr.TxID, pr.To) {
				p.t.Fatalf("pong from %v rejected", pr.To)
			}
		}
	}
	return pinged
}

func (p *peer) path() (netip.AddrPort, bool) { return p.s.Path(p.now) }

func (p *peer) wantDirect(ep netip.AddrPort) {
	p.t.Helper()
	if got, ok := p.path(); !ok || got != ep {
		p.t.Fatalf("at +%v: path %v direct=%v, want direct %v", p.now.Sub(t0), got, ok, ep)
	}
}

func (p *peer) wantDERP() {
	p.t.Helper()
	if got, ok := p.path(); ok {
		p.t.Fatalf("at +%v: path direct %v, want DERP", p.now.Sub(t0), got)
	}
}

func TestStartsOnDERPThenGoesDirect(t *testing.T) {
	p := newPeer(t, pubEP)
	p.wantDERP() // traffic flows via DERP before any probing
	p.rtt[pubEP] = 20 * ms
	pinged := p.step(0)
	if !slices.Equal(pinged, []netip.AddrPort{pubEP}) || p.cmm != 1 {
		t.Fatalf("first poll pinged %v, call-me-maybe %d; want all candidates and one call-me-maybe", pinged, p.cmm)
	}
	p.now = p.now.Add(20 * ms)
	p.wantDirect(pubEP)
	if st := p.s.State(p.now); !st.Direct || st.Latency != 20*ms {
		t.Fatalf("state %+v", st)
	}
}

func TestNoPongStaysOnDERPAndReprobes(t *testing.T) {
	p := newPeer(t, pubEP, lanEP) // both sides symmetric: nothing answers
	var rounds int
	for range 30 { // 30 s
		if len(p.step(second)) > 0 {
			rounds++
		}
		p.wantDERP()
	}
	// One round at once, then one per ProbeInterval (5 s).
	if rounds < 5 || rounds > 7 {
		t.Fatalf("%d probe rounds in 30s on DERP, want about 6", rounds)
	}
}

func TestPrefersLowerLatencyWithHysteresis(t *testing.T) {
	tests := []struct {
		name     string
		rtt      map[netip.AddrPort]time.Duration
		want     netip.AddrPort
		upgraded map[netip.AddrPort]time.Duration // after an upgrade probe
		wantThen netip.AddrPort
	}{
		{"lan much faster", map[netip.AddrPort]time.Duration{pubEP: 30 * ms, lanEP: 1 * ms}, lanEP, nil, lanEP},
		{"equal latency prefers lan", map[netip.AddrPort]time.Duration{pubEP: 10 * ms, lanEP: 10 * ms}, lanEP, nil, lanEP},
		{"5% better does not flap", map[netip.AddrPort]time.Duration{pubEP: 20 * ms, v6EP: 40 * ms}, pubEP,
			map[netip.AddrPort]time.Duration{pubEP: 20 * ms, v6EP: 19 * ms}, pubEP},
		{"50% better switches", map[netip.AddrPort]time.Duration{pubEP: 20 * ms, v6EP: 40 * ms}, pubEP,
			map[netip.AddrPort]time.Duration{pubEP: 20 * ms, v6EP: 10 * ms}, v6EP},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var eps []netip.AddrPort
			for ep := range tt.rtt {
				eps = append(eps, ep)
			}
			p := newPeer(t, eps...)
			p.rtt = tt.rtt
			p.step(0)
			p.now = p.now.Add(100 * ms)
			p.wantDirect(tt.want)
			if tt.upgraded != nil {
				p.rtt = tt.upgraded
			}
			// Run past an upgrade round, heartbeating as we go.
			for range 62 {
				p.step(second)
			}
			p.now = p.now.Add(100 * ms)
			p.wantDirect(tt.wantThen)
		})
	}
}

func TestDirectPathDiesFallsBackToDERPQuickly(t *testing.T) {
	p := newPeer(t, pubEP)
	p.rtt[pubEP] = 10 * ms
	p.step(0)
	for range 10 { // healthy for 10 s: heartbeats keep it direct
		p.step(second)
		p.wantDirect(pubEP)
	}
	delete(p.rtt, pubEP) // iptables drop mid-transfer
	cut := p.now
	for p.now.Sub(cut) < 10*second {
		p.step(100 * ms)
		if _, ok := p.path(); !ok {
			break
		}
	}
	if d := p.now.Sub(cut); d > 5*second+200*ms { // TrustDuration after the last pong
		t.Fatalf("fell back to DERP %v after the path died, want within TrustDuration (5s) of the last pong", d)
	} else if d < time.Second {
		t.Fatalf("fell back after %v: a single lost heartbeat must not drop the path", d)
	}
	p.wantDERP()
	// The path comes back: probing on DERP finds it again.
	p.rtt[pubEP] = 10 * ms
	for range 6 {
		p.step(second)
	}
	p.now = p.now.Add(20 * ms)
	p.wantDirect(pubEP)
}

func TestHeartbeatOnlyPingsBestPath(t *testing.T) {
	p := newPeer(t, pubEP, lanEP)
	p.rtt[lanEP] = 1 * ms
	p.rtt[pubEP] = 30 * ms
	p.step(0)
	for i := range 20 {
		pinged := p.step(second)
		if len(pinged) > 1 {
			t.Fatalf("second %d: pinged %v between upgrade rounds, want only the best path", i+1, pinged)
		}
		for _, a := range pinged {
			if a != lanEP {
				t.Fatalf("heartbeat went to %v, want %v", a, lanEP)
			}
		}
	}
}

func TestPongValidation(t *testing.T) {
	p := newPeer(t, pubEP, lanEP)
	act := p.s.Poll(p.now)
	if len(act.Pings) != 2 {
		t.Fatalf("pings %v", act.Pings)
	}
	var toPub Probe
	for _, pr := range act.Pings {
		if pr.To == pubEP {
			toPub = pr
		}
	}
	tests := []struct {
		name string
		tx   disco.TxID
		from netip.AddrPort
		at   time.Duration
	}{
		{"unknown tx", disco.NewTxID(), pubEP, 10 * ms},
		{"from another address", toPub.TxID, lanEP, 10 * ms},
		{"after timeout", toPub.TxID, pubEP, 6 * second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if p.s.HandlePong(p.now.Add(tt.at), tt.tx, tt.from) {
				t.Fatal("accepted")
			}
			if _, ok := p.s.Path(p.now.Add(tt.at)); ok {
				t.Fatal("went direct on a bad pong")
			}
		})
	}
	// The timed-out ping was consumed; the genuine pong is not replayable.
	if !p.s.HandlePong(p.now.Add(10*ms), toPub.TxID, pubEP) {
		t.Fatal("genuine pong rejected")
	}
	if p.s.HandlePong(p.now.Add(11*ms), toPub.TxID, pubEP) {
		t.Fatal("replayed pong accepted")
	}
}

func TestIdlePeerIsNotProbed(t *testing.T) {
	p := newPeer(t, pubEP)
	p.rtt[pubEP] = 10 * ms
	p.step(0)
	p.now = p.now.Add(46 * second) // no traffic for longer than ActiveTimeout
	if act := p.s.Poll(p.now); len(act.Pings) != 0 || !p.s.NextWake(p.now).IsZero() {
		t.Fatalf("idle peer probed: %+v", act)
	}
	p.s.NoteActivity(p.now)
	if act := p.s.Poll(p.now); len(act.Pings) != 1 || !act.CallMeMaybe {
		t.Fatalf("waking did not probe at once: %+v", act)
	}
}

func TestCandidatesChange(t *testing.T) {
	p := newPeer(t, pubEP)
	p.rtt[pubEP] = 10 * ms
	p.step(0)
	p.now = p.now.Add(10 * ms)
	p.wantDirect(pubEP)
	// The peer moved: the coordinator no longer lists pubEP.
	p.s.SetCandidates([]netip.AddrPort{lanEP})
	p.wantDERP()
	// Learnt candidates survive netmap updates and are probed at once.
	p.s.AddCandidate(v6EP, FromCallMeMaybe)
	p.s.SetCandidates([]netip.AddrPort{lanEP, netip.MustParseAddrPort("0.0.0.0:1")})
	p.rtt[v6EP] = 5 * ms
	if pinged := p.step(10 * ms); !slices.Contains(pinged, v6EP) {
		t.Fatalf("learnt candidate not probed: %v", pinged)
	}
	p.now = p.now.Add(5 * ms)
	p.wantDirect(v6EP)
	if st := p.s.State(p.now); len(st.Candidates) != 2 {
		t.Fatalf("candidates %+v, want lan and v6 (invalid one ignored)", st.Candidates)
	}
	// A flood of learnt addresses stays bounded.
	for i := range 1000 {
		p.s.AddCandidate(netip.AddrPortFrom(netip.MustParseAddr("192.0.2.1"), uint16(i+1)), FromPing)
	}
	if n := len(p.s.State(p.now).Candidates); n > maxLearnt+1 {
		t.Fatalf("%d candidates after a flood, want <= %d", n, maxLearnt+1)
	}
	p.wantDirect(v6EP) // the path in use is never evicted
}

func TestNextWake(t *testing.T) {
	p := newPeer(t, pubEP)
	if w := p.s.NextWake(p.now); !w.Equal(p.now) {
		t.Fatalf("new peer wakes at %v, want now", w)
	}
	p.step(0) // no answer
	if w := p.s.NextWake(p.now); !w.Equal(p.now.Add(5 * second)) {
		t.Fatalf("on DERP wakes at +%v, want +5s", w.Sub(p.now))
	}
	p.rtt[pubEP] = 10 * ms
	p.step(5 * second)
	if w := p.s.NextWake(p.now); !w.Equal(p.now.Add(2 * second)) {
		t.Fatalf("direct wakes at +%v, want heartbeat +2s", w.Sub(p.now))
	}
}

// The hole-punch round trip: our first ping to the peer's public address is
// dropped by its NAT; the peer's ping then arrives from that address (its
// NAT now open towards us), and we must probe again at once, not at the
// next round 5 s later.
func TestPingedFromProbesAtOnce(t *testing.T) {
	p := newPeer(t, pubEP)
	if pinged := p.step(0); !slices.Contains(pinged, pubEP) {
		t.Fatalf("first round did not ping %v: %v", pubEP, pinged)
	}
	p.wantDERP()
	p.rtt[pubEP] = 10 * ms // the peer's NAT is open now
	if pinged := p.step(100 * ms); len(pinged) != 0 {
		t.Fatalf("pinged %v before the next round without a reason", pinged)
	}
	p.s.PingedFrom(p.now, pubEP)
	if pinged := p.step(ms); !slices.Contains(pinged, pubEP) {
		t.Fatalf("ping from %v did not start a probe: %v", pubEP, pinged)
	}
	p.now = p.now.Add(10 * ms)
	p.wantDirect(pubEP)
	// Once the path is trusted, the peer's pings (its heartbeats) cause no
	// extra rounds.
	p.s.PingedFrom(p.now, pubEP)
	if pinged := p.step(ms); len(pinged) != 0 {
		t.Fatalf("ping from a trusted path started a probe: %v", pinged)
	}
}

// TestActive: a peer is active from its last send until ActiveTimeout has
// passed, and never before the first.
func TestActive(t *testing.T) {
	s := New(Config{ActiveTimeout: 45 * second})
	if s.Active(t0) {
		t.Fatal("a peer nothing was ever sent to is active")
	}
	s.NoteActivity(t0)
	for _, tt := range []struct {
		at   time.Duration
		want bool
	}{{0, true}, {44 * second, true}, {45 * second, false}, {time.Hour, false}} {
		if got := s.Active(t0.Add(tt.at)); got != tt.want {
			t.Errorf("Active %v after the last send = %v, want %v", tt.at, got, tt.want)
		}
	}
}

// TestInDoubt: a direct path is in doubt from when its heartbeat is overdue
// (three round trips, at least 250ms) until a pong comes or trust lapses.
func TestInDoubt(t *testing.T) {
	p := newPeer(t, pubEP)
	p.rtt[pubEP] = 20 * ms
	p.step(0)
	if _, ok := p.s.Path(p.now); !ok {
		t.Fatal("no direct path after a pong")
	}
	if p.s.InDoubt(p.now.Add(50 * ms)) {
		t.Fatal("in doubt right after a pong")
	}
	// The path dies: the next heartbeat goes unanswered.
	delete(p.rtt, pubEP)
	for p.now.Sub(t0) < 2*second {
		p.step(100 * ms)
	}
	hb := p.s.cands[pubEP].unanswered
	if !hb.After(p.s.cands[pubEP].lastPong) {
		t.Fatalf("no heartbeat sent after the last pong (ping %v, pong %v)", hb, p.s.cands[pubEP].lastPong)
	}
	for _, tt := range []struct {
		at   time.Time
		want bool
	}{
		{hb.Add(200 * ms), false},                          // within the grace of max(3 x 20ms, 250ms)
		{hb.Add(300 * ms), true},                           // overdue, still trusted: send both ways
		{p.s.cands[pubEP].lastPong.Add(5 * second), false}, // trust lapsed: plain DERP
	} {
		if got := p.s.InDoubt(tt.at); got != tt.want {
			t.Errorf("InDoubt %v after the heartbeat = %v, want %v", tt.at.Sub(hb), got, tt.want)
		}
	}
	// Later heartbeats, unanswered too, keep it in doubt: the doubt dates
	// from the first of them.
	p.step(2 * second)
	if last := p.s.cands[pubEP].lastPing; !last.After(hb) || !p.s.InDoubt(last.Add(ms)) {
		t.Errorf("not in doubt just after a second unanswered heartbeat (first %v, last %v)", hb, last)
	}
	// A pong clears the doubt.
	p.rtt[pubEP] = 20 * ms
	p.step(2 * second)
	if p.s.InDoubt(p.now.Add(10 * ms)) {
		t.Error("still in doubt after a pong")
	}
}
