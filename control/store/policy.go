package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
)

// Policy implements Store.
func (s *sqlStore) Policy(ctx context.Context) (Policy, error) {
	var p Policy
	var updated int64
	err := s.q().QueryRowContext(ctx, `SELECT file, data, updated FROM policy WHERE id = 1`).Scan(&p.File, &p.Data, &updated)
	if errors.Is(err, sql.ErrNoRows) {
		return Policy{}, fmt.Errorf("policy: %w", ErrNotFound)
	}
	if err != nil {
		return Policy{}, fmt.Errorf("read policy: %w", err)
	}
	p.Updated = fromUnixNano(updated)
	return p, nil
}

// SetPolicy implements Store.
func (s *sqlStore) SetPolicy(ctx context.Context, p Policy) error {
	data := p.Data
	if data == nil {
		data = []byte{} // the column is NOT NULL; an empty file is still a file
	}
	_, err := s.q().ExecContext(ctx, `INSERT INTO policy (id, file, data, updated) VALUES (1, ?, ?, ?)
		ON CONFLICT(id) DO UPDATE SET file = excluded.file, data = excluded.data, updated = excluded.updated`,
		p.File, data, unixNano(p.Updated))
	if err != nil {
		return fmt.Errorf("write policy: %w", err)
	}
	return nil
}
