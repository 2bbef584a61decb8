// Package store persists the coordinator's state: users, auth keys, nodes and
// a few settings. The coordinator talks to it only through the Store
// interface so that a PostgreSQL implementation (several coordinator replicas
// sharing one database) can replace the embedded SQLite one without any SQL
// dialect leaking into the rest of the code.
package store

import (
	"context"
	"errors"
	"net/netip"
	"time"

	"meshd.dev/meshd/netmap"
)

// Errors returned by every Store implementation. Callers test them with
// errors.Is; implementations wrap them with context.
var (
	ErrNotFound      = errors.New("not found")
	ErrKeyUnusable   = errors.New("auth key already used or revoked")
	ErrPoolExhausted = errors.New("address pool exhausted")
	// ErrKeyInUse is a node key or disco key that another node holds: two
	// nodes never share one.
	ErrKeyInUse = errors.New("key held by another node")
	// ErrNameInUse is a hostname that another node holds.
	ErrNameInUse = errors.New("hostname held by another node")
)

// User is a person who owns devices. Users are created on first use.
type User struct {
	ID      int64     `json:"id"`
	Login   string    `json:"login"`
	Created time.Time `json:"created"`
}

// AuthKey is an enrolment key as stored: only a hash of its secret.
type AuthKey struct {
	ID            string
	Hash          []byte // SHA-256 of the secret
	Reusable      bool
	Ephemeral     bool
	Preauthorized bool
	Tags          []string
	User          string // owner login for untagged keys
	Created       time.Time
	Expires       time.Time // zero: never
	Revoked       time.Time // zero: not revoked
	LastUsed      time.Time // zero: never used
	Uses          int
}

// Node is a registered machine: the wire description plus the coordinator's
// bookkeeping.
type Node struct {
	netmap.Node
	AuthKeyID string `json:"auth_key_id,omitempty"`
	// Authorized is false for nodes waiting for an administrator's approval.
	Authorized bool `json:"authorized"`
	// AdminActed is when an administrator last changed the node (expired,
	// tagged, approved it): it ends the window in which the single-use key
	// that enrolled it may be presented again.
	AdminActed time.Time `json:"admin_acted,omitzero"`
	// SelfTags are the tags the node asked for itself (meshd up
	// --advertise-tags) beyond those of its auth key, as opposed to tags
	// an administrator applied (on the key, or with `admin nodes tag`).
	// Only these are re-checked against the owners in a new policy.
	// Register sets them; an update that replaces the tags must set them
	// too (nil when an administrator chose the tags).
	SelfTags []string `json:"self_tags,omitempty"`
	// RoutesApproved are the advertised routes an administrator approved
	// (`meshd admin routes approve`); the coordinator publishes those the
	// node still advertises, plus any the policy's autoApprovers approve,
	// as Node.ApprovedRoutes.
	RoutesApproved []netip.Prefix `json:"routes_approved,omitempty"`
}

// Quarantined is a row that failed to decode or validate, moved out of its
// table (into "quarantine", with its data) so that the rest loads.
type Quarantined struct {
	Source string // the table it came from: "nodes" or "auth_keys"
	Key    string // its id there
	Reason string
}

// Identity is who a node is, set when it registers with an auth key or when an
// administrator re-tags it.
type Identity struct {
	User       string
	Tags       []string
	Ephemeral  bool
	Authorized bool
	KeyExpiry  time.Time
	AuthKeyID  string
}

// RegisterParams describes one registration.
type RegisterParams struct {
	MachineKey netmap.MachinePublic
	// NodeKey and DiscoKey must not be held by another node (ErrKeyInUse).
	NodeKey  netmap.NodePublic
	DiscoKey netmap.DiscoPublic
	// Hostname is the name the node asks for. Names are unique: if another
	// node holds it, the node gets the first free HostnameCandidate. Empty
	// keeps a registered node's name.
	Hostname string
	// OS is what the node reports as its operating system; empty keeps
	// the stored one.
	OS  string
	Now time.Time
	// Identity is applied when non-nil (registration with an auth key);
	// a re-registration without a key keeps the stored identity and may
	// only update keys and hostname of an existing node.
	Identity *Identity
	// ConsumeKey marks Identity.AuthKeyID used, atomically with the
	// registration; it fails with ErrKeyUnusable if a single-use key was
	// already used or the key was revoked meanwhile.
	ConsumeKey bool
	// Reusable is the consumed key's reusability: a single-use key is
	// consumed only if nobody used it before.
	Reusable bool
}

// Policy is the tailnet policy file in force, stored as its author wrote
// it (comments included) so that `meshd admin policy get` gives it back
// unchanged. The store does not parse it; the coordinator validated it
// before storing it.
type Policy struct {
	File    string // base name the file was set under, for messages
	Data    []byte
	Updated time.Time
}

