// Package sshrec is SSH session recording: the stream an SSH node sends
// to a recorder node over the tailnet, and the recorder (`meshd recorder
// --dir DIR`) that writes each stream to an asciinema v2 cast file as it
// arrives (docs/ssh.md).
//
// The stream is the cast itself: a header line (a JSON object, asciinema
// v2 with a "meshd" member saying who, where and as whom), then one event
// per line ([seconds, "o"|"i"|"r"|"m", "data"]). The recorder checks every
// line before writing it and adds who sent the stream, from whois.
package sshrec

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"time"

	"meshd.dev/meshd/netmap"
)

// MaxLine bounds one line of the stream.
const MaxLine = 1 << 20

// Header is the first line of a cast.
type Header struct {
	Version   int               `json:"version"`
	Width     int               `json:"width"`
	Height    int               `json:"height"`
	Timestamp int64             `json:"timestamp"`
	Env       map[string]string `json:"env,omitempty"`
	Title     string            `json:"title,omitempty"`
	Meshd     Session           `json:"meshd"`
}

// Session says what a recording is of.
type Session struct {
	Caller     netmap.SSHCaller `json:"caller"`
	CallerAddr string           `json:"caller_addr"`
	Node       string           `json:"node"`
	LocalUser  string           `json:"local_user"`
	Kind       string           `json:"kind"` // shell, exec
	Command    string           `json:"command,omitempty"`
	Start      time.Time        `json:"start"`
	// Sender is the node that sent the stream, as the recorder's whois
	// knows it; set by the recorder, whatever the sender wrote.
	Sender *netmap.SSHCaller `json:"sender,omitempty"`
}

// ParseHeader checks a header line.
func ParseHeader(line []byte) (*Header, error) {
	if len(line) > MaxLine {
		return nil, errors.New("header line too long")
	}
	var h Header
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&h); err != nil {
		return nil, fmt.Errorf("header: %w", err)
	}
	if dec.More() {
		return nil, errors.New("header: trailing data")
	}
	if h.Version != 2 {
		return nil, fmt.Errorf("header: version %d, want 2", h.Version)
	}
	if h.Width < 0 || h.Height < 0 || h.Width > 10000 || h.Height > 10000 {
		return nil, fmt.Errorf("header: terminal size %dx%d", h.Width, h.Height)
	}
	return &h, nil
}

// Event is one event line.
type Event struct {
	Time float64
	Type string
	Data string
}

// ParseEvent checks an event line.
func ParseEvent(line []byte) (Event, error) {
	var ev Event
	if len(line) > MaxLine {
		return ev, errors.New("event line too long")
	}
	var raw []json.RawMessage
	if err := json.Unmarshal(line, &raw); err != nil {
		return ev, fmt.Errorf("event: %w", err)
	}
	if len(raw) != 3 {
		return ev, fmt.Errorf("event: %d elements, want 3", len(raw))
	}
	if err := json.Unmarshal(raw[0], &ev.Time); err != nil || ev.Time < 0 || math.IsInf(ev.Time, 0) {
		return ev, errors.New("event: time is not a non-negative number")
	}
	if err := json.Unmarshal(raw[1], &ev.Type); err != nil {
		return ev, errors.New("event: type is not a string")
	}
	switch ev.Type {
	case "o", "i", "r", "m":
	default:
		return ev, fmt.Errorf("event: type %q, want o, i, r or m", ev.Type)
	}
	if err := json.Unmarshal(raw[2], &ev.Data); err != nil {
		return ev, errors.New("event: data is not a string")
	}
	return ev, nil
}

// AppendEvent appends ev's line (with its newline) to dst.
func AppendEvent(dst []byte, ev Event) []byte {
	dst = append(dst, '[')
	dst = fmt.Appendf(dst, "%.6f", ev.Time)
	dst = append(dst, ',')
	t, _ := json.Marshal(ev.Type)
	dst = append(dst, t...)
	dst = append(dst, ',')
	d, _ := json.Marshal(ev.Data) // invalid UTF-8 becomes U+FFFD
	dst = append(dst, d...)
	return append(dst, ']', '\n')
}
