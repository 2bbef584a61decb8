package agent

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/internal/atomicfile"
	"meshd.dev/meshd/netmap"
)

// State file names inside the state dir. Each is written atomically and on
// its own, so a crash mid-write can never leave the identity half-updated.
const (
	identityFile = "identity.json"
	loginFile    = "login.json"
	netmapFile   = "netmap.json"
	maxStateFile = netmap.MaxMessageSize
)

// Identity is the node's long-lived key material.
type Identity struct {
	// MachineKey is the Ed25519 key of the control channel's TLS client
	// certificate. It never changes for a state dir.
	MachineKey ed25519.PrivateKey `json:"machine_key"`
	// NodeKey is the WireGuard private key.
	NodeKey netmap.NodePrivate `json:"node_key"`
}

// Login records where and as whom the node is registered.
type Login struct {
	CoordinatorURL string        `json:"coordinator_url"`
	ServerPin      string        `json:"server_pin"`
	NodeID         netmap.NodeID `json:"node_id"`
	Hostname       string        `json:"hostname,omitempty"`
	// RequestedHostname is the name the node asked for when it registered;
	// the coordinator may have changed it (sanitized, or a suffix on a
	// clash). `meshd up --hostname` with either name changes nothing.
	RequestedHostname string   `json:"requested_hostname,omitempty"`
	Tags              []string `json:"tags,omitempty"`
	Ephemeral         bool     `json:"ephemeral,omitempty"`
	// WantRunning is false after `meshd down`: a restarted daemon then stays
	// down until `meshd up`, as a user who took the node down expects.
	WantRunning bool `json:"want_running"`
	// NoAcceptDNS is `meshd up --accept-dns=false`: the node leaves the
	// host's DNS configuration alone. Negative so that logins saved
	// before the setting existed get the default.
	NoAcceptDNS bool `json:"no_accept_dns,omitempty"`
	// SSH is `meshd up --ssh`: the node runs its SSH server on its
	// tailnet addresses (docs/ssh.md).
	SSH bool `json:"ssh,omitempty"`
	// Routing are the node's routing preferences (`meshd up
	// --advertise-routes`, `--accept-routes`, ...).
	Routing localapi.RoutePrefs `json:"routing,omitzero"`
}

// CorruptFileError reports a state file that could not be decoded. The file
// has been moved aside to MovedTo so that nothing is silently overwritten.
type CorruptFileError struct {
	Path    string
	MovedTo string
	Err     error
}

func (e *CorruptFileError) Error() string {
	return fmt.Sprintf("state file %s is corrupt (%v); moved it to %s: restore %s from a backup, or remove %s to start over (a new identity needs a new auth key)",
		e.Path, e.Err, e.MovedTo, filepath.Base(e.Path), e.MovedTo)
}

func (e *CorruptFileError) Unwrap() error { return e.Err }

// Store reads and writes the state dir. It holds no cache: each call goes to
// disk, which keeps it trivially consistent across restarts.
type Store struct {
	dir  string
	now  func() time.Time
	lock *os.File
}

// OpenStore creates dir (0700) if needed and checks it is writable, so that a
// read-only or foreign-owned dir is reported at start, not at the first save.
func OpenStore(dir string) (*Store, error) {
	if dir == "" {
		return nil, errors.New("no state dir: pass --state-dir (or MESHD_STATE_DIR)")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir %s: %w (choose a writable --state-dir)", dir, err)
	}
	// Keys live here: tighten a dir that someone created with a looser mode.
	// A failure shows up as "not writable" just below, or is harmless.
	_ = os.Chmod(dir, 0o700)
	probe, err := os.CreateTemp(dir, ".probe-*")
	if err != nil {
		return nil, fmt.Errorf("state dir %s is not writable: %w (fix its permissions or choose another --state-dir)", dir, err)
	}
	probe.Close()
	os.Remove(probe.Name())
	lock, err := lockDir(dir)
	if err != nil {
		return nil, err
	}
	return &Store{dir: dir, now: time.Now, lock: lock}, nil
}

