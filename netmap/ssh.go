package netmap

import (
	"net/netip"
	"time"
)

// SSH actions in SSHAuthResponse.Action.
const (
	SSHAccept = "accept" // open the session
	SSHCheck  = "check"  // hold the connection until an admin approves it
	SSHReject = "reject" // refuse, saying Message
)

// SSHAuthRequest is what a node's SSH server asks the coordinator
// (POST /machine/ssh/authorize) when a connection arrives: may the node
// holding CallerAddr log in here as LocalUser? The caller is named by the
// tailnet address its packets came from (whois on the node), never by
// anything the SSH client sent.
type SSHAuthRequest struct {
	Version    int        `json:"version"`
	CallerAddr netip.Addr `json:"caller_addr"`
	LocalUser  string     `json:"local_user"`
}

// SSHAuthResponse is the coordinator's decision for one SSH connection.
type SSHAuthResponse struct {
	Action string `json:"action"`
	// Message is said to the SSH user on reject, and on check while the
	// connection waits.
	Message string `json:"message,omitempty"`
	// Rule is the policy rule deciding (FILE:LINE), for the node's log.
	Rule string `json:"rule,omitempty"`
	// CheckID names the pending approval (check): the node waits on it
	// with POST /machine/ssh/wait.
	CheckID string `json:"check_id,omitempty"`
	// AcceptEnv are the patterns of environment variables the client may
	// set (the rule's acceptEnv; `*` and `?` wildcards).
	AcceptEnv []string `json:"accept_env,omitempty"`
	// Recorders are where the session is streamed; empty when it is not
	// recorded. EnforceRecorder refuses the session if none is reachable
	// and ends it if the recorder is lost.
	Recorders       []netip.AddrPort `json:"recorders,omitempty"`
	EnforceRecorder bool             `json:"enforce_recorder,omitempty"`
	// Caller identifies the caller for recordings and logs.
	Caller SSHCaller `json:"caller"`
}

// SSHCaller is who an SSH session is for, as the coordinator knows it.
type SSHCaller struct {
	NodeID   NodeID   `json:"node_id"`
	Hostname string   `json:"hostname"`
	User     string   `json:"user,omitempty"` // owner's login; empty for tagged nodes
	Tags     []string `json:"tags,omitempty"`
}

// SSHWaitRequest waits for the approval of a check (POST /machine/ssh/wait).
type SSHWaitRequest struct {
	Version int    `json:"version"`
	CheckID string `json:"check_id"`
}

// SSHWaitResponse ends a wait: Approved, or not yet (Pending: ask again),
// or refused/expired (neither: Message says why).
type SSHWaitResponse struct {
	Approved bool   `json:"approved,omitempty"`
	Pending  bool   `json:"pending,omitempty"`
	Message  string `json:"message,omitempty"`
}

// SSHApproval is a pending or recently decided check-mode approval, as the
// admin API lists it (GET /admin/v1/ssh/checks).
type SSHApproval struct {
	ID        string    `json:"id"`
	Caller    SSHCaller `json:"caller"`
	NodeID    NodeID    `json:"node_id"`
	Hostname  string    `json:"hostname"`
	LocalUser string    `json:"local_user"`
	Created   time.Time `json:"created"`
	Expires   time.Time `json:"expires"`
	Approved  bool      `json:"approved"`
}

// SSHRecorderPort is the tailnet TCP port `meshd recorder` listens on.
const SSHRecorderPort = 8022

// SSH session kinds in SSHSessionEnd.Kind.
const (
	SSHSessionShell     = "shell"
	SSHSessionExec      = "exec"
	SSHSessionSubsystem = "subsystem"
)

// SSHSessionEnd is a node's report that an SSH session on itself ended
// (POST /machine/ssh/session), for the coordinator's audit log. The
// coordinator records it as done by, and about, the node that reports:
// nothing in it names another node as the session's host.
type SSHSessionEnd struct {
	Version int `json:"version"`
	// SessionID is the node's name for the session, unique on the node.
	SessionID string `json:"session_id"`
	// CheckID is the check-mode approval the login passed, if any.
	CheckID string `json:"check_id,omitempty"`
	// Caller is who logged in, as the coordinator said at authorization.
	Caller    SSHCaller `json:"caller"`
	LocalUser string    `json:"local_user"`
	Kind      string    `json:"kind"` // SSHSessionShell, SSHSessionExec or SSHSessionSubsystem
	// Duration is how long the session's command ran.
	Duration time.Duration `json:"duration_ns"`
	// ExitStatus is the command's exit status; -1 if a signal ended it
	// or it never started.
	ExitStatus int  `json:"exit_status"`
	Recorded   bool `json:"recorded,omitempty"`
}
