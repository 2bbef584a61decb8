package osdns

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"time"

	"meshd.dev/meshd/internal/atomicfile"
)

// What a resolver file path holds.
const (
	kindFile    = "file"
	kindSymlink = "symlink"
	kindAbsent  = "absent"
)

// fileState is what a resolver file path holds at one moment.
type fileState struct {
	Kind string `json:"kind"`
	// Mode is a regular file's permission bits.
	Mode fs.FileMode `json:"mode,omitempty"`
	// Content is a regular file's bytes, or a symlink's target's bytes
	// when it could be read (they give Upstreams; the link is what is
	// restored).
	Content []byte `json:"content,omitempty"`
	// Target is a symlink's target, as written in the link.
	Target string `json:"target,omitempty"`
}

// backup is the record in the state dir that makes the original resolver
// file restorable after a crash. It is written before meshd's file is.
type backup struct {
	// Path is the resolver file this backup is of; a daemon started with
	// another path does not restore it there.
	Path     string    `json:"path"`
	Original fileState `json:"original"`
	// Written are the SHA-256 digests (hex) of the last contents meshd
	// wrote, newest last: the previous one stays until the new one is
	// surely in place, so a crash between recording and writing still
	// finds the file meshd's. A file matching none of them was changed
	// by something else and is never overwritten by a restore.
	Written []string `json:"written"`
}

// fileConfigurator manages a resolver file.
type fileConfigurator struct {
	path       string
	backupFile string
	log        *slog.Logger
	// write replaces the resolver file (writeFile; tests make it fail
	// to stop a Set where a crash could).
	write func(path string, data []byte, perm fs.FileMode) error

	mu        sync.Mutex
	b         *backup // non-nil while meshd's file is (believed to be) in place
	upstreams []netip.AddrPort
}

func newFileConfigurator(opts Options) (*fileConfigurator, error) {
	// A backup left by a daemon that did not stop cleanly is of the
	// host's original: restore it before anything reads the file as the
	// host's (and before a new backup could replace it with meshd's own).
	if err := recoverFile(opts.ResolvConf, opts.BackupFile, opts.Logger); err != nil {
		return nil, err
	}
	c := &fileConfigurator{path: opts.ResolvConf, backupFile: opts.BackupFile, log: opts.Logger, write: writeFile}
	if st, err := readState(c.path); err == nil {
		c.upstreams = withoutOwn(parseResolvConf(st.Content).Nameservers, nil)
	}
	return c, nil
}

func (c *fileConfigurator) String() string { return "resolver file " + c.path }

func (c *fileConfigurator) Upstreams() []netip.AddrPort {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.upstreams)
}

// Set writes meshd's resolver file for cfg. The first Set (and any Set
// that finds the file changed by something else since meshd wrote it)
// records what is there now as the original to restore.
func (c *fileConfigurator) Set(cfg Config) error {
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("DNS configuration: %w", err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	cur, err := readState(c.path)
	if err != nil {
		return err
	}
	prev := c.b
	if prev != nil && !owned(cur, prev.Written) {
		// A DHCP client or an admin replaced meshd's file. Theirs is
		// what the host would use without meshd now: restore that, not
		// the older original.
		c.log.Warn("DNS: the resolver file was replaced since meshd wrote it; its new content becomes the one restored when meshd stops",
			"path", c.path)
		prev = nil
	}
	if prev == nil && cur.Kind == kindFile && bytes.HasPrefix(cur.Content, []byte(header)) {
		c.log.Warn("DNS: the resolver file already holds a file meshd wrote, and there is no backup of the original (state dir replaced?); it will be restored as it is",
			"path", c.path)
	}
	orig := cur
	if prev != nil {
		orig = prev.Original
	}
	hostConf := parseResolvConf(orig.Content)
	data := renderResolvConf(cfg, hostConf)
	sum := digest(data)
	upstreams := withoutOwn(hostConf.Nameservers, cfg.Nameservers)
	if prev != nil && cur.Kind == kindFile && digest(cur.Content) == sum {
		c.upstreams = upstreams
		return nil
	}
	next := &backup{Path: c.path, Original: orig, Written: []string{sum}}
	if prev != nil {
		next.Written = []string{prev.Written[len(prev.Written)-1], sum}
	}
	if err := saveBackup(c.backupFile, next); err != nil {
		return err
	}
	if err := c.write(c.path, data, 0o644); err != nil {
		if prev == nil {
			// The original is still in place: a backup of it would
			// only make the next start report a change that never was.
			os.Remove(c.backupFile)
		}
		return err
	}
	c.b = next
	c.upstreams = upstreams
	return nil
}

// Close restores the original file, unless something else replaced
// meshd's since (that version stays).
func (c *fileConfigurator) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.b == nil {
		return nil
	}
	b := c.b
	c.b = nil
	return restore(b, c.backupFile, c.log)
}

