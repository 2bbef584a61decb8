package osdns

import (
	"bytes"
	"encoding/json"
	"errors"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"

	"meshd.dev/meshd/netmap"
)

var meshCfg = Config{
	Nameservers:   []netip.Addr{netmap.ResolverIPv4, netmap.ResolverIPv6},
	SearchDomains: []string{"meshd.internal"},
	MatchDomains:  []string{"meshd.internal", "corp.example"},
}

const hostConf = "# written by the DHCP client\nnameserver 192.0.2.1\nnameserver 100.100.100.100\nsearch lan\noptions edns0\n"

// fileEnv is a resolver file and a state dir in a temp dir.
type fileEnv struct {
	t      *testing.T
	dir    string
	path   string // the resolver file
	backup string // the backup in the "state dir"
}

func newFileEnv(t *testing.T) *fileEnv {
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "state"), 0o700); err != nil {
		t.Fatal(err)
	}
	return &fileEnv{t: t, dir: dir, path: filepath.Join(dir, "resolv.conf"), backup: filepath.Join(dir, "state", "dns-backup.json")}
}

func (e *fileEnv) opts() Options {
	return Options{Mode: ModeFile, ResolvConf: e.path, BackupFile: e.backup}
}

func (e *fileEnv) newConfigurator() Configurator {
	e.t.Helper()
	c, err := New(e.opts())
	if err != nil {
		e.t.Fatalf("New: %v", err)
	}
	if !strings.Contains(c.String(), e.path) {
		e.t.Errorf("String() = %q, want the path", c.String())
	}
	return c
}

func (e *fileEnv) state() fileState {
	e.t.Helper()
	st, err := readState(e.path)
	if err != nil {
		e.t.Fatal(err)
	}
	return st
}

func (e *fileEnv) write(content string) {
	e.t.Helper()
	if err := os.WriteFile(e.path, []byte(content), 0o644); err != nil {
		e.t.Fatal(err)
	}
}

// mustBeMeshd checks the resolver file is meshd's for cfg.
func (e *fileEnv) mustBeMeshd(cfg Config) {
	e.t.Helper()
	st := e.state()
	if st.Kind != kindFile || !bytes.HasPrefix(st.Content, []byte(header)) {
		e.t.Fatalf("resolver file is not meshd's: %+v\n%s", st, st.Content)
	}
	if got := parseResolvConf(st.Content).Nameservers; !reflect.DeepEqual(got, cfg.Nameservers) {
		e.t.Fatalf("nameservers %v, want %v", got, cfg.Nameservers)
	}
	if st.Mode != 0o644 {
		e.t.Errorf("mode %v, want 0644 (every user's resolver reads it)", st.Mode)
	}
}

func (e *fileEnv) backupExists() bool {
	_, err := os.Stat(e.backup)
	return err == nil
}

// asideFiles lists backups moved aside with the given reason.
func (e *fileEnv) asideFiles(why string) []string {
	m, _ := filepath.Glob(e.backup + "." + why + "-*")
	return m
}

// noLeftovers checks that no temporary file stayed in the resolver
// file's directory.
func (e *fileEnv) noLeftovers() {
	e.t.Helper()
	ents, _ := os.ReadDir(e.dir)
	for _, de := range ents {
		if strings.HasPrefix(de.Name(), ".") {
			e.t.Errorf("left behind %s", de.Name())
		}
	}
}

