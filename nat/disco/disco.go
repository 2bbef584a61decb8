// Package disco encodes the path discovery messages nodes exchange, on the
// WireGuard UDP socket and through DERP, to find and keep a direct path:
// ping, pong (which reports the source address the pinger was seen from)
// and call-me-maybe (asking the peer to ping back at once, so both NATs open
// at the same moment).
//
// A packet is Magic | sender disco public key (32) | nonce (24) | nacl box
// of (type | version | body), sealed from the sender's disco private key to
// the receiver's disco public key. The magic prefix is what tells disco
// apart from WireGuard (whose packets start with a little-endian type 1-4
// and three zero bytes) and STUN on a shared socket.
package disco

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"golang.org/x/crypto/curve25519"
	"golang.org/x/crypto/nacl/box"

	"meshd.dev/meshd/netmap"
)

// Magic starts every disco packet: "MD" and U+1F4AC SPEECH BALLOON.
const Magic = "MD\xf0\x9f\x92\xac"

const (
	keyLen    = 32
	nonceLen  = 24
	headerLen = len(Magic) + keyLen + nonceLen
	// epLen is an endpoint on the wire: 16-byte IPv6 (IPv4 mapped) + port.
	epLen = 16 + 2
	// version is written in every message; parsers accept only it, so a
	// future incompatible change is rejected instead of misread.
	version = 0
)

// MaxEndpoints bounds a call-me-maybe's endpoint list.
const MaxEndpoints = 64

// MaxPacketLen is the largest disco packet accepted: the largest UDP
// payload an IPv6 datagram without jumbogram options carries. Pings are
// padded up to the size of the largest WireGuard packet the overlay MTU
// produces (overlay MTU + 32) to probe the path MTU, and overlay MTUs go up
// to 65535 on loopback-like underlays.
const MaxPacketLen = 65535 - 8

// PingLen is the length of a sealed Ping without padding: the smallest
// datagram a path MTU probe can be.
const PingLen = headerLen + box.Overhead + 2 + len(TxID{}) + keyLen

// PaddingFor returns the Ping.Padding that makes the sealed ping exactly n
// bytes long, the UDP payload size being probed; 0 when n is at most
// PingLen.
func PaddingFor(n int) int { return max(n-PingLen, 0) }

// Message types (wire values).
const (
	typePing        byte = 0x01
	typePong        byte = 0x02
	typeCallMeMaybe byte = 0x03
)

// TxID identifies a ping; its pong echoes it.
type TxID [12]byte

// NewTxID returns a random transaction ID.
func NewTxID() TxID {
	var t TxID
	rand.Read(t[:])
	return t
}

// Message is a Ping, Pong or CallMeMaybe.
type Message interface {
	appendBody(b []byte) []byte
	msgType() byte
}

// Ping asks the receiver for a Pong. NodeKey is the sender's WireGuard key,
// so a ping arriving from an address not yet tied to a peer can be.
type Ping struct {
	TxID    TxID
	NodeKey netmap.NodePublic
	// Padding adds zero bytes inside the sealed box, so the datagram is
	// exactly the size a path MTU probe tests (see PaddingFor) and a
	// middlebox cannot strip it. Old pings have none; the receiver
	// answers padded and unpadded pings alike, with a small Pong.
	Padding int
}

// Pong answers a Ping. Src is the address the ping came from as the
// responder saw it: the pinger's public ip:port for that path.
type Pong struct {
	TxID TxID
	Src  netip.AddrPort
}

// CallMeMaybe, sent through DERP, lists the sender's endpoints and asks the
// receiver to ping them now; the sender pings the receiver's endpoints at
// the same time, which opens both NATs (simultaneous open).
type CallMeMaybe struct {
	Endpoints []netip.AddrPort
}

func (Ping) msgType() byte        { return typePing }
func (Pong) msgType() byte        { return typePong }
func (CallMeMaybe) msgType() byte { return typeCallMeMaybe }

func (m Ping) appendBody(b []byte) []byte {
	b = append(b, m.TxID[:]...)
	b = append(b, m.NodeKey[:]...)
	return append(b, make([]byte, max(m.Padding, 0))...)
}

func (m Pong) appendBody(b []byte) []byte {
	b = append(b, m.TxID[:]...)
	return appendEndpoint(b, m.Src)
}

func (m CallMeMaybe) appendBody(b []byte) []byte {
	for _, ep := range m.Endpoints {
		b = appendEndpoint(b, ep)
	}
	return b
}

func appendEndpoint(b []byte, ep netip.AddrPort) []byte {
	a := ep.Addr().As16()
	b = append(b, a[:]...)
	return binary.BigEndian.AppendUint16(b, ep.Port())
}

func parseEndpoint(b []byte) (netip.AddrPort, error) {
	ep := netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[:16])).Unmap(), binary.BigEndian.Uint16(b[16:]))
	if ep.Port() == 0 || ep.Addr().IsUnspecified() || ep.Addr().IsMulticast() {
		return ep, fmt.Errorf("disco: invalid endpoint %v", ep)
	}
	return ep, nil
}

