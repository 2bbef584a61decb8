package store

import (
	"context"
	"fmt"
	"time"
)

// AppendAudit implements Store.
func (s *sqlStore) AppendAudit(ctx context.Context, e AuditEvent) (int64, error) {
	// RETURNING, not LastInsertId, which PostgreSQL's driver lacks.
	var id int64
	err := s.q().QueryRowContext(ctx, `INSERT INTO audit (at, actor, action, target, details) VALUES (?, ?, ?, ?, ?) RETURNING id`,
		e.Time.UnixNano(), e.Actor, e.Action, e.Target, e.Details).Scan(&id)
	if err != nil {
		return 0, fmt.Errorf("append audit event %s: %w", e.Action, err)
	}
	return id, nil
}

// AuditEvents implements Store.
func (s *sqlStore) AuditEvents(ctx context.Context, since time.Time, limit int) ([]AuditEvent, error) {
	if limit <= 0 {
		return nil, fmt.Errorf("audit events: limit %d: want > 0", limit)
	}
	rows, err := s.q().QueryContext(ctx, `SELECT id, at, actor, action, target, details FROM audit WHERE at >= ? ORDER BY id LIMIT ?`,
		since.UnixNano(), limit)
	if err != nil {
		return nil, fmt.Errorf("read audit events: %w", err)
	}
	defer rows.Close()
	var out []AuditEvent
	for rows.Next() {
		var e AuditEvent
		var at int64
		if err := rows.Scan(&e.ID, &at, &e.Actor, &e.Action, &e.Target, &e.Details); err != nil {
			return nil, fmt.Errorf("read audit events: %w", err)
		}
		e.Time = time.Unix(0, at).UTC()
		out = append(out, e)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read audit events: %w", err)
	}
	return out, nil
}
