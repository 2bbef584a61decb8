package magicbind

import (
	"bytes"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"golang.zx2c4.com/wireguard/conn"

	"meshd.dev/meshd/derp"
	"meshd.dev/meshd/nat/disco"
	"meshd.dev/meshd/netmap"
)

// recordingBind is a UDP socket that records what it was asked to send.
type recordingBind struct {
	conn.Bind
	mu   sync.Mutex
	sent []sentPacket
}

type sentPacket struct {
	to  netip.AddrPort
	pkt []byte
	at  time.Time
}

func (r *recordingBind) Send(bufs [][]byte, ep conn.Endpoint) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, b := range bufs {
		r.sent = append(r.sent, sentPacket{to: ep.(*conn.StdNetEndpoint).AddrPort, pkt: bytes.Clone(b), at: time.Now()})
	}
	return nil
}

// wireGuard returns the sent packets that are not disco.
func (r *recordingBind) wireGuard() []sentPacket {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []sentPacket
	for _, s := range r.sent {
		if !disco.Looks(s.pkt) {
			out = append(out, s)
		}
	}
	return out
}

// holdHarness is a bind (not opened) with one peer that has no path: no
// endpoints, no home region, no DERP map.
type holdHarness struct {
	b      *Bind
	sock   *recordingBind
	ep     conn.Endpoint
	peer   netmap.Node
	peerDK netmap.DiscoPrivate
}

func newHoldHarness(t *testing.T) *holdHarness {
	t.Helper()
	h := &holdHarness{sock: &recordingBind{}, peerDK: netmap.NewDiscoPrivate()}
	h.b = New(Options{NodeKey: netmap.NewNodePrivate(), DiscoKey: netmap.NewDiscoPrivate()})
	h.b.std = h.sock
	h.peer = netmap.Node{ID: 1, NodeKey: netmap.NewNodePrivate().Public(), DiscoKey: h.peerDK.Public()}
	h.setMap()
	ep, err := h.b.ParseEndpoint(EndpointFor(h.peer.NodeKey))
	if err != nil {
		t.Fatal(err)
	}
	h.ep = ep
	return h
}

func (h *holdHarness) setMap() {
	n := h.peer
	h.b.SetNetworkMap(&netmap.NetworkMap{Peers: map[netmap.NodeID]*netmap.Node{n.ID: &n}})
}

// publishEndpoint gives the peer an endpoint in the map.
func (h *holdHarness) publishEndpoint(t *testing.T, a netip.AddrPort) {
	h.peer.Endpoints = []netip.AddrPort{a}
	h.setMap()
}

// confirmDirect has the peer announce a over the relay (call-me-maybe) and
// answer the bind's ping to it, as disco does.
func (h *holdHarness) confirmDirect(t *testing.T, a netip.AddrPort) {
	t.Helper()
	self := h.b.opts.DiscoKey.Public()
	h.b.handleDisco(disco.Seal(h.peerDK, self, disco.CallMeMaybe{Endpoints: []netip.AddrPort{a}}),
		netip.AddrPortFrom(derpMagicAddr, 1), &region{id: 1, code: "lab"}, h.peer.NodeKey)
	p := h.ep.(*Endpoint).p
	p.mu.Lock()
	pings := p.sel.Poll(time.Now()).Pings
	p.mu.Unlock()
	if len(pings) == 0 {
		t.Fatal("the selector sent no ping to the announced endpoint")
	}
	for _, pr := range pings {
		h.b.handleDisco(disco.Seal(h.peerDK, self, disco.Pong{TxID: pr.TxID, Src: ap("192.0.2.1:41641")}), pr.To, nil, netmap.NodePublic{})
	}
}

func initiation(fill byte) []byte {
	pkt := bytes.Repeat([]byte{fill}, wgInitiationSize)
	copy(pkt, []byte{wgInitiationType, 0, 0, 0})
	return pkt
}