// AuditEvent is one entry of the audit log. The store keeps its fields
// as they are: Actor and Details are opaque to it (the coordinator writes
// JSON).
type AuditEvent struct {
	ID      int64 // assigned by AppendAudit; increasing
	Time    time.Time
	Actor   string // who acted, as JSON
	Action  string // what was done, e.g. "key.create"
	Target  string // what it was done to, e.g. a key or node id
	Details string // more, as a JSON object; "" for none
}

// AddrAllocator hands out tailnet addresses. It is the coordinator's policy;
// the store only guarantees uniqueness inside its transaction.
type AddrAllocator interface {
	// Next returns the IPv4 candidate following prev (an invalid prev asks
	// for the first one). It wraps around at the end of the pool.
	Next(prev netip.Addr) netip.Addr
	// Size is the number of candidates in the pool.
	Size() int
	// Addresses returns a node's addresses for its IPv4 (its IPv6 is derived).
	Addresses(v4 netip.Addr) []netip.Prefix
}

// Store is the coordinator's persistent state.
type Store interface {
	// Meta returns a setting, or ErrNotFound.
	Meta(ctx context.Context, key string) (string, error)
	SetMeta(ctx context.Context, key, value string) error

	EnsureUser(ctx context.Context, login string, now time.Time) (User, error)
	Users(ctx context.Context) ([]User, error)

	InsertAuthKey(ctx context.Context, k AuthKey) error
	AuthKey(ctx context.Context, id string) (AuthKey, error)
	AuthKeys(ctx context.Context) ([]AuthKey, error)
	RevokeAuthKey(ctx context.Context, id string, now time.Time) error

	// Register creates the node for p.MachineKey, or updates it keeping its
	// id and addresses, consuming the auth key in the same transaction. A
	// node key or disco key another node holds fails with ErrKeyInUse; a
	// hostname another node holds is suffixed (HostnameCandidate).
	Register(ctx context.Context, p RegisterParams) (Node, error)
	Node(ctx context.Context, id netmap.NodeID) (Node, error)
	NodeByMachine(ctx context.Context, mk netmap.MachinePublic) (Node, error)
	Nodes(ctx context.Context) ([]Node, error)
	// NodesWithSelfTags lists the nodes that gave themselves tags
	// (Node.SelfTags), by id: what a policy change re-checks.
	NodesWithSelfTags(ctx context.Context) ([]Node, error)
	// UpdateNode replaces a node's mutable fields (not its id, machine key
	// or addresses). Keys or a hostname held by another node fail with
	// ErrKeyInUse or ErrNameInUse and change nothing.
	UpdateNode(ctx context.Context, n Node) error
	DeleteNode(ctx context.Context, id netmap.NodeID) error

	// QuarantineCorrupt moves every node and auth key row that fails to
	// decode or validate into quarantine and returns what it moved. The
	// coordinator runs it at start, so that one corrupt row is reported
	// instead of stopping the whole tailnet from loading.
	QuarantineCorrupt(ctx context.Context, now time.Time) ([]Quarantined, error)

	// Policy returns the tailnet policy last stored, or ErrNotFound if
	// none ever was (the coordinator then runs the bootstrap default).
	Policy(ctx context.Context) (Policy, error)
	// SetPolicy replaces the stored policy.
	SetPolicy(ctx context.Context, p Policy) error

	// AppendAudit adds an event to the audit log and returns its id. The
	// log is append-only: no Store method changes or removes an event.
	AppendAudit(ctx context.Context, e AuditEvent) (int64, error)
	// AuditEvents returns up to limit events (limit > 0) at or after
	// since, oldest first (by id, which follows the order of appends).
	AuditEvents(ctx context.Context, since time.Time, limit int) ([]AuditEvent, error)

	// AddSSHCheck records a pending SSH check unless limit are pending
	// (ErrTooManySSHChecks). SSHCheck and SSHChecks read the checks not
	// expired at now; ApproveSSHCheck approves one (ErrNotFound,
	// ErrSSHApproved) and grants its caller the same login for its
	// Period, which SSHGranted tells.
	AddSSHCheck(ctx context.Context, c SSHCheck, limit int, now time.Time) error
	SSHCheck(ctx context.Context, id string, now time.Time) (SSHCheck, error)
	SSHChecks(ctx context.Context, now time.Time) ([]SSHCheck, error)
	ApproveSSHCheck(ctx context.Context, id string, now time.Time) (SSHCheck, error)
	SSHGranted(ctx context.Context, caller, node netmap.NodeID, user string, now time.Time) (bool, error)

	Close() error
}
