package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"unicode/utf8"

	"meshd.dev/meshd/netmap"
)

// Node keys, disco keys and hostnames are unique among nodes. Each has a
// column beside the node's JSON with a UNIQUE index, so the database
// refuses a second holder whatever its caller checked; the transaction
// checks first, to return an error that names the holder. A zero key is
// NULL there (a UNIQUE column takes any number of NULLs): a node without a
// node key is one whose shared key migration 3 cleared. Hostnames are
// compared lowercased.

// maxHostnameTries bounds the suffixes tried for one name; a tailnet that
// holds every one of them has a naming problem no suffix solves.
const maxHostnameTries = 1 << 16

// maxLabel is a DNS label's length limit, which hostnames keep.
const maxLabel = 63

// HostnameCandidate is the i-th name tried for a node that asks for base:
// base itself, then base-1, base-2, ... (Tailscale's rule), with base
// shortened so that the name stays a 63-byte DNS label.
func HostnameCandidate(base string, i int) string {
	if i == 0 {
		return base
	}
	suffix := "-" + strconv.Itoa(i)
	if len(base)+len(suffix) > maxLabel {
		base = base[:maxLabel-len(suffix)]
		for !utf8.ValidString(base) {
			base = base[:len(base)-1]
		}
		base = strings.TrimRight(base, "-")
	}
	return base + suffix
}

func nodeKeyCol(k netmap.NodePublic) any {
	if k.IsZero() {
		return nil
	}
	return k.String()
}

func discoKeyCol(k netmap.DiscoPublic) any {
	if k.IsZero() {
		return nil
	}
	return k.String()
}

func hostnameCol(h string) any {
	if h == "" {
		return nil
	}
	return strings.ToLower(h)
}

// writeNode stores n (whose row exists) with its unique columns.
func writeNode(ctx context.Context, tx querier, n Node) error {
	data, err := json.Marshal(n)
	if err != nil {
		return err
	}
	_, err = tx.ExecContext(ctx, `UPDATE nodes SET data = ?, node_key = ?, disco_key = ?, hostname = ? WHERE id = ?`,
		string(data), nodeKeyCol(n.NodeKey), discoKeyCol(n.DiscoKey), hostnameCol(n.Hostname), int64(n.ID))
	if err != nil {
		return fmt.Errorf("write node %d: %w", n.ID, err)
	}
	return nil
}

// holder returns the id of the node other than self whose col is val, or 0.
func holder(ctx context.Context, tx querier, col string, val any, self netmap.NodeID) (netmap.NodeID, error) {
	var id int64
	err := tx.QueryRowContext(ctx, `SELECT id FROM nodes WHERE `+col+` = ? AND id != ?`, val, int64(self)).Scan(&id)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("look up %s: %w", col, err)
	}
	return netmap.NodeID(id), nil
}

// KeyInUseError is the ErrKeyInUse of one key: what kind it is ("node
// key" or "disco key"), its short form, and the node that holds it (which
// the coordinator logs but does not tell the claimant).
type KeyInUseError struct {
	Kind   string
	Key    string
	Holder netmap.NodeID
}

func (e *KeyInUseError) Error() string {
	return fmt.Sprintf("%s %s is held by node %d", e.Kind, e.Key, e.Holder)
}

// Unwrap makes errors.Is(err, ErrKeyInUse) hold.
func (e *KeyInUseError) Unwrap() error { return ErrKeyInUse }

// checkKeysFree fails with a *KeyInUseError if another node holds n's node
// key or disco key.
func checkKeysFree(ctx context.Context, tx querier, n Node) error {
	for _, k := range []struct {
		col, kind, short string
		val              any
	}{
		{"node_key", "node key", n.NodeKey.ShortString(), nodeKeyCol(n.NodeKey)},
		{"disco_key", "disco key", n.DiscoKey.ShortString(), discoKeyCol(n.DiscoKey)},
	} {
		if k.val == nil {
			continue
		}
		id, err := holder(ctx, tx, k.col, k.val, n.ID)
		if err != nil {
			return err
		}
		if id != 0 {
			return &KeyInUseError{Kind: k.kind, Key: k.short, Holder: id}
		}
	}
	return nil
}

// checkHostnameFree fails with ErrNameInUse if another node holds n's
// hostname.
func checkHostnameFree(ctx context.Context, tx querier, n Node) error {
	v := hostnameCol(n.Hostname)
	if v == nil {
		return nil
	}
	id, err := holder(ctx, tx, "hostname", v, n.ID)
	if err != nil {
		return err
	}
	if id != 0 {
		return fmt.Errorf("hostname %q is held by node %d: %w", n.Hostname, id, ErrNameInUse)
	}
	return nil
}

