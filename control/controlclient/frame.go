package controlclient

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"

	"meshd.dev/meshd/netmap"
)

// The map stream is a sequence of frames: a 4-byte big-endian length, then
// that many bytes of JSON MapResponse. Length-prefixing (rather than
// newline-delimited JSON) lets the reader refuse an oversized message before
// buffering it.

// FrameHeaderLen is the size of the length prefix of a map stream frame.
const FrameHeaderLen = 4

// MarshalResponse returns resp's JSON: what json.Marshal returns, except
// that the packet filter, the bulk of most responses, comes last and is
// written by netmap.AppendFilterJSON (4x faster than encoding/json, no
// allocation per address). The epoch and version stay the first fields.
func MarshalResponse(resp *netmap.MapResponse) ([]byte, error) {
	return appendResponse(nil, resp, nil)
}

func appendResponse(b []byte, resp *netmap.MapResponse, e *netmap.FilterEncoder) ([]byte, error) {
	if resp.PacketFilter == nil {
		body, err := json.Marshal(resp)
		if err != nil {
			return nil, fmt.Errorf("encode map response: %w", err)
		}
		return append(b, body...), nil
	}
	r := *resp
	r.PacketFilter = nil
	head, err := json.Marshal(&r)
	if err != nil {
		return nil, fmt.Errorf("encode map response: %w", err)
	}
	// head is an object with at least the epoch: never "{}".
	b = append(b, head[:len(head)-1]...)
	b = append(b, `,"packet_filter":`...)
	if b, err = e.Append(b, *resp.PacketFilter); err != nil {
		return nil, fmt.Errorf("encode map response: packet filter: %w", err)
	}
	return append(b, '}'), nil
}

// EncodeFrame returns resp as one map stream frame.
func EncodeFrame(resp *netmap.MapResponse) ([]byte, error) {
	var f FrameEncoder
	return f.Encode(resp)
}

// FrameEncoder encodes map stream frames for a coordinator: filters are
// written by a netmap.FilterEncoder, which formats a source list shared by
// many nodes' filters once, and frames are built in reused buffers and
// copied once to their size, since they stay queued to slow sessions. The
// zero value is ready; it is safe for concurrent use.
type FrameEncoder struct {
	filters netmap.FilterEncoder
	scratch sync.Pool // *[]byte
}

// maxScratch is the largest buffer kept for reuse: a rare huge full map
// must not pin its buffer.
const maxScratch = 256 << 10

// Marshal is MarshalResponse with f's filter encoder.
func (f *FrameEncoder) Marshal(resp *netmap.MapResponse) ([]byte, error) {
	return appendResponse(nil, resp, &f.filters)
}

// Encode is EncodeFrame with f's filter encoder and buffers.
func (f *FrameEncoder) Encode(resp *netmap.MapResponse) ([]byte, error) {
	bp, _ := f.scratch.Get().(*[]byte)
	if bp == nil {
		bp = new([]byte)
	}
	defer func() {
		if cap(*bp) <= maxScratch {
			f.scratch.Put(bp)
		}
	}()
	b, err := appendResponse(append((*bp)[:0], 0, 0, 0, 0), resp, &f.filters)
	if err != nil {
		return nil, err
	}
	*bp = b
	body := len(b) - FrameHeaderLen
	if body > netmap.MaxMessageSize {
		return nil, fmt.Errorf("map response of %d bytes exceeds the %d byte limit", body, netmap.MaxMessageSize)
	}
	binary.BigEndian.PutUint32(b, uint32(body))
	return bytes.Clone(b), nil
}

// errFrameTooLarge is returned for a frame whose header announces more than
// netmap.MaxMessageSize bytes.
var errFrameTooLarge = errors.New("map frame exceeds the size limit")

// ReadFrame reads one frame body from r, reusing buf when it is large enough.
func ReadFrame(r io.Reader, buf []byte) ([]byte, error) {
	var hdr [FrameHeaderLen]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err // io.EOF at a frame boundary is a clean end
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n > netmap.MaxMessageSize {
		return nil, fmt.Errorf("%w: %d bytes announced, limit %d", errFrameTooLarge, n, netmap.MaxMessageSize)
	}
	if n == 0 {
		return nil, errors.New("map frame: empty body")
	}
	if cap(buf) < int(n) {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if _, err := io.ReadFull(r, buf); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("map frame body: %w", err)
	}
	return buf, nil
}

// ReadMapResponse reads and validates one map stream message.
func ReadMapResponse(r io.Reader, buf []byte) (*netmap.MapResponse, []byte, error) {
	body, err := ReadFrame(r, buf)
	if err != nil {
		return nil, buf, err
	}
	resp, err := netmap.DecodeMapResponse(body)
	return resp, body, err
}

// KeepAliveHeader tells the client the map stream's keep-alive interval in
// milliseconds, so it can detect a dead stream.
const KeepAliveHeader = "Meshd-Keep-Alive-Ms"
