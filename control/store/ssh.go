package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"meshd.dev/meshd/netmap"
)

// Errors of the SSH check-mode methods.
var (
	// ErrTooManySSHChecks: AddSSHCheck found the bound of pending checks
	// reached.
	ErrTooManySSHChecks = errors.New("too many SSH logins wait for approval")
	// ErrSSHApproved: the check was approved already.
	ErrSSHApproved = errors.New("SSH login already approved")
)

// SSHCheck is a check-mode SSH login waiting for (or granted) an
// administrator's approval. It lives in the database so that every
// coordinator sharing it, and a restarted one, sees it.
type SSHCheck struct {
	netmap.SSHApproval
	// Period is how long an approval lets the same caller log in to the
	// same node as the same user again without a new one (0: never).
	Period time.Duration
}

// sshCheckData is what of an SSHCheck is kept as JSON rather than in
// columns: nothing a query selects on.
type sshCheckData struct {
	Caller   netmap.SSHCaller `json:"caller"`
	Hostname string           `json:"hostname"`
}

// expireSSH forgets checks and grants past their time.
func expireSSH(ctx context.Context, tx querier, now time.Time) error {
	if _, err := tx.ExecContext(ctx, `DELETE FROM ssh_checks WHERE expires <= ?`, now.UnixNano()); err != nil {
		return err
	}
	_, err := tx.ExecContext(ctx, `DELETE FROM ssh_grants WHERE until <= ?`, now.UnixNano())
	return err
}