// Marshal returns the plaintext form of m (type | version | body).
func Marshal(m Message) []byte {
	return m.appendBody([]byte{m.msgType(), version})
}

// Parse decodes a plaintext message. It is strict: unknown types or
// versions, wrong lengths and invalid endpoints are errors.
func Parse(b []byte) (Message, error) {
	if len(b) < 2 {
		return nil, errors.New("disco: message too short")
	}
	t, v, body := b[0], b[1], b[2:]
	if v != version {
		return nil, fmt.Errorf("disco: unsupported version %d", v)
	}
	switch t {
	case typePing:
		if len(body) < len(TxID{})+keyLen {
			return nil, fmt.Errorf("disco: ping of %d bytes", len(body))
		}
		var m Ping
		copy(m.TxID[:], body)
		copy(m.NodeKey[:], body[len(TxID{}):])
		m.Padding = len(body) - len(TxID{}) - keyLen
		if m.NodeKey.IsZero() {
			return nil, errors.New("disco: ping without node key")
		}
		for _, c := range body[len(TxID{})+keyLen:] {
			if c != 0 {
				return nil, errors.New("disco: ping padding is not zero")
			}
		}
		return m, nil
	case typePong:
		if len(body) != len(TxID{})+epLen {
			return nil, fmt.Errorf("disco: pong of %d bytes", len(body))
		}
		var m Pong
		copy(m.TxID[:], body)
		src, err := parseEndpoint(body[len(TxID{}):])
		if err != nil {
			return nil, err
		}
		m.Src = src
		return m, nil
	case typeCallMeMaybe:
		if len(body)%epLen != 0 || len(body)/epLen > MaxEndpoints {
			return nil, fmt.Errorf("disco: call-me-maybe of %d bytes (want a multiple of %d, at most %d endpoints)", len(body), epLen, MaxEndpoints)
		}
		m := CallMeMaybe{Endpoints: make([]netip.AddrPort, 0, len(body)/epLen)}
		for i := 0; i < len(body); i += epLen {
			ep, err := parseEndpoint(body[i : i+epLen])
			if err != nil {
				return nil, err
			}
			m.Endpoints = append(m.Endpoints, ep)
		}
		return m, nil
	}
	return nil, fmt.Errorf("disco: unknown message type 0x%02x", t)
}

// Looks reports whether pkt starts with the disco magic and is long enough
// to be a sealed message. It does no cryptography.
func Looks(pkt []byte) bool {
	return len(pkt) >= headerLen+box.Overhead+2 && string(pkt[:len(Magic)]) == Magic
}

// Sender returns the disco key a packet claims to be from, so the receiver
// can find the peer before opening it. The claim is only proven by Open.
func Sender(pkt []byte) (netmap.DiscoPublic, error) {
	if !Looks(pkt) {
		return netmap.DiscoPublic{}, errors.New("disco: not a disco packet")
	}
	return netmap.DiscoPublic(pkt[len(Magic) : len(Magic)+keyLen]), nil
}

// Seal encrypts m from priv to the peer's disco key.
func Seal(priv netmap.DiscoPrivate, to netmap.DiscoPublic, m Message) []byte {
	var nonce [nonceLen]byte
	rand.Read(nonce[:])
	pub := priv.Public()
	plain := Marshal(m)
	out := make([]byte, 0, headerLen+box.Overhead+len(plain))
	out = append(out, Magic...)
	out = append(out, pub[:]...)
	out = append(out, nonce[:]...)
	return box.Seal(out, plain, &nonce, (*[32]byte)(&to), (*[32]byte)(&priv))
}

// Open authenticates and decrypts a disco packet addressed to priv and
// returns its sender and message. Tampered, truncated, misaddressed and
// malformed packets are errors.
func Open(priv netmap.DiscoPrivate, pkt []byte) (netmap.DiscoPublic, Message, error) {
	if len(pkt) > MaxPacketLen {
		return netmap.DiscoPublic{}, nil, fmt.Errorf("disco: %d-byte packet exceeds %d", len(pkt), MaxPacketLen)
	}
	from, err := Sender(pkt)
	if err != nil {
		return from, nil, err
	}
	// Low-order keys give an all-zero shared secret anyone could seal with;
	// non-canonical encodings (top bit set, or >= 2^255-19) would let one
	// key appear under several byte strings.
	if _, err := curve25519.X25519(priv[:], from[:]); err != nil || !from.IsCanonical() {
		return from, nil, errors.New("disco: sender key is not a valid Curve25519 public key")
	}
	var nonce [nonceLen]byte
	copy(nonce[:], pkt[len(Magic)+keyLen:])
	plain, ok := box.Open(nil, pkt[headerLen:], &nonce, (*[32]byte)(&from), (*[32]byte)(&priv))
	if !ok {
		return from, nil, fmt.Errorf("disco: packet claiming to be from %s does not authenticate", from.ShortString())
	}
	m, err := Parse(plain)
	return from, m, err
}
