package osdns

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestFileBindMounted: where the resolver file is a bind mount (Docker's
// /etc/resolv.conf, `ip netns exec` mounting /etc/netns/NAME/resolv.conf
// over it) no rename can replace it; meshd writes it in place, so the
// mounted file (the one the host's resolver reads) changes, and is put
// back on Close. Runs in a private mount namespace on one locked thread,
// so the mount is invisible to the rest of the machine and dies with it.
func TestFileBindMounted(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("bind mounts need root (CI runs as root)")
	}
	dir := t.TempDir()
	source := filepath.Join(dir, "netns-resolv.conf") // the file behind the mount
	mountpoint := filepath.Join(dir, "resolv.conf")   // what the resolver reads
	backup := filepath.Join(dir, "dns-backup.json")
	for _, p := range []string{source, mountpoint} {
		if err := os.WriteFile(p, []byte(hostConf), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	errc := make(chan error, 1)
	go func() {
		// The thread is never unlocked: Go ends it with the goroutine,
		// and the mount namespace with it.
		runtime.LockOSThread()
		errc <- func() error {
			if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
				return fmt.Errorf("unshare: %w", err)
			}
			if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
				return fmt.Errorf("make mounts private: %w", err)
			}
			if err := unix.Mount(source, mountpoint, "", unix.MS_BIND, ""); err != nil {
				return fmt.Errorf("bind mount: %w", err)
			}
			// A rename onto the mount point fails: the case under test.
			tmp := filepath.Join(dir, "tmp")
			os.WriteFile(tmp, nil, 0o644)
			if err := os.Rename(tmp, mountpoint); !renameImpossible(err) {
				return fmt.Errorf("rename onto the mount point: %v, want EBUSY or EXDEV", err)
			}
			os.Remove(tmp)
			c, err := New(Options{Mode: ModeFile, ResolvConf: mountpoint, BackupFile: backup})
			if err != nil {
				return err
			}
			if err := c.Set(meshCfg); err != nil {
				return fmt.Errorf("Set: %w", err)
			}
			if b, _ := os.ReadFile(source); !strings.HasPrefix(string(b), header) {
				return fmt.Errorf("the mounted file was not rewritten: %q", b)
			}
			if err := c.Close(); err != nil {
				return fmt.Errorf("Close: %w", err)
			}
			if b, _ := os.ReadFile(source); string(b) != hostConf {
				return fmt.Errorf("the mounted file was not restored: %q", b)
			}
			if _, err := os.Stat(backup); !errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("backup left behind: %v", err)
			}
			return nil
		}()
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}