// Recover restores the resolver file from a backup that a daemon which
// did not stop cleanly (killed, crashed, power lost) left in the state
// dir, if the file still holds what meshd wrote; a file something else
// changed since is left alone. Without a backup it does nothing. The
// daemon calls it at start, whatever its mode, before anything else
// looks at the resolver file.
func Recover(opts Options) error {
	if err := opts.setDefaults(); err != nil {
		return err
	}
	return recoverFile(opts.ResolvConf, opts.BackupFile, opts.Logger)
}

func recoverFile(path, backupFile string, log *slog.Logger) error {
	b, err := loadBackup(backupFile, log)
	if err != nil || b == nil {
		return err
	}
	if b.Path != path {
		// The daemon was started with another --resolv-conf. Writing to
		// a path read from the state dir is not what the flag says, so
		// the old file is left to the operator.
		aside := moveAside(backupFile, "other-path")
		log.Warn("DNS: a backup from an earlier run is of another resolver file; not restoring it (restore it by hand if that file is still meshd's)",
			"backup_of", b.Path, "managing", path, "backup_moved_to", aside)
		return nil
	}
	if err := restore(b, backupFile, log); err != nil {
		return fmt.Errorf("restore %s after an unclean stop: %w", path, err)
	}
	log.Info("DNS: restored the resolver file meshd had replaced before it last stopped without cleaning up", "path", path)
	return nil
}

// restore puts b's original back at b.Path and removes the backup, unless
// the file is no longer meshd's: then it stays, and the backup is moved
// aside for the record.
func restore(b *backup, backupFile string, log *slog.Logger) error {
	cur, err := readState(b.Path)
	if err != nil {
		return err
	}
	if !owned(cur, b.Written) {
		aside := moveAside(backupFile, "unused")
		log.Warn("DNS: the resolver file was changed by something else since meshd wrote it; leaving that version in place",
			"path", b.Path, "original_saved_in", aside)
		return nil
	}
	switch b.Original.Kind {
	case kindAbsent:
		err = os.Remove(b.Path)
		if err == nil {
			err = syncDir(filepath.Dir(b.Path))
		}
	case kindSymlink:
		err = replaceWithSymlink(b.Path, b.Original.Target, b.Original.Content)
	case kindFile:
		err = writeFile(b.Path, b.Original.Content, b.Original.Mode.Perm())
	default:
		err = fmt.Errorf("backup of %s: unknown kind %q", b.Path, b.Original.Kind)
	}
	if err != nil {
		return err
	}
	if err := os.Remove(backupFile); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove DNS backup: %w", err)
	}
	return nil
}

// readState reads what path holds without following a symlink at path.
func readState(path string) (fileState, error) {
	fi, err := os.Lstat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fileState{Kind: kindAbsent}, nil
	case err != nil:
		return fileState{}, fmt.Errorf("resolver file: %w", err)
	case fi.Mode()&fs.ModeSymlink != 0:
		target, err := os.Readlink(path)
		if err != nil {
			return fileState{}, fmt.Errorf("resolver file: %w", err)
		}
		// A dangling link (resolved's stub while resolved is stopped)
		// has no content: no upstreams, but the link is still restored.
		content, _ := readBounded(path)
		return fileState{Kind: kindSymlink, Target: target, Content: content}, nil
	case fi.Mode().IsRegular():
		content, err := readBounded(path)
		if err != nil {
			return fileState{}, err
		}
		return fileState{Kind: kindFile, Mode: fi.Mode().Perm(), Content: content}, nil
	}
	return fileState{}, fmt.Errorf("resolver file %s is a %v, not a file or a symlink", path, fi.Mode().Type())
}