// TestFirstInitiationSentWhenPathAppears: the handshake initiation WireGuard
// sends to a peer with no path is not lost but goes out the moment a path
// appears, instead of WireGuard's retry after RekeyTimeout (5 s). Sent to a
// published endpoint (a guess: the peer may not know our address yet and
// drop it) it is kept and sent again when disco confirms a path, then no
// more.
func TestFirstInitiationSentWhenPathAppears(t *testing.T) {
	to := ap("198.51.100.7:41641")
	for _, tc := range []struct {
		name    string
		path    func(*testing.T, *holdHarness)
		confirm bool // disco confirms the path afterwards
		sends   int  // in all, once disco confirmed the path
	}{
		{"map publishes an endpoint", func(t *testing.T, h *holdHarness) { h.publishEndpoint(t, to) }, true, 2},
		{"disco confirms a direct path", func(t *testing.T, h *holdHarness) { h.confirmDirect(t, to) }, false, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				h := newHoldHarness(t)
				pkt := initiation(0xaa)
				if err := h.b.Send([][]byte{pkt}, h.ep); err != nil {
					t.Fatalf("Send of an initiation with no path: %v, want it held", err)
				}
				if s := h.sock.wireGuard(); len(s) != 0 {
					t.Fatalf("sent %d packets with no path", len(s))
				}
				time.Sleep(2 * time.Second) // the path takes a while
				appeared := time.Now()
				tc.path(t, h)
				s := h.sock.wireGuard()
				if len(s) != 1 || !bytes.Equal(s[0].pkt, pkt) || s[0].to != to {
					t.Fatalf("after the path appeared sent %+v, want the initiation once to %v", s, to)
				}
				if d := s[0].at.Sub(appeared); d >= time.Second {
					t.Errorf("initiation sent %v after the path appeared", d)
				}
				if tc.confirm {
					time.Sleep(100 * time.Millisecond)
					h.confirmDirect(t, to)
				}
				h.setMap() // a sure path: nothing more to send
				time.Sleep(100 * time.Millisecond)
				h.setMap()
				s = h.sock.wireGuard()
				for _, x := range s {
					if !bytes.Equal(x.pkt, pkt) || x.to != to {
						t.Errorf("sent %x to %v, want only the initiation to %v", x.pkt[:4], x.to, to)
					}
				}
				if len(s) != tc.sends {
					t.Errorf("initiation sent %d times, want %d", len(s), tc.sends)
				}
			})
		})
	}
}

// TestHeldInitiationExpires: an initiation held for RekeyTimeout is dropped,
// since WireGuard has made a fresh one by then; a younger one is sent.
func TestHeldInitiationExpires(t *testing.T) {
	for _, tc := range []struct {
		age  time.Duration
		sent bool
	}{
		{0, true},
		{holdFor - time.Millisecond, true},
		{holdFor, false},
		{time.Minute, false},
	} {
		t.Run(tc.age.String(), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				h := newHoldHarness(t)
				if err := h.b.Send([][]byte{initiation(0xbb)}, h.ep); err != nil {
					t.Fatal(err)
				}
				time.Sleep(tc.age)
				h.publishEndpoint(t, ap("198.51.100.7:41641"))
				if got := len(h.sock.wireGuard()) == 1; got != tc.sent {
					t.Errorf("held %v: sent %v, want %v", tc.age, got, tc.sent)
				}
			})
		})
	}
}

// TestOnlyHandshakesHeld: a handshake response is held like an
// initiation (the initiator waits for it as long as for a late one); other
// packets to a peer with no path fail as before and are never sent later;
// of several handshake messages only the last is held.
func TestOnlyHandshakesHeld(t *testing.T) {
	from := func(f func([]byte) []byte) []byte { return f(initiation(0xcc)) }
	for _, tc := range []struct {
		name string
		pkt  []byte
		held bool
	}{
		{"initiation", initiation(0xcc), true},
		{"response", from(func(b []byte) []byte { b[0] = 2; return b[:92] }), true},
		{"transport data", from(func(b []byte) []byte { b[0] = 4; return b }), false},
		{"cookie reply", from(func(b []byte) []byte { b[0] = 3; return b[:64] }), false},
		{"initiation type, short", from(func(b []byte) []byte { return b[:147] }), false},
		{"initiation type, long", append(initiation(0xcc), 0), false},
		{"response type, initiation size", from(func(b []byte) []byte { b[0] = 2; return b }), false},
		{"type with high bytes set", from(func(b []byte) []byte { b[3] = 1; return b }), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				h := newHoldHarness(t)
				if err := h.b.Send([][]byte{tc.pkt}, h.ep); (err == nil) != tc.held {
					t.Errorf("Send with no path: %v, want held %v", err, tc.held)
				}
				h.publishEndpoint(t, ap("198.51.100.7:41641"))
				s := h.sock.wireGuard()
				if tc.held && (len(s) != 1 || !bytes.Equal(s[0].pkt, tc.pkt)) || !tc.held && len(s) != 0 {
					t.Errorf("sent %d packets once the path appeared, want held %v", len(s), tc.held)
				}
			})
		})
	}
	t.Run("last handshake message wins", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			h := newHoldHarness(t)
			resp := from(func(b []byte) []byte { b[0] = 2; return b[:92] })
			for _, pkt := range [][]byte{initiation(1), resp, initiation(3)} {
				if err := h.b.Send([][]byte{pkt}, h.ep); err != nil {
					t.Fatal(err)
				}
			}
			h.publishEndpoint(t, ap("198.51.100.7:41641"))
			if s := h.sock.wireGuard(); len(s) != 1 || !bytes.Equal(s[0].pkt, initiation(3)) {
				t.Errorf("sent %d packets, want only the last initiation", len(s))
			}
		})
	})
}

