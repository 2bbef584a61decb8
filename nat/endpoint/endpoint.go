// Package endpoint chooses, per peer, the path its packets take: a direct
// UDP ip:port that recently answered a disco ping, or the peer's DERP home
// when none did. It is pure logic with the clock passed in, so every timing
// rule is unit-testable; the magic bind drives it, sends the pings it asks
// for, and feeds back pongs.
//
// The rules: traffic starts on DERP at once. Every candidate is pinged (and
// a call-me-maybe asked for through DERP) so both NATs open; the first pong
// makes the path direct. While direct, the chosen path is pinged every
// HeartbeatInterval and is abandoned when no pong came for TrustDuration, so
// a dead path falls back to DERP within a few seconds; all candidates are
// re-probed every UpgradeInterval so a better path (a LAN address, a lower
// latency) is found. An idle peer is not probed at all.
package endpoint

import (
	"cmp"
	"net/netip"
	"slices"
	"time"

	"meshd.dev/meshd/nat/disco"
)

// Config holds the timing rules; zero fields take the defaults.
type Config struct {
	// HeartbeatInterval: how often the direct path in use is pinged.
	HeartbeatInterval time.Duration // default 2s
	// TrustDuration: a path is used while its last pong is younger.
	TrustDuration time.Duration // default 5s
	// ProbeInterval: how often all candidates are pinged while on DERP.
	ProbeInterval time.Duration // default 5s
	// UpgradeInterval: how often all candidates are re-pinged while
	// direct, looking for a better path.
	UpgradeInterval time.Duration // default 60s
	// PingTimeout: a ping unanswered this long is forgotten.
	PingTimeout time.Duration // default 5s
	// ActiveTimeout: with no traffic for this long the peer is idle and
	// not probed; NoteActivity wakes it.
	ActiveTimeout time.Duration // default 45s
	// NewTxID makes ping transaction IDs; nil uses disco.NewTxID.
	NewTxID func() disco.TxID
}

func (c *Config) setDefaults() {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&c.HeartbeatInterval, 2*time.Second)
	def(&c.TrustDuration, 5*time.Second)
	def(&c.ProbeInterval, 5*time.Second)
	def(&c.UpgradeInterval, 60*time.Second)
	def(&c.PingTimeout, 5*time.Second)
	def(&c.ActiveTimeout, 45*time.Second)
	if c.NewTxID == nil {
		c.NewTxID = disco.NewTxID
	}
}

// Source says where a candidate address came from.
type Source int

const (
	// FromNetmap: the peer's endpoints as the coordinator published them.
	FromNetmap Source = iota
	// FromCallMeMaybe: endpoints the peer listed in a call-me-maybe.
	FromCallMeMaybe
	// FromPing: the source address of a ping the peer sent us.
	FromPing
)

// maxLearnt bounds candidates learnt from the peer's own messages, so a
// peer cannot grow our state without limit.
const maxLearnt = 32

type candidate struct {
	source   Source
	lastPing time.Time
	// unanswered is when the first ping after the last pong went out:
	// heartbeats keep going while none is answered, so lastPing alone
	// would never look overdue.
	unanswered time.Time
	lastPong   time.Time
	latency    time.Duration
}

type sentPing struct {
	to   netip.AddrPort
	sent time.Time
}

// Probe is a ping the caller should send now.
type Probe struct {
	To   netip.AddrPort
	TxID disco.TxID
}

// Actions is what Poll asks the caller to do.
type Actions struct {
	Pings []Probe
	// CallMeMaybe asks the caller to send the peer a call-me-maybe with
	// our endpoints through DERP, so it pings us back while we ping it.
	CallMeMaybe bool
}

// Selector is the path state of one peer. It is not safe for concurrent
// use; the bind serialises calls per peer.
type Selector struct {
	cfg        Config
	cands      map[netip.AddrPort]*candidate
	pings      map[disco.TxID]sentPing
	best       netip.AddrPort
	lastFull   time.Time
	lastActive time.Time
}

// New returns a Selector with no candidates: everything goes over DERP.
func New(cfg Config) *Selector {
	cfg.setDefaults()
	return &Selector{cfg: cfg, cands: make(map[netip.AddrPort]*candidate), pings: make(map[disco.TxID]sentPing)}
}

// SetCandidates replaces the candidates the coordinator published for the
// peer. Candidates learnt from the peer itself are kept.
func (s *Selector) SetCandidates(eps []netip.AddrPort) {
	keep := make(map[netip.AddrPort]bool, len(eps))
	for _, ep := range eps {
		if !validEndpoint(ep) {
			continue
		}
		keep[ep] = true
		if c, ok := s.cands[ep]; ok {
			c.source = FromNetmap
		} else {
			s.cands[ep] = &candidate{source: FromNetmap}
			// A peer that just learnt its public mapping is worth probing
			// now rather than at the next round.
			s.lastFull = time.Time{}
		}
	}
	for ep, c := range s.cands {
		if c.source == FromNetmap && !keep[ep] {
			s.remove(ep)
		}
	}
}