func readBounded(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("resolver file: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxResolvConf+1))
	if err != nil {
		return nil, fmt.Errorf("resolver file %s: %w", path, err)
	}
	if len(b) > maxResolvConf {
		return nil, fmt.Errorf("resolver file %s is larger than %d bytes", path, maxResolvConf)
	}
	return b, nil
}

// owned reports whether st is a file with content meshd wrote.
func owned(st fileState, written []string) bool {
	return st.Kind == kindFile && slices.Contains(written, digest(st.Content))
}

func digest(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func loadBackup(path string, log *slog.Logger) (*backup, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("DNS backup: %w", err)
	}
	var b backup
	if err := json.Unmarshal(data, &b); err != nil || b.Path == "" || len(b.Written) == 0 {
		if err == nil {
			err = errors.New("incomplete record")
		}
		// Unreadable: nothing can be restored from it, and it must not
		// block the next backup. Keep it for a human.
		aside := moveAside(path, "corrupt")
		log.Error("DNS: the backup of the resolver file is corrupt; moved it aside, the resolver file is left as it is", "err", err, "moved_to", aside)
		return nil, nil
	}
	return &b, nil
}

func saveBackup(path string, b *backup) error {
	data, err := json.Marshal(b)
	if err != nil {
		return fmt.Errorf("DNS backup: %w", err)
	}
	if err := atomicfile.Write(path, data, 0o600); err != nil {
		return fmt.Errorf("DNS backup: %w", err)
	}
	return nil
}

// moveAside renames path to path.WHY-TIME and returns the new name ("" if
// that failed, in which case the file is removed so it cannot block).
func moveAside(path, why string) string {
	to := fmt.Sprintf("%s.%s-%s", path, why, time.Now().UTC().Format("20060102T150405.000000000"))
	if err := os.Rename(path, to); err != nil {
		os.Remove(path)
		return ""
	}
	return to
}

// writeFile replaces path with data atomically. Where path is a mount
// point (a bind-mounted /etc/resolv.conf, as container runtimes and
// `ip netns exec` make) rename cannot replace it (EBUSY, or EXDEV across
// file systems): the file is then rewritten in place, which a reader can
// see half-written, but the only way to change what that mount shows.
func writeFile(path string, data []byte, perm fs.FileMode) error {
	err := atomicfile.Write(path, data, perm)
	if err == nil || !renameImpossible(err) {
		return err
	}
	return writeInPlace(path, data)
}

func renameImpossible(err error) bool {
	return errors.Is(err, syscall.EBUSY) || errors.Is(err, syscall.EXDEV)
}

func writeInPlace(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return fmt.Errorf("write %s in place: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("write %s in place: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("write %s in place: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s in place: %w", path, err)
	}
	return nil
}

// replaceWithSymlink atomically makes path a symlink to target. At a mount
// point, where no rename can land, it writes content (the target's bytes
// when the backup was taken) in place instead.
func replaceWithSymlink(path, target string, content []byte) error {
	dir := filepath.Dir(path)
	tmp := filepath.Join(dir, "."+filepath.Base(path)+".link-"+rand.Text())
	if err := os.Symlink(target, tmp); err != nil {
		return fmt.Errorf("restore symlink %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		if renameImpossible(err) {
			return writeInPlace(path, content)
		}
		return fmt.Errorf("restore symlink %s: %w", path, err)
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}

// HostUpstreams reads the resolvers a resolver file names (port 53),
// without meshd's own: where meshd forwards while it does not manage the
// host's DNS (netstack mode, --accept-dns=false, before the first map).
func HostUpstreams(path string) ([]netip.AddrPort, error) {
	if path == "" {
		path = DefaultResolvConf
	}
	b, err := readBounded(path)
	if err != nil {
		return nil, err
	}
	return withoutOwn(parseResolvConf(b).Nameservers, nil), nil
}
