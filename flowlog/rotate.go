package flowlog

import (
	"fmt"
	"os"
	"sync"
)

// DefaultMaxSize and DefaultKeep are a RotatingFile's defaults: 10 MiB
// files, five of them besides the current one.
const (
	DefaultMaxSize = 10 << 20
	DefaultKeep    = 5
)

// RotatingFile is an io.Writer appending to a file that is rotated by
// size: when a write would take it past MaxSize, FILE becomes FILE.1,
// FILE.1 becomes FILE.2 and so on, and FILE.Keep is deleted. A single
// write larger than MaxSize goes whole into a fresh file. Files are 0600:
// flow logs say who talked to whom.
type RotatingFile struct {
	path    string
	maxSize int64
	keep    int

	mu   sync.Mutex
	f    *os.File
	size int64
}

// OpenRotating opens (appending to) path. maxSize <= 0 and keep < 0 take
// the defaults; keep 0 keeps no old files.
func OpenRotating(path string, maxSize int64, keep int) (*RotatingFile, error) {
	if maxSize <= 0 {
		maxSize = DefaultMaxSize
	}
	if keep < 0 {
		keep = DefaultKeep
	}
	r := &RotatingFile{path: path, maxSize: maxSize, keep: keep}
	if err := r.open(); err != nil {
		return nil, err
	}
	return r, nil
}

func (r *RotatingFile) open() error {
	f, err := os.OpenFile(r.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("flow log: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return fmt.Errorf("flow log: %w", err)
	}
	r.f, r.size = f, st.Size()
	return nil
}

// Write appends b, rotating first if b would not fit.
func (r *RotatingFile) Write(b []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.f == nil {
		return 0, os.ErrClosed
	}
	if r.size > 0 && r.size+int64(len(b)) > r.maxSize {
		if err := r.rotate(); err != nil {
			return 0, err
		}
	}
	n, err := r.f.Write(b)
	r.size += int64(n)
	return n, err
}

func (r *RotatingFile) rotate() error {
	if err := r.f.Close(); err != nil {
		return fmt.Errorf("flow log: close for rotation: %w", err)
	}
	r.f = nil
	name := func(i int) string {
		if i == 0 {
			return r.path
		}
		return fmt.Sprintf("%s.%d", r.path, i)
	}
	if r.keep == 0 {
		if err := os.Remove(r.path); err != nil && !os.IsNotExist(err) {
			return fmt.Errorf("flow log: rotate: %w", err)
		}
	}
	for i := r.keep; i > 0; i-- {
		if err := os.Rename(name(i-1), name(i)); err != nil && !os.IsNotExist(err) {
			return fmt.Errorf("flow log: rotate: %w", err)
		}
	}
	return r.open()
}

// Close closes the current file.
func (r *RotatingFile) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.f == nil {
		return nil
	}
	err := r.f.Close()
	r.f = nil
	return err
}