// lockDir takes an exclusive lock on dir/lock so that two daemons never
// share a state dir (they would fight over the same node key). The kernel
// drops the lock when the process dies, even after kill -9.
func lockDir(dir string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("state dir %s: %w", dir, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("state dir %s is in use by another meshd process (stop it, or use another --state-dir)", dir)
		}
		return nil, fmt.Errorf("state dir %s: lock: %w", dir, err)
	}
	return f, nil
}

// Close releases the state dir lock.
func (s *Store) Close() error { return s.lock.Close() }

// Dir returns the state dir path.
func (s *Store) Dir() string { return s.dir }

// loadState reads the state dir at daemon start. A corrupt identity or
// login stops the start (the file is moved aside, see CorruptFileError):
// the node must not quietly become someone else. A corrupt map cache does
// not: it is moved aside and logged, and the daemon starts without it and
// fetches a fresh map from the coordinator.
func loadState(st *Store, log *slog.Logger) (*Identity, *Login, *netmap.NetworkMap, error) {
	id, err := st.LoadOrCreateIdentity()
	if err != nil {
		return nil, nil, nil, err
	}
	login, err := st.LoadLogin()
	if err != nil {
		return nil, nil, nil, err
	}
	var nm *netmap.NetworkMap
	if login != nil {
		nm, err = st.LoadNetworkMap()
		var ce *CorruptFileError
		switch {
		case errors.As(err, &ce):
			log.Warn("the saved network map is corrupt: moved it aside; starting without it, a fresh map comes from the coordinator",
				"path", ce.Path, "moved_to", ce.MovedTo, "err", ce.Err)
			nm = nil
		case err != nil:
			return nil, nil, nil, err
		}
	}
	return id, login, nm, nil
}