// AddSSHCheck records a pending check, unless limit checks are pending
// already (ErrTooManySSHChecks) or c.ID is taken. Checks past their
// Expires are forgotten first.
func (s *sqlStore) AddSSHCheck(ctx context.Context, c SSHCheck, limit int, now time.Time) error {
	data, err := json.Marshal(sshCheckData{Caller: c.Caller, Hostname: c.Hostname})
	if err != nil {
		return fmt.Errorf("add ssh check: %w", err)
	}
	err = s.tx(ctx, func(tx querier) error {
		// Replicas counting and inserting together would each see room
		// for one more: serialise them, so that the bound holds.
		if s.d.lockSSH != "" {
			if _, err := tx.ExecContext(ctx, s.d.lockSSH); err != nil {
				return err
			}
		}
		if err := expireSSH(ctx, tx, now); err != nil {
			return err
		}
		var n int
		if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM ssh_checks WHERE approved = 0`).Scan(&n); err != nil {
			return err
		}
		if n >= limit {
			return ErrTooManySSHChecks
		}
		_, err := tx.ExecContext(ctx, `INSERT INTO ssh_checks (id, node_id, caller_node, local_user, data, period, created, expires, approved)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)`,
			c.ID, int64(c.NodeID), int64(c.Caller.NodeID), c.LocalUser, string(data), int64(c.Period), unixNano(c.Created), unixNano(c.Expires))
		return err
	})
	if err != nil {
		return fmt.Errorf("add ssh check: %w", err)
	}
	return nil
}

const sshCheckColumns = `id, node_id, caller_node, local_user, data, period, created, expires, approved`

func scanSSHCheck(r scanner) (SSHCheck, error) {
	var c SSHCheck
	var node, caller, period, created, expires, approved int64
	var data string
	if err := r.Scan(&c.ID, &node, &caller, &c.LocalUser, &data, &period, &created, &expires, &approved); err != nil {
		return SSHCheck{}, err
	}
	var d sshCheckData
	if err := json.Unmarshal([]byte(data), &d); err != nil {
		return SSHCheck{}, fmt.Errorf("ssh check %s: %w", c.ID, err)
	}
	c.Caller, c.Hostname = d.Caller, d.Hostname
	// The columns, not the JSON, are what queries select on: they win.
	c.NodeID, c.Caller.NodeID = netmap.NodeID(node), netmap.NodeID(caller)
	c.Period = time.Duration(period)
	c.Created, c.Expires = fromUnixNano(created), fromUnixNano(expires)
	c.Approved = approved != 0
	return c, nil
}

// SSHCheck returns the check id unless it expired (ErrNotFound).
func (s *sqlStore) SSHCheck(ctx context.Context, id string, now time.Time) (SSHCheck, error) {
	c, err := scanSSHCheck(s.q().QueryRowContext(ctx, `SELECT `+sshCheckColumns+` FROM ssh_checks WHERE id = ? AND expires > ?`, id, now.UnixNano()))
	if errors.Is(err, sql.ErrNoRows) {
		return SSHCheck{}, fmt.Errorf("ssh check %q: %w", id, ErrNotFound)
	}
	if err != nil {
		return SSHCheck{}, fmt.Errorf("read ssh check %q: %w", id, err)
	}
	return c, nil
}

// SSHChecks returns the checks not expired at now, pending and approved,
// oldest first.
func (s *sqlStore) SSHChecks(ctx context.Context, now time.Time) ([]SSHCheck, error) {
	rows, err := s.q().QueryContext(ctx, `SELECT `+sshCheckColumns+` FROM ssh_checks WHERE expires > ? ORDER BY created, id`, now.UnixNano())
	if err != nil {
		return nil, fmt.Errorf("list ssh checks: %w", err)
	}
	defer rows.Close()
	out := []SSHCheck{}
	for rows.Next() {
		c, err := scanSSHCheck(rows)
		if err != nil {
			return nil, fmt.Errorf("list ssh checks: %w", err)
		}
		out = append(out, c)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list ssh checks: %w", err)
	}
	return out, nil
}

// ApproveSSHCheck approves the pending check id and, for its Period,
// grants its caller logins to its node as its user; it returns the
// check as approved. An expired or unknown check is ErrNotFound, an
// approved one ErrSSHApproved.
func (s *sqlStore) ApproveSSHCheck(ctx context.Context, id string, now time.Time) (SSHCheck, error) {
	var c SSHCheck
	err := s.tx(ctx, func(tx querier) error {
		var err error
		c, err = scanSSHCheck(tx.QueryRowContext(ctx, `SELECT `+sshCheckColumns+` FROM ssh_checks WHERE id = ? AND expires > ?`+s.d.forUpdate, id, now.UnixNano()))
		if errors.Is(err, sql.ErrNoRows) {
			return ErrNotFound
		}
		if err != nil {
			return err
		}
		if c.Approved {
			return ErrSSHApproved
		}
		if _, err := tx.ExecContext(ctx, `UPDATE ssh_checks SET approved = ? WHERE id = ?`, now.UnixNano(), id); err != nil {
			return err
		}
		c.Approved = true
		if c.Period <= 0 {
			return nil
		}
		_, err = tx.ExecContext(ctx, `INSERT INTO ssh_grants (caller_node, node_id, local_user, until) VALUES (?, ?, ?, ?)
			ON CONFLICT (caller_node, node_id, local_user) DO UPDATE SET until = excluded.until`,
			int64(c.Caller.NodeID), int64(c.NodeID), c.LocalUser, now.Add(c.Period).UnixNano())
		return err
	})
	if err != nil {
		return SSHCheck{}, fmt.Errorf("approve ssh check %q: %w", id, err)
	}
	return c, nil
}

// SSHGranted reports whether an approval made within its check period
// lets caller log in to node as user at now.
func (s *sqlStore) SSHGranted(ctx context.Context, caller, node netmap.NodeID, user string, now time.Time) (bool, error) {
	var n int
	err := s.q().QueryRowContext(ctx, `SELECT COUNT(*) FROM ssh_grants WHERE caller_node = ? AND node_id = ? AND local_user = ? AND until > ?`,
		int64(caller), int64(node), user, now.UnixNano()).Scan(&n)
	if err != nil {
		return false, fmt.Errorf("read ssh grant: %w", err)
	}
	return n > 0, nil
}