// Reprobe makes the next Poll a full round (pings to every candidate and a
// call-me-maybe), for when our own endpoints changed: the peer can now reach
// an address it could not before.
func (s *Selector) Reprobe() { s.lastFull = time.Time{} }

// PingedFrom notes a direct disco ping from the peer at ep. The peer is
// talking to us, and its NAT has just opened towards us from ep, so if we do
// not already trust ep we probe at once rather than at the next round: this
// is what turns a one-sided hole punch into a direct path in one round trip.
func (s *Selector) PingedFrom(now time.Time, ep netip.AddrPort) {
	s.AddCandidate(ep, FromPing)
	c, ok := s.cands[ep]
	if !ok || s.trusted(now, c) {
		return
	}
	s.NoteActivity(now)
	s.lastFull = time.Time{}
}

// AddCandidate adds an address the peer told us about (call-me-maybe) or
// pinged us from. It is probed at the next Poll if it is new.
func (s *Selector) AddCandidate(ep netip.AddrPort, src Source) {
	if !validEndpoint(ep) {
		return
	}
	if _, ok := s.cands[ep]; ok {
		return
	}
	learnt := 0
	var oldest netip.AddrPort
	for a, c := range s.cands {
		if c.source != FromNetmap {
			learnt++
			if a != s.best && (!oldest.IsValid() || c.lastPong.Before(s.cands[oldest].lastPong)) {
				oldest = a
			}
		}
	}
	if learnt >= maxLearnt && oldest.IsValid() {
		s.remove(oldest)
	}
	s.cands[ep] = &candidate{source: src}
	// A new address is worth probing now rather than at the next round.
	s.lastFull = time.Time{}
}

func (s *Selector) remove(ep netip.AddrPort) {
	delete(s.cands, ep)
	if s.best == ep {
		s.best = netip.AddrPort{}
	}
	for tx, p := range s.pings {
		if p.to == ep {
			delete(s.pings, tx)
		}
	}
}

func validEndpoint(ep netip.AddrPort) bool {
	return ep.IsValid() && ep.Port() != 0 && !ep.Addr().IsUnspecified() && !ep.Addr().IsMulticast()
}

// NoteActivity records that packets are being sent to the peer, which keeps
// (or starts) probing.
func (s *Selector) NoteActivity(now time.Time) {
	if now.Sub(s.lastActive) >= s.cfg.ActiveTimeout {
		// Waking from idle: whatever we knew may be stale; probe at once.
		s.lastFull = time.Time{}
	}
	s.lastActive = now
}

// Active reports whether packets were sent to the peer within
// ActiveTimeout: only then is it worth probing (idle peers are left alone,
// so idle nodes wake up no more than keepalives need).
func (s *Selector) Active(now time.Time) bool {
	return !s.lastActive.IsZero() && now.Sub(s.lastActive) < s.cfg.ActiveTimeout
}

func (s *Selector) trusted(now time.Time, c *candidate) bool {
	return !c.lastPong.IsZero() && now.Sub(c.lastPong) < s.cfg.TrustDuration
}

// Path returns the direct address to send to, or ok=false to use DERP.
// It moves off a path whose pongs stopped to the best other trusted one.
func (s *Selector) Path(now time.Time) (addr netip.AddrPort, ok bool) {
	if c := s.cands[s.best]; c != nil && s.trusted(now, c) {
		return s.best, true
	}
	s.best = s.pickBest(now, netip.AddrPort{})
	return s.best, s.best.IsValid()
}

// InDoubt reports whether the direct path in use missed its latest
// heartbeat: it is still trusted (its last pong is younger than
// TrustDuration) but the ping sent after that pong is overdue (more than
// three round trips, at least 250ms). The bind then sends over the relay
// too, so a path that just died loses packets for about one heartbeat
// instead of the whole TrustDuration: a TCP stream that loses a whole
// window, and backs its retransmission timer off several times while it
// does, takes many round trips to recover.
func (s *Selector) InDoubt(now time.Time) bool {
	c := s.cands[s.best]
	if c == nil || !s.trusted(now, c) || !c.unanswered.After(c.lastPong) {
		return false
	}
	return now.Sub(c.unanswered) > max(3*c.latency, 250*time.Millisecond)
}

// better reports whether a should replace b: clearly lower latency (by
// more than 10%, so jitter does not flap the path), or equal-ish latency
// and a private (LAN) address, which stays inside the site.
func better(a, b *candidate, aAddr, bAddr netip.AddrPort) bool {
	if a.latency*10 < b.latency*9 {
		return true
	}
	if b.latency*10 < a.latency*9 {
		return false
	}
	return aAddr.Addr().IsPrivate() && !bAddr.Addr().IsPrivate()
}

