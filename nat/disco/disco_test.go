package disco

import (
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"meshd.dev/meshd/nat/stun"
	"meshd.dev/meshd/netmap"
)

func TestSealOpenRoundTrip(t *testing.T) {
	a, b := netmap.NewDiscoPrivate(), netmap.NewDiscoPrivate()
	node := netmap.NewNodePrivate().Public()
	tx := NewTxID()
	for _, m := range []Message{
		Ping{TxID: tx, NodeKey: node},
		Ping{TxID: tx, NodeKey: node, Padding: 1200},
		Pong{TxID: tx, Src: netip.MustParseAddrPort("198.51.100.4:41641")},
		Pong{TxID: tx, Src: netip.MustParseAddrPort("[2001:db8::7]:1")},
		CallMeMaybe{Endpoints: []netip.AddrPort{}},
		CallMeMaybe{Endpoints: []netip.AddrPort{netip.MustParseAddrPort("10.0.0.2:41641"), netip.MustParseAddrPort("[fd00::2]:41641")}},
	} {
		pkt := Seal(a, b.Public(), m)
		if !Looks(pkt) {
			t.Fatalf("%T: sealed packet not recognised", m)
		}
		if stun.Is(pkt) {
			t.Fatalf("%T: sealed packet looks like STUN", m)
		}
		if pkt[0] >= 1 && pkt[0] <= 4 && pkt[1] == 0 {
			t.Fatalf("%T: sealed packet looks like WireGuard", m)
		}
		from, got, err := Open(b, pkt)
		if err != nil {
			t.Fatalf("%T: %v", m, err)
		}
		if from != a.Public() || !reflect.DeepEqual(got, m) {
			t.Fatalf("opened %#v from %s, want %#v from A", got, from.ShortString(), m)
		}
		if s, _ := Sender(pkt); s != a.Public() {
			t.Fatal("Sender disagrees with Open")
		}
	}
}

func TestOpenRejects(t *testing.T) {
	a, b, c := netmap.NewDiscoPrivate(), netmap.NewDiscoPrivate(), netmap.NewDiscoPrivate()
	pkt := Seal(a, b.Public(), Pong{TxID: NewTxID(), Src: netip.MustParseAddrPort("192.0.2.1:5")})
	flip := func(i int) []byte {
		p := append([]byte(nil), pkt...)
		p[i] ^= 0x01
		return p
	}
	lowOrder := append([]byte(nil), pkt...)
	copy(lowOrder[len(Magic):], make([]byte, keyLen))
	tests := []struct {
		name string
		pkt  []byte
		priv netmap.DiscoPrivate
		want string
	}{
		{"wrong receiver", pkt, c, "does not authenticate"},
		{"magic altered", flip(0), b, "not a disco packet"},
		{"sender key altered", flip(len(Magic) + 3), b, "does not authenticate"},
		{"nonce altered", flip(len(Magic) + keyLen + 1), b, "does not authenticate"},
		{"ciphertext altered", flip(len(pkt) - 1), b, "does not authenticate"},
		{"truncated", pkt[:len(pkt)-1], b, "does not authenticate"},
		{"header only", pkt[:headerLen], b, "not a disco packet"},
		{"low-order sender", lowOrder, b, "not a valid Curve25519"},
		{"non-canonical sender", func() []byte { p := append([]byte(nil), pkt...); p[len(Magic)+keyLen-1] ^= 0x80; return p }(), b, "not a valid Curve25519"},
		{"oversized", append(append([]byte(nil), pkt...), make([]byte, MaxPacketLen)...), b, "exceeds"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, m, err := Open(tt.priv, tt.pkt)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %#v, %v; want error mentioning %q", m, err, tt.want)
			}
		})
	}
}