// TestFileSetAndRestore: for each thing the resolver path can hold, Set
// puts meshd's file there with a backup, and both a clean Close and a
// crash followed by Recover put back exactly what was there.
func TestFileSetAndRestore(t *testing.T) {
	origins := []struct {
		name          string
		make          func(e *fileEnv)
		wantUpstreams []netip.AddrPort
	}{
		{"regular file", func(e *fileEnv) { e.write(hostConf) },
			[]netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:53")}},
		{"regular file with an unusual mode", func(e *fileEnv) {
			e.write(hostConf)
			os.Chmod(e.path, 0o640)
		}, []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:53")}},
		{"symlink to another tool's file", func(e *fileEnv) {
			os.WriteFile(filepath.Join(e.dir, "managed.conf"), []byte("nameserver 192.0.2.7\n"), 0o644)
			os.Symlink("managed.conf", e.path)
		}, []netip.AddrPort{netip.MustParseAddrPort("192.0.2.7:53")}},
		{"dangling symlink (stub of a stopped resolved)", func(e *fileEnv) {
			os.Symlink(filepath.Join(e.dir, "missing", "stub-resolv.conf"), e.path)
		}, nil},
		{"no file", func(*fileEnv) {}, nil},
	}
	for _, o := range origins {
		for _, crash := range []bool{false, true} {
			name := o.name + "/close"
			if crash {
				name = o.name + "/crash and recover"
			}
			t.Run(name, func(t *testing.T) {
				e := newFileEnv(t)
				o.make(e)
				before := e.state()
				c := e.newConfigurator()
				if got := c.Upstreams(); !reflect.DeepEqual(got, o.wantUpstreams) {
					t.Errorf("Upstreams before Set = %v, want %v", got, o.wantUpstreams)
				}
				if err := c.Set(meshCfg); err != nil {
					t.Fatalf("Set: %v", err)
				}
				e.mustBeMeshd(meshCfg)
				if fi, err := os.Stat(e.backup); err != nil || fi.Mode().Perm() != 0o600 {
					t.Fatalf("backup: %v, %v", fi, err)
				}
				if got := c.Upstreams(); !reflect.DeepEqual(got, o.wantUpstreams) {
					t.Errorf("Upstreams = %v, want the original's %v (never meshd's own)", got, o.wantUpstreams)
				}
				if crash {
					// The process dies: no Close. The next start recovers.
					if err := Recover(e.opts()); err != nil {
						t.Fatalf("Recover: %v", err)
					}
				} else if err := c.Close(); err != nil {
					t.Fatalf("Close: %v", err)
				}
				if after := e.state(); !reflect.DeepEqual(after, before) {
					t.Fatalf("after restore\n got %+v\nwant %+v", after, before)
				}
				if e.backupExists() {
					t.Error("backup still there after the restore")
				}
				e.noLeftovers()
				// Nothing more to restore: a second Recover is a no-op.
				if err := Recover(e.opts()); err != nil || !reflect.DeepEqual(e.state(), before) {
					t.Fatalf("second Recover: %v, %+v", err, e.state())
				}
			})
		}
	}
}

// TestFileChangedBySomeoneElse: a file another tool wrote after meshd is
// never overwritten by a restore, whether at Close or at crash recovery;
// the original is kept aside for the record. A Set that finds such a file
// takes it as the version to restore.
func TestFileChangedBySomeoneElse(t *testing.T) {
	const theirs = "nameserver 192.0.2.50\n"
	tests := []struct {
		name    string
		change  func(e *fileEnv)
		restore func(e *fileEnv, c Configurator) error
		want    fileState
	}{
		{"rewritten, then Close", func(e *fileEnv) { e.write(theirs) },
			func(_ *fileEnv, c Configurator) error { return c.Close() },
			fileState{Kind: kindFile, Mode: 0o644, Content: []byte(theirs)}},
		{"rewritten, then crash and Recover", func(e *fileEnv) { e.write(theirs) },
			func(e *fileEnv, _ Configurator) error { return Recover(e.opts()) },
			fileState{Kind: kindFile, Mode: 0o644, Content: []byte(theirs)}},
		{"replaced by a symlink, then Recover", func(e *fileEnv) {
			os.Remove(e.path)
			os.Symlink("/run/elsewhere", e.path)
		}, func(e *fileEnv, _ Configurator) error { return Recover(e.opts()) },
			fileState{Kind: kindSymlink, Target: "/run/elsewhere"}},
		{"removed, then Close", func(e *fileEnv) { os.Remove(e.path) },
			func(_ *fileEnv, c Configurator) error { return c.Close() },
			fileState{Kind: kindAbsent}},
		{"edited by hand (header kept), then Recover", func(e *fileEnv) {
			b, _ := os.ReadFile(e.path)
			e.write(string(b) + "nameserver 192.0.2.60\n")
		}, func(e *fileEnv, _ Configurator) error { return Recover(e.opts()) }, fileState{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newFileEnv(t)
			e.write(hostConf)
			c := e.newConfigurator()
			if err := c.Set(meshCfg); err != nil {
				t.Fatal(err)
			}
			tt.change(e)
			want := tt.want
			if want.Kind == "" {
				want = e.state() // whatever the change left
			}
			if err := tt.restore(e, c); err != nil {
				t.Fatalf("restore: %v", err)
			}
			if got := e.state(); !reflect.DeepEqual(got, want) {
				t.Fatalf("file after restore\n got %+v\nwant %+v (the other tool's version must stay)", got, want)
			}
			if e.backupExists() {
				t.Error("backup still in place: the next start would try again")
			}
			aside := e.asideFiles("unused")
			if len(aside) != 1 {
				t.Fatalf("original kept aside in %v, want one file", aside)
			}
			var b backup
			data, _ := os.ReadFile(aside[0])
			if err := json.Unmarshal(data, &b); err != nil || string(b.Original.Content) != hostConf {
				t.Fatalf("kept original %+v, %v", b.Original, err)
			}
		})
	}

	t.Run("Set adopts the new version", func(t *testing.T) {
		e := newFileEnv(t)
		e.write(hostConf)
		c := e.newConfigurator()
		if err := c.Set(meshCfg); err != nil {
			t.Fatal(err)
		}
		e.write(theirs) // the DHCP lease renewed
		if err := c.Set(meshCfg); err != nil {
			t.Fatal(err)
		}
		e.mustBeMeshd(meshCfg)
		if got, want := c.Upstreams(), []netip.AddrPort{netip.MustParseAddrPort("192.0.2.50:53")}; !reflect.DeepEqual(got, want) {
			t.Errorf("Upstreams = %v, want the new version's %v", got, want)
		}
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
		if got := e.state(); string(got.Content) != theirs {
			t.Fatalf("restored %q, want the newer version %q", got.Content, theirs)
		}
	})
}

// TestFileRecoverEdges: crash recovery where the record and the file
// disagree in the ways an interrupted run leaves them.
func TestFileRecoverEdges(t *testing.T) {
	meshCfg2 := meshCfg
	meshCfg2.SearchDomains = []string{"meshd.internal", "other.example"}
	tests := []struct {
		name string
		// crash runs after a Set(meshCfg) and leaves the files as a
		// crash would; it returns the options Recover runs with.
		crash     func(t *testing.T, e *fileEnv, c Configurator) Options
		wantFile  string // "" means: still meshd's
		wantAside string // reason the backup was moved aside, "" for none
	}{
		{
			name: "crash after recording an update but before writing it",
			crash: func(t *testing.T, e *fileEnv, c Configurator) Options {
				fc := c.(*fileConfigurator)
				fc.write = func(string, []byte, fs.FileMode) error { return errors.New("killed") }
				if err := c.Set(meshCfg2); err == nil {
					t.Fatal("Set with a failing write succeeded")
				}
				return e.opts()
			},
			wantFile: hostConf,
		},
		{
			name: "crash after the first backup but before the file was written",
			crash: func(t *testing.T, e *fileEnv, _ Configurator) Options {
				e.write(hostConf) // as if meshd's write never happened
				return e.opts()
			},
			wantFile: hostConf, wantAside: "unused",
		},
		{
			name: "backup of another path (--resolv-conf changed)",
			crash: func(t *testing.T, e *fileEnv, _ Configurator) Options {
				o := e.opts()
				o.ResolvConf = filepath.Join(e.dir, "other.conf")
				return o
			},
			wantAside: "other-path",
		},
		{
			name: "corrupt backup",
			crash: func(t *testing.T, e *fileEnv, _ Configurator) Options {
				os.WriteFile(e.backup, []byte("{not json"), 0o600)
				return e.opts()
			},
			wantAside: "corrupt",
		},
		{
			name: "backup without digests",
			crash: func(t *testing.T, e *fileEnv, _ Configurator) Options {
				os.WriteFile(e.backup, []byte(`{"path":"`+e.path+`","original":{"kind":"absent"}}`), 0o600)
				return e.opts()
			},
			wantAside: "corrupt",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newFileEnv(t)
			e.write(hostConf)
			c := e.newConfigurator()
			if err := c.Set(meshCfg); err != nil {
				t.Fatal(err)
			}
			o := tt.crash(t, e, c)
			if err := Recover(o); err != nil {
				t.Fatalf("Recover: %v", err)
			}
			if tt.wantFile == "" {
				e.mustBeMeshd(meshCfg)
			} else if got := e.state(); string(got.Content) != tt.wantFile {
				t.Fatalf("file %q, want %q", got.Content, tt.wantFile)
			}
			if e.backupExists() {
				t.Error("backup still in place")
			}
			if tt.wantAside != "" && len(e.asideFiles(tt.wantAside)) != 1 {
				t.Errorf("no backup moved aside as %q", tt.wantAside)
			}
			if _, err := os.Stat(filepath.Join(e.dir, "other.conf")); err == nil {
				t.Error("Recover created the other path")
			}
		})
	}
}

// TestFileNewRecovers: a daemon that was killed left meshd's file and
// the backup; the next configurator restores the original before it
// reads the host's upstreams (which must not be meshd's own resolver).
func TestFileNewRecovers(t *testing.T) {
	e := newFileEnv(t)
	e.write(hostConf)
	c := e.newConfigurator()
	if err := c.Set(meshCfg); err != nil {
		t.Fatal(err)
	}
	// killed: no Close
	c2 := e.newConfigurator()
	if got := e.state(); string(got.Content) != hostConf {
		t.Fatalf("New did not restore the original: %q", got.Content)
	}
	want := []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:53")}
	if got := c2.Upstreams(); !reflect.DeepEqual(got, want) {
		t.Fatalf("Upstreams = %v, want %v", got, want)
	}
	if err := c2.Set(meshCfg); err != nil {
		t.Fatal(err)
	}
	if err := c2.Close(); err != nil {
		t.Fatal(err)
	}
	if got := e.state(); string(got.Content) != hostConf {
		t.Fatalf("after the second run: %q, want the host's original", got.Content)
	}
}

// TestFileSetErrors: bad input and failed writes change nothing.
func TestFileSetErrors(t *testing.T) {
	tests := []struct {
		name    string
		path    func(e *fileEnv) string
		cfg     Config
		wantErr string
	}{
		{"newline injected through a search domain", func(e *fileEnv) string { return e.path },
			Config{Nameservers: addrs("100.100.100.100"), SearchDomains: []string{"x\nnameserver 203.0.113.66"}}, "lowercase"},
		{"no nameserver", func(e *fileEnv) string { return e.path }, Config{SearchDomains: []string{"a"}}, "no nameservers"},
		{"directory missing", func(e *fileEnv) string { return filepath.Join(e.dir, "no", "resolv.conf") }, meshCfg, "no such file"},
		{"path is a directory", func(e *fileEnv) string { os.Mkdir(filepath.Join(e.dir, "d"), 0o755); return filepath.Join(e.dir, "d") },
			meshCfg, "not a file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newFileEnv(t)
			e.write(hostConf)
			o := e.opts()
			o.ResolvConf = tt.path(e)
			c, err := New(o)
			if err != nil {
				t.Fatal(err)
			}
			err = c.Set(tt.cfg)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Set = %v, want an error containing %q", err, tt.wantErr)
			}
			if got := e.state(); string(got.Content) != hostConf {
				t.Fatalf("resolver file changed: %q", got.Content)
			}
			if e.backupExists() {
				t.Fatal("a failed Set left a backup")
			}
			if err := c.Close(); err != nil {
				t.Fatalf("Close after a failed Set: %v", err)
			}
		})
	}
}