// LoadOrCreateIdentity returns the stored identity, generating and saving a
// new one if there is none yet. It refuses to make a new one where the
// node had one: when identity.json was moved aside as corrupt, or when
// login.json says this machine is enrolled. A new identity is a new
// machine to the coordinator, so that must be the operator's choice.
func (s *Store) LoadOrCreateIdentity() (*Identity, error) {
	var id Identity
	ok, err := s.readJSON(identityFile, &id, func() error {
		if len(id.MachineKey) != ed25519.PrivateKeySize {
			return fmt.Errorf("machine key: want %d bytes, got %d", ed25519.PrivateKeySize, len(id.MachineKey))
		}
		if id.NodeKey.IsZero() {
			return fmt.Errorf("node key: %w", netmap.ErrZeroKey)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if ok {
		return &id, nil
	}
	if err := s.mayCreateIdentity(); err != nil {
		return nil, err
	}
	_, mk, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate machine key: %w", err)
	}
	id = Identity{MachineKey: mk, NodeKey: netmap.NewNodePrivate()}
	if err := s.writeJSON(identityFile, &id); err != nil {
		return nil, err
	}
	return &id, nil
}

// mayCreateIdentity reports why a missing identity.json must not be
// replaced by a new identity, if it must not.
func (s *Store) mayCreateIdentity() error {
	path := filepath.Join(s.dir, identityFile)
	aside, err := filepath.Glob(path + ".corrupt-*")
	if err != nil {
		return fmt.Errorf("state dir %s: %w", s.dir, err)
	}
	login := filepath.Join(s.dir, loginFile)
	enrolled := true
	if _, err := os.Stat(login); errors.Is(err, fs.ErrNotExist) {
		enrolled = false
	} else if err != nil {
		return fmt.Errorf("read state: %w", err)
	}
	switch {
	case len(aside) > 0:
		slices.Sort(aside) // the time suffix sorts: the last is the newest
		newest := aside[len(aside)-1]
		if enrolled {
			aside = append(aside, login)
		}
		return fmt.Errorf("%s is missing and was moved aside as corrupt to %s: restore %s from a backup; "+
			"to give this machine a new identity instead (it must enrol again with a new auth key), remove %s",
			path, newest, identityFile, strings.Join(aside, " "))
	case enrolled:
		return fmt.Errorf("%s is missing but %s says this machine is enrolled: restore %s from a backup; "+
			"to enrol it again as a new node instead, remove %s and run meshd up --authkey",
			path, login, identityFile, login)
	}
	return nil
}

// LoadLogin returns the stored login, or nil if the node never registered.
func (s *Store) LoadLogin() (*Login, error) {
	var l Login
	ok, err := s.readJSON(loginFile, &l, func() error {
		if l.CoordinatorURL == "" {
			return errors.New("no coordinator url")
		}
		if l.NodeID == 0 {
			return errors.New("node id is zero")
		}
		return nil
	})
	if err != nil || !ok {
		return nil, err
	}
	return &l, nil
}

// SaveLogin stores l.
func (s *Store) SaveLogin(l *Login) error { return s.writeJSON(loginFile, l) }

// ForgetLogin removes the stored login and network map, as after a
// logout: the identity stays, and the node enrols again with an auth key.
func (s *Store) ForgetLogin() error {
	for _, name := range []string{loginFile, netmapFile} {
		if err := os.Remove(filepath.Join(s.dir, name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("forget login: %w", err)
		}
	}
	return nil
}

// LoadNetworkMap returns the last network map saved, or nil if there is none.
func (s *Store) LoadNetworkMap() (*netmap.NetworkMap, error) {
	var resp netmap.MapResponse
	ok, err := s.readJSON(netmapFile, &resp, func() error {
		if !resp.Full {
			return errors.New("not a full map")
		}
		return resp.Validate()
	})
	if err != nil || !ok {
		return nil, err
	}
	var nm netmap.NetworkMap
	if err := nm.Apply(&resp); err != nil {
		return nil, fmt.Errorf("state file %s: %w", filepath.Join(s.dir, netmapFile), err)
	}
	return &nm, nil
}

// SaveNetworkMap stores nm as a full map response, the same form the
// coordinator sends, so loading it goes through the same validation.
func (s *Store) SaveNetworkMap(nm *netmap.NetworkMap) error {
	self := nm.Self
	resp := netmap.MapResponse{
		Epoch: nm.Epoch, Version: nm.Version, Full: true, Self: &self,
		PolicyBootstrap: nm.PolicyBootstrap,
	}
	for _, p := range nm.SortedPeers() {
		resp.Peers = append(resp.Peers, *p)
	}
	if len(nm.DERPMap.Regions) > 0 {
		d := nm.DERPMap
		resp.DERPMap = &d
	}
	if nm.PacketFilter != nil {
		pf := nm.PacketFilter
		resp.PacketFilter = &pf
	}
	return s.writeJSON(netmapFile, &resp)
}

// readJSON decodes name into v and runs check. It reports ok=false when the
// file does not exist. A file that fails to decode or check is moved aside
// and reported as a *CorruptFileError.
func (s *Store) readJSON(name string, v any, check func() error) (ok bool, err error) {
	path := filepath.Join(s.dir, name)
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("read state: %w", err)
	}
	derr := netmap.DecodeJSON(f, maxStateFile, v)
	f.Close()
	if derr == nil {
		derr = check()
	}
	if derr == nil {
		return true, nil
	}
	moved := fmt.Sprintf("%s.corrupt-%s", path, s.now().UTC().Format("20060102T150405.000000000Z"))
	if err := os.Rename(path, moved); err != nil {
		return false, fmt.Errorf("state file %s is corrupt (%v) and could not be moved aside: %w", path, derr, err)
	}
	return false, &CorruptFileError{Path: path, MovedTo: moved, Err: derr}
}

// writeJSON replaces name atomically: temp file, fsync, rename, fsync dir.
func (s *Store) writeJSON(name string, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("encode %s: %w", name, err)
	}
	return atomicfile.Write(filepath.Join(s.dir, name), append(data, '\n'), 0o600)
}