func TestParseStrict(t *testing.T) {
	key := netmap.NewNodePrivate().Public()
	ping := Marshal(Ping{TxID: NewTxID(), NodeKey: key})
	pong := Marshal(Pong{TxID: NewTxID(), Src: netip.MustParseAddrPort("192.0.2.1:5")})
	cmm := Marshal(CallMeMaybe{Endpoints: []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:5")}})
	with := func(b []byte, i int, v byte) []byte { b = append([]byte(nil), b...); b[i] = v; return b }
	tooMany := []byte{typeCallMeMaybe, version}
	for range MaxEndpoints + 1 {
		tooMany = appendEndpoint(tooMany, netip.MustParseAddrPort("192.0.2.1:5"))
	}
	tests := []struct {
		name string
		b    []byte
		want string
	}{
		{"empty", nil, "too short"},
		{"unknown type", with(ping, 0, 0x7f), "unknown message type"},
		{"future version", with(ping, 1, 1), "unsupported version"},
		{"short ping", ping[:20], "ping of"},
		{"ping zero node key", Marshal(Ping{TxID: NewTxID()}), "without node key"},
		{"ping nonzero padding", append(append([]byte(nil), ping...), 0, 1), "padding"},
		{"long pong", append(append([]byte(nil), pong...), 0), "pong of"},
		{"pong port zero", pong[: len(pong)-2 : len(pong)-2], "pong of"},
		{"pong unspecified src", Marshal(Pong{Src: netip.AddrPortFrom(netip.IPv4Unspecified(), 9)}), "invalid endpoint"},
		{"pong zero port", Marshal(Pong{Src: netip.MustParseAddrPort("192.0.2.1:0")}), "invalid endpoint"},
		{"call-me-maybe ragged", cmm[:len(cmm)-1], "multiple of"},
		{"call-me-maybe too many", tooMany, "at most"},
		{"call-me-maybe multicast", Marshal(CallMeMaybe{Endpoints: []netip.AddrPort{netip.MustParseAddrPort("224.0.0.1:5")}}), "invalid endpoint"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := Parse(tt.b)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %#v, %v; want error mentioning %q", m, err, tt.want)
			}
		})
	}
}

func FuzzParse(f *testing.F) {
	key := netmap.NewNodePrivate().Public()
	f.Add(Marshal(Ping{TxID: NewTxID(), NodeKey: key, Padding: 3}))
	f.Add(Marshal(Pong{TxID: NewTxID(), Src: netip.MustParseAddrPort("[2001:db8::1]:41641")}))
	f.Add(Marshal(CallMeMaybe{Endpoints: []netip.AddrPort{netip.MustParseAddrPort("10.1.2.3:4")}}))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := Parse(b)
		if err != nil {
			return
		}
		// Whatever parses re-encodes to the same bytes: nothing is
		// silently dropped or normalised.
		if got := Marshal(m); string(got) != string(b) {
			t.Fatalf("re-encoding %#v: %x, input %x", m, got, b)
		}
	})
}

// Fixed keys, so committed seed packets still open on later runs.
var fuzzA, fuzzB = netmap.DiscoPrivate{1, 2, 3}, netmap.DiscoPrivate{4, 5, 6}

func FuzzOpen(f *testing.F) {
	a, b := fuzzA, fuzzB
	f.Add(Seal(a, b.Public(), Ping{TxID: NewTxID(), NodeKey: netmap.NewNodePrivate().Public()}))
	f.Add([]byte(Magic + "short"))
	f.Fuzz(func(t *testing.T, pkt []byte) {
		from, m, err := Open(b, pkt)
		if err != nil {
			return
		}
		if from != a.Public() {
			// Only A's key seals to B in this corpus; anything else
			// authenticating would be a forgery.
			t.Fatalf("forged packet from %s opened as %#v", from.ShortString(), m)
		}
	})
}

// TestPaddedPingSize: a ping padded with PaddingFor(n) seals to exactly n
// bytes, for the probe sizes the bind uses (1280- and 1420-byte overlay
// packets, the jumbo 8920, and the largest a datagram carries), opens to the
// same ping, and an unpadded (old-format) ping still opens.
func TestPaddedPingSize(t *testing.T) {
	a, b := netmap.NewDiscoPrivate(), netmap.NewDiscoPrivate()
	node := netmap.NewNodePrivate().Public()
	for _, n := range []int{0, PingLen - 1, PingLen, PingLen + 1, 1280 + 32, 1420 + 32, 8920 + 32, MaxPacketLen} {
		m := Ping{TxID: NewTxID(), NodeKey: node, Padding: PaddingFor(n)}
		pkt := Seal(a, b.Public(), m)
		if want := max(n, PingLen); len(pkt) != want {
			t.Errorf("PaddingFor(%d): sealed ping of %d bytes, want %d", n, len(pkt), want)
		}
		_, got, err := Open(b, pkt)
		if err != nil {
			t.Fatalf("%d-byte ping: %v", len(pkt), err)
		}
		if got != m {
			t.Errorf("%d-byte ping opened as %+v, want %+v", len(pkt), got, m)
		}
	}
	// A ping one byte over the limit is refused before any cryptography.
	over := Seal(a, b.Public(), Ping{TxID: NewTxID(), NodeKey: node, Padding: PaddingFor(MaxPacketLen + 1)})
	if _, _, err := Open(b, over); err == nil || !strings.Contains(err.Error(), "exceeds") {
		t.Errorf("%d-byte ping: %v, want an error saying it exceeds the limit", len(over), err)
	}
}