// TestFileSetIdempotent: the same config again does not rewrite the file
// (maps arrive often), a changed one does, and the original is still
// what Close restores.
func TestFileSetIdempotent(t *testing.T) {
	e := newFileEnv(t)
	e.write(hostConf)
	c := e.newConfigurator()
	if err := c.Set(meshCfg); err != nil {
		t.Fatal(err)
	}
	ino := func() uint64 {
		fi, err := os.Stat(e.path)
		if err != nil {
			t.Fatal(err)
		}
		return fi.Sys().(*syscall.Stat_t).Ino
	}
	first := ino()
	if err := c.Set(meshCfg); err != nil {
		t.Fatal(err)
	}
	if ino() != first {
		t.Error("an unchanged config rewrote the file")
	}
	cfg2 := meshCfg
	cfg2.SearchDomains = []string{"meshd.internal", "b.example"}
	if err := c.Set(cfg2); err != nil {
		t.Fatal(err)
	}
	if got := parseResolvConf(e.state().Content).Search; !reflect.DeepEqual(got, []string{"meshd.internal", "b.example", "lan"}) {
		t.Errorf("search after update %v", got)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if got := e.state(); string(got.Content) != hostConf {
		t.Fatalf("restored %q", got.Content)
	}
}

// TestFileOriginalIsMeshds: with the state dir lost, the file in place
// may be meshd's own; its resolver is never an upstream (a loop).
func TestFileOriginalIsMeshds(t *testing.T) {
	e := newFileEnv(t)
	e.write(string(renderResolvConf(meshCfg, resolvConf{})))
	c := e.newConfigurator()
	if got := c.Upstreams(); len(got) != 0 {
		t.Fatalf("Upstreams = %v: meshd's own resolver", got)
	}
	if err := c.Set(meshCfg); err != nil {
		t.Fatal(err)
	}
	if got := c.Upstreams(); len(got) != 0 {
		t.Fatalf("Upstreams = %v: meshd's own resolver", got)
	}
}

func TestHostUpstreams(t *testing.T) {
	tests := []struct {
		name    string
		content string
		want    []netip.AddrPort
	}{
		{"host file", hostConf, []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:53")}},
		{"meshd's own file", string(renderResolvConf(meshCfg, resolvConf{})), nil},
		{"v6 and duplicates", "nameserver 2001:db8::53\nnameserver 2001:db8::53\nnameserver fd5e:5a1e:d::53\n",
			[]netip.AddrPort{netip.MustParseAddrPort("[2001:db8::53]:53")}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newFileEnv(t)
			e.write(tt.content)
			got, err := HostUpstreams(e.path)
			if err != nil || !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("HostUpstreams = %v, %v; want %v", got, err, tt.want)
			}
		})
	}
	if _, err := HostUpstreams(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Fatal("HostUpstreams of a missing file succeeded")
	}
}
