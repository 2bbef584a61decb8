// Package logring keeps the daemon's recent log lines in memory, bounded,
// for `meshd bugreport`, with secrets (auth keys, admin and relay tokens,
// private keys) masked before they are stored.
package logring

import (
	"bytes"
	"log/slog"
	"regexp"
	"sync"
)

// Defaults for New.
const (
	DefaultLines = 2000
	DefaultBytes = 1 << 20
)

// Ring holds the last lines written to it, within a count and a byte
// budget. It is an io.Writer for a slog.TextHandler (which writes each
// record in one call); safe for concurrent use.
type Ring struct {
	mu       sync.Mutex
	lines    []string // oldest first; re-sliced from the front as lines go
	bytes    int
	maxLines int
	maxBytes int
	dropped  uint64
}

// New returns a Ring of at most maxLines lines and maxBytes bytes (the
// defaults for values <= 0).
func New(maxLines, maxBytes int) *Ring {
	if maxLines <= 0 {
		maxLines = DefaultLines
	}
	if maxBytes <= 0 {
		maxBytes = DefaultBytes
	}
	return &Ring{maxLines: maxLines, maxBytes: maxBytes}
}

// secret matches what must never be kept: auth keys, admin and relay
// tokens, the text forms of private keys, WireGuard UAPI private keys and
// PEM private key blocks.
var secret = regexp.MustCompile(`(?:mskey|msadm|msrly)-[^\s"',;]+|(?:privkey|discopriv):[0-9a-fA-F]+|private_key=[0-9a-fA-F]+|-----BEGIN[A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END[A-Z ]*PRIVATE KEY-----|$)`)

// Redact masks every secret in b.
func Redact(b []byte) []byte {
	return secret.ReplaceAllFunc(b, func(m []byte) []byte {
		for _, p := range [][]byte{[]byte("mskey-"), []byte("msadm-"), []byte("msrly-"), []byte("privkey:"), []byte("discopriv:"), []byte("private_key=")} {
			if bytes.HasPrefix(m, p) {
				return append(append([]byte{}, p...), "[REDACTED]"...)
			}
		}
		return []byte("[REDACTED PRIVATE KEY]")
	})
}

// Write stores p, one or more lines, with secrets masked, evicting the
// oldest lines beyond the budgets.
func (r *Ring) Write(p []byte) (int, error) {
	n := len(p)
	p = Redact(p)
	r.mu.Lock()
	defer r.mu.Unlock()
	for line := range bytes.Lines(p) {
		s := string(bytes.TrimRight(line, "\n"))
		if len(s) > r.maxBytes {
			s = s[:r.maxBytes]
		}
		r.add(s)
	}
	return n, nil
}

func (r *Ring) add(s string) {
	// append moves the live lines to a new array when the old one is used
	// up, so the memory held stays within about twice the budget.
	r.lines = append(r.lines, s)
	r.bytes += len(s)
	for len(r.lines) > r.maxLines || r.bytes > r.maxBytes {
		r.bytes -= len(r.lines[0])
		r.lines[0] = ""
		r.lines = r.lines[1:]
		r.dropped++
	}
}

// Lines returns the stored lines, oldest first, and how many older lines
// were dropped.
func (r *Ring) Lines() (lines []string, dropped uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.lines...), r.dropped
}

// Handler returns a slog.Handler that writes to next and keeps a text copy
// of every record next takes in r.
func Handler(next slog.Handler, r *Ring, level slog.Leveler) slog.Handler {
	return slog.NewMultiHandler(next, slog.NewTextHandler(r, &slog.HandlerOptions{Level: level}))
}