// freeHostname returns the first HostnameCandidate of want that no node
// but self holds: a node keeps its own name.
func freeHostname(ctx context.Context, tx querier, want string, self netmap.NodeID) (string, error) {
	for i := range maxHostnameTries {
		cand := HostnameCandidate(want, i)
		id, err := holder(ctx, tx, "hostname", hostnameCol(cand), self)
		if err != nil {
			return "", err
		}
		if id == 0 {
			return cand, nil
		}
	}
	return "", fmt.Errorf("hostname %q and its first %d suffixes are all taken: %w", want, maxHostnameTries-1, ErrNameInUse)
}

// migrateUniqueIdentity is migration 3: the unique columns. An older
// version let a node take a key another node held, and did not suffix
// hostnames, so existing rows may break the new constraints:
//
//   - a node key or disco key held by several nodes is cleared on all of
//     them, because nothing tells the genuine holder from the impostor. A
//     node without a node key is left out of every map until its next map
//     request proves it holds its key again (which meshd does by itself);
//     a cleared disco key is replaced by the node's next report.
//   - a hostname held by several nodes stays with the oldest (lowest id);
//     the others get the first free suffix, as a new node would.
//
// A row whose JSON does not decode keeps NULL columns and is reported.
func migrateUniqueIdentity(ctx context.Context, tx querier) ([]string, error) {
	if _, err := tx.ExecContext(ctx, `ALTER TABLE nodes ADD COLUMN node_key TEXT;
		ALTER TABLE nodes ADD COLUMN disco_key TEXT;
		ALTER TABLE nodes ADD COLUMN hostname TEXT;`); err != nil {
		return nil, err
	}
	type row struct {
		id      int64
		n       Node
		corrupt error
	}
	var rows []row
	q, err := tx.QueryContext(ctx, `SELECT id, data FROM nodes ORDER BY id`)
	if err != nil {
		return nil, err
	}
	for q.Next() {
		var r row
		var data string
		if err := q.Scan(&r.id, &data); err != nil {
			q.Close()
			return nil, err
		}
		r.n, r.corrupt = decodeNode(data)
		rows = append(rows, r)
	}
	q.Close()
	if err := q.Err(); err != nil {
		return nil, err
	}

	nodeKeys := map[netmap.NodePublic]int{}
	discoKeys := map[netmap.DiscoPublic]int{}
	taken := map[string]bool{}
	for _, r := range rows {
		if r.corrupt != nil {
			continue
		}
		if !r.n.NodeKey.IsZero() {
			nodeKeys[r.n.NodeKey]++
		}
		if !r.n.DiscoKey.IsZero() {
			discoKeys[r.n.DiscoKey]++
		}
		taken[strings.ToLower(r.n.Hostname)] = true
	}
	var repairs []string
	kept := map[string]bool{}
	for _, r := range rows {
		if r.corrupt != nil {
			repairs = append(repairs, fmt.Sprintf("node row %d does not decode (%v); it takes no part in key and hostname uniqueness", r.id, r.corrupt))
			continue
		}
		n := r.n
		n.ID = netmap.NodeID(r.id)
		if nodeKeys[n.NodeKey] > 1 {
			repairs = append(repairs, fmt.Sprintf("node %d (%s) shared node key %s with another node: cleared on every holder; the node stays out of maps until it proves it holds its key (its daemon does so on its next connection)", n.ID, n.Hostname, n.NodeKey.ShortString()))
			n.NodeKey = netmap.NodePublic{}
		}
		if discoKeys[n.DiscoKey] > 1 {
			repairs = append(repairs, fmt.Sprintf("node %d (%s) shared disco key %s with another node: cleared on every holder until the node reports a new one", n.ID, n.Hostname, n.DiscoKey.ShortString()))
			n.DiscoKey = netmap.DiscoPublic{}
		}
		if name := strings.ToLower(n.Hostname); name != "" && kept[name] {
			for i := 1; ; i++ {
				cand := HostnameCandidate(n.Hostname, i)
				if !taken[strings.ToLower(cand)] {
					repairs = append(repairs, fmt.Sprintf("node %d renamed from %q to %q: another node (with a lower id) holds that hostname, and hostnames are unique now", n.ID, n.Hostname, cand))
					n.Hostname = cand
					taken[strings.ToLower(cand)] = true
					break
				}
			}
		}
		kept[strings.ToLower(n.Hostname)] = true
		if err := writeNode(ctx, tx, n); err != nil {
			return nil, err
		}
	}
	if _, err := tx.ExecContext(ctx, `CREATE UNIQUE INDEX nodes_node_key ON nodes (node_key);
		CREATE UNIQUE INDEX nodes_disco_key ON nodes (disco_key);
		CREATE UNIQUE INDEX nodes_hostname ON nodes (hostname);`); err != nil {
		return nil, err
	}
	return repairs, nil
}