// TestHoldAllocs: holding an initiation copies it into the peer's buffer,
// allocated once.
func TestHoldAllocs(t *testing.T) {
	h := newHoldHarness(t)
	bufs := [][]byte{initiation(0xdd)}
	if err := h.b.Send(bufs, h.ep); err != nil {
		t.Fatal(err)
	}
	if a := testing.AllocsPerRun(100, func() {
		if err := h.b.Send(bufs, h.ep); err != nil {
			t.Fatal(err)
		}
	}); a != 0 {
		t.Errorf("holding an initiation: %v allocations", a)
	}
}

// TestDuplicateHandshakeDropped: a second copy of a handshake message
// (sendHeld sends a held one again once a sure path appears; a relayed
// copy and a direct one race) is dropped before WireGuard, whose replay
// check lets two copies taken at once through (handshakeDedup), by
// either path; anything else, and a copy after holdFor, goes through.
func TestDuplicateHandshakeDropped(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHoldHarness(t)
		direct := ap("198.51.100.7:41641")
		h.confirmDirect(t, direct)
		resp := bytes.Repeat([]byte{9}, wgResponseSize)
		copy(resp, []byte{wgResponseType, 0, 0, 0})
		data := bytes.Repeat([]byte{7}, 64)
		copy(data, []byte{4, 0, 0, 0})
		in := [][]byte{initiation(1), initiation(1), data, data, resp, initiation(2), resp}
		recv := h.b.wrapReceive(func(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
			for i, p := range in {
				sizes[i] = copy(packets[i], p)
				eps[i] = &conn.StdNetEndpoint{AddrPort: direct}
			}
			return len(in), nil
		})
		receive := func() []int {
			packets := make([][]byte, len(in))
			for i := range packets {
				packets[i] = make([]byte, 1500)
			}
			sizes := make([]int, len(in))
			n, err := recv(packets, sizes, make([]conn.Endpoint, len(in)))
			if err != nil || n != len(in) {
				t.Fatalf("receive: %d, %v", n, err)
			}
			return sizes
		}
		I, R, D := wgInitiationSize, wgResponseSize, len(data)
		if got, want := receive(), []int{I, 0, D, D, R, I, 0}; !slices.Equal(got, want) {
			t.Fatalf("first batch: sizes %v, want %v", got, want)
		}
		// The same copies by the relay are dropped too.
		p := h.ep.(*Endpoint).p
		o := &openState{ctx: t.Context(), derpRx: make(chan derpPacket, 4)}
		h.b.handleDERP(o, &region{id: 1, code: "lab"}, derp.ReceivedPacket{Source: h.peer.NodeKey, Data: initiation(1)})
		h.b.handleDERP(o, &region{id: 1, code: "lab"}, derp.ReceivedPacket{Source: h.peer.NodeKey, Data: initiation(3)})
		if len(o.derpRx) != 1 || (<-o.derpRx).p != p {
			t.Fatalf("relayed: %d packets queued, want only the new initiation", len(o.derpRx)+1)
		}
		time.Sleep(holdFor)
		if got, want := receive(), []int{I, 0, D, D, R, I, 0}; !slices.Equal(got, want) {
			t.Fatalf("after holdFor: sizes %v, want %v", got, want)
		}
	})
}