// pickBest returns the best trusted candidate, staying on cur unless
// another is clearly better.
func (s *Selector) pickBest(now time.Time, cur netip.AddrPort) netip.AddrPort {
	best := netip.AddrPort{}
	if c := s.cands[cur]; c != nil && s.trusted(now, c) {
		best = cur
	}
	// Sorted for a deterministic choice among equals.
	addrs := make([]netip.AddrPort, 0, len(s.cands))
	for a := range s.cands {
		addrs = append(addrs, a)
	}
	slices.SortFunc(addrs, func(x, y netip.AddrPort) int { return x.Compare(y) })
	for _, a := range addrs {
		c := s.cands[a]
		if a == best || !s.trusted(now, c) {
			continue
		}
		if !best.IsValid() || better(c, s.cands[best], a, best) {
			best = a
		}
	}
	return best
}

// Poll returns the pings due now. The caller sends each Probe as a disco
// ping to Probe.To and sends a call-me-maybe over DERP if asked.
func (s *Selector) Poll(now time.Time) Actions {
	for tx, p := range s.pings {
		if now.Sub(p.sent) >= s.cfg.PingTimeout {
			delete(s.pings, tx)
		}
	}
	var act Actions
	if len(s.cands) == 0 || now.Sub(s.lastActive) >= s.cfg.ActiveTimeout {
		return act
	}
	_, direct := s.Path(now)
	full := false
	if direct {
		full = s.lastFull.IsZero() || now.Sub(s.lastFull) >= s.cfg.UpgradeInterval
	} else {
		full = s.lastFull.IsZero() || now.Sub(s.lastFull) >= s.cfg.ProbeInterval
	}
	if full {
		s.lastFull = now
		act.CallMeMaybe = true
		addrs := make([]netip.AddrPort, 0, len(s.cands))
		for a := range s.cands {
			addrs = append(addrs, a)
		}
		slices.SortFunc(addrs, func(x, y netip.AddrPort) int { return x.Compare(y) })
		for _, a := range addrs {
			act.Pings = append(act.Pings, s.ping(now, a))
		}
		return act
	}
	if direct && now.Sub(s.cands[s.best].lastPing) >= s.cfg.HeartbeatInterval {
		act.Pings = append(act.Pings, s.ping(now, s.best))
	}
	return act
}

func (s *Selector) ping(now time.Time, to netip.AddrPort) Probe {
	tx := s.cfg.NewTxID()
	s.pings[tx] = sentPing{to: to, sent: now}
	c := s.cands[to]
	if !c.lastPing.After(c.lastPong) {
		c.unanswered = now
	}
	c.lastPing = now
	return Probe{To: to, TxID: tx}
}

// HandlePong records a pong for one of our pings, received from addr. It
// returns false for pongs we did not ask for, that come from another
// address than the one pinged, or that arrive after PingTimeout: those say
// nothing about a path we can use.
func (s *Selector) HandlePong(now time.Time, tx disco.TxID, from netip.AddrPort) bool {
	p, ok := s.pings[tx]
	if !ok || p.to != from || now.Sub(p.sent) >= s.cfg.PingTimeout {
		return false
	}
	delete(s.pings, tx)
	c := s.cands[from]
	if c == nil {
		return false
	}
	c.lastPong = now
	c.latency = now.Sub(p.sent)
	s.best = s.pickBest(now, s.best)
	return true
}

// NextWake is when Poll next has something to do (zero when idle or
// without candidates): the bind sleeps until then.
func (s *Selector) NextWake(now time.Time) time.Time {
	if len(s.cands) == 0 || now.Sub(s.lastActive) >= s.cfg.ActiveTimeout {
		return time.Time{}
	}
	if s.lastFull.IsZero() {
		return now
	}
	c := s.cands[s.best]
	if c == nil || !s.trusted(now, c) {
		return s.lastFull.Add(s.cfg.ProbeInterval)
	}
	t := s.lastFull.Add(s.cfg.UpgradeInterval)
	t = minTime(t, c.lastPing.Add(s.cfg.HeartbeatInterval))
	// Wake when trust would lapse, to fall back or re-probe promptly.
	return minTime(t, c.lastPong.Add(s.cfg.TrustDuration))
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

// CandidateState describes one candidate, for status output.
type CandidateState struct {
	Addr     netip.AddrPort `json:"addr"`
	Source   Source         `json:"source"`
	LastPong time.Time      `json:"last_pong,omitzero"`
	Latency  time.Duration  `json:"latency,omitempty"`
	Trusted  bool           `json:"trusted"`
}

// State is a snapshot for `meshd status`.
type State struct {
	Direct     bool             `json:"direct"`
	Addr       netip.AddrPort   `json:"addr,omitzero"`
	Latency    time.Duration    `json:"latency,omitempty"`
	Candidates []CandidateState `json:"candidates,omitempty"`
}

// State reports the current path and candidates.
func (s *Selector) State(now time.Time) State {
	var st State
	if a, ok := s.Path(now); ok {
		st.Direct, st.Addr, st.Latency = true, a, s.cands[a].latency
	}
	for a, c := range s.cands {
		st.Candidates = append(st.Candidates, CandidateState{Addr: a, Source: c.source, LastPong: c.lastPong, Latency: c.latency, Trusted: s.trusted(now, c)})
	}
	slices.SortFunc(st.Candidates, func(x, y CandidateState) int { return cmp.Compare(x.Addr.String(), y.Addr.String()) })
	return st
}
