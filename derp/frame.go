// Package derp implements meshd's relay: a server that forwards packets
// between nodes addressed by their WireGuard public key over one TCP (TLS)
// connection per node, the client that talks to it, and the mesh that joins
// the servers of one region.
//
// Wire format: after an HTTP upgrade on /derp, both sides exchange frames of
// a 1-byte type, a 4-byte big-endian payload length and the payload. Every
// frame type has a hard maximum size; a peer that exceeds it is disconnected,
// because a length we refuse to read leaves the stream unsynchronised.
package derp

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"meshd.dev/meshd/netmap"
)

// ProtocolVersion is the relay protocol version this build speaks.
const ProtocolVersion = 1

// MaxPacketSize is the largest packet a client may relay. It covers a
// WireGuard packet on a 9000-byte jumbo underlay with room to spare, and
// anything up to a 64 KiB GSO-sized datagram.
const MaxPacketSize = 64 << 10

// magic starts the server's first frame so a client talking to something
// that is not a meshd relay fails with a clear error instead of garbage.
const magic = "MESHDERP"

const (
	frameHeaderLen = 1 + 4
	keyLen         = 32
	nonceLen       = 24
	pingLen        = 8

	// maxClientInfoLen bounds the sealed JSON a client sends in its
	// handshake; it only holds a version and an optional mesh key.
	maxClientInfoLen = 1 << 10
	// maxInfoLen bounds JSON-bearing server frames (server info, health).
	maxInfoLen = 1 << 10
	// maxFrameLen is the largest frame of any type (a forwarded packet).
	maxFrameLen = 2*keyLen + MaxPacketSize
)

// frameType identifies a frame. Values are part of the wire protocol.
type frameType byte

const (
	// frameServerKey: magic(8) | server public key(32) | challenge nonce(24).
	frameServerKey frameType = 0x01
	// frameClientInfo: client node public key(32) | nacl box of clientInfo
	// JSON, sealed from the client's node private key to the server key with
	// the challenge nonce. Opening it proves the client holds its node key,
	// and the per-connection nonce stops replays.
	frameClientInfo frameType = 0x02
	// frameServerInfo: serverInfo JSON, sent once the client is accepted.
	frameServerInfo frameType = 0x03
	// frameSendPacket (client->server): dst key(32) | packet.
	frameSendPacket frameType = 0x04
	// frameRecvPacket (server->client): src key(32) | packet.
	frameRecvPacket frameType = 0x05
	// frameKeepAlive: empty; either side, keeps NAT and proxy state alive.
	frameKeepAlive frameType = 0x06
	// framePeerGone (server->client): key(32) | reason(1).
	framePeerGone frameType = 0x07
	// framePeerPresent (server->mesh peer): key(32).
	framePeerPresent frameType = 0x08
	// frameWatchConns (mesh peer->server): empty; subscribe to presence.
	frameWatchConns frameType = 0x09
	// frameForwardPacket (mesh peer->server): src(32) | dst(32) | packet.
	frameForwardPacket frameType = 0x0a
	// framePing: 8 opaque bytes the receiver echoes in a framePong.
	framePing frameType = 0x0b
	// framePong: the 8 bytes of the ping it answers.
	framePong frameType = 0x0c
	// frameHealth (server->client): UTF-8 problem text; empty means healthy.
	// Also sent just before the server closes a connection it rejects.
	frameHealth frameType = 0x0d
)

// maxLen is the largest payload accepted for each frame type. Unknown types
// are allowed up to maxInfoLen and skipped, so newer peers can add frames.
func (t frameType) maxLen() uint32 {
	switch t {
	case frameServerKey:
		return uint32(len(magic) + keyLen + nonceLen)
	case frameClientInfo:
		return keyLen + maxClientInfoLen
	case frameServerInfo, frameHealth:
		return maxInfoLen
	case frameSendPacket, frameRecvPacket:
		return keyLen + MaxPacketSize
	case frameForwardPacket:
		return maxFrameLen
	case frameKeepAlive, frameWatchConns:
		return 0
	case framePeerGone:
		return keyLen + 1
	case framePeerPresent:
		return keyLen
	case framePing, framePong:
		return pingLen
	default:
		return maxInfoLen
	}
}

// ErrFrameTooLarge is returned when a peer announces a frame longer than its
// type allows.
var ErrFrameTooLarge = errors.New("derp: frame too large")

// PeerGoneReason says why a framePeerGone was sent.
type PeerGoneReason byte

const (
	// PeerGoneDisconnected: the peer was connected and went away.
	PeerGoneDisconnected PeerGoneReason = 0
	// PeerGoneNotHere: a packet was sent to a key that is not connected to
	// this server (nor, in a region mesh, to any of its peers).
	PeerGoneNotHere PeerGoneReason = 1
)

func (r PeerGoneReason) String() string {
	switch r {
	case PeerGoneDisconnected:
		return "disconnected"
	case PeerGoneNotHere:
		return "not here"
	default:
		return fmt.Sprintf("reason(%d)", byte(r))
	}
}

// writeFrameHeader writes a header; the caller writes exactly n payload bytes.
func writeFrameHeader(bw *bufio.Writer, t frameType, n int) error {
	var h [frameHeaderLen]byte
	h[0] = byte(t)
	binary.BigEndian.PutUint32(h[1:], uint32(n))
	_, err := bw.Write(h[:])
	return err
}

// writeFrame writes one frame whose payload is the concatenation of parts.
func writeFrame(bw *bufio.Writer, t frameType, parts ...[]byte) error {
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	if err := writeFrameHeader(bw, t, n); err != nil {
		return err
	}
	for _, p := range parts {
		if _, err := bw.Write(p); err != nil {
			return err
		}
	}
	return nil
}

// appendFrame appends one frame whose payload is the concatenation of parts.
func appendFrame(b []byte, t frameType, parts ...[]byte) []byte {
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	b = append(b, byte(t))
	b = binary.BigEndian.AppendUint32(b, uint32(n))
	for _, p := range parts {
		b = append(b, p...)
	}
	return b
}

// readFrameHeader reads a header and checks the length against the type's
// limit before anything of the payload is read.
func readFrameHeader(br *bufio.Reader) (frameType, uint32, error) {
	var h [frameHeaderLen]byte
	if _, err := io.ReadFull(br, h[:]); err != nil {
		return 0, 0, err
	}
	t := frameType(h[0])
	n := binary.BigEndian.Uint32(h[1:])
	if n > t.maxLen() {
		return t, n, fmt.Errorf("%w: type 0x%02x announces %d bytes, limit %d", ErrFrameTooLarge, byte(t), n, t.maxLen())
	}
	return t, n, nil
}

// readFrame reads a whole frame into buf (grown as needed, up to the type's
// limit) and returns the payload, which aliases buf.
func readFrame(br *bufio.Reader, buf []byte) (frameType, []byte, error) {
	t, n, err := readFrameHeader(br)
	if err != nil {
		return t, nil, err
	}
	if uint32(cap(buf)) < n {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if _, err := io.ReadFull(br, buf); err != nil {
		return t, nil, fmt.Errorf("derp: short frame type 0x%02x: %w", byte(t), err)
	}
	return t, buf, nil
}

func keyFrom(b []byte) netmap.NodePublic {
	var k netmap.NodePublic
	copy(k[:], b)
	return k
}
