package control

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
	"unicode"

	"meshd.dev/meshd/control/store"
	"meshd.dev/meshd/netmap"
)

// Bounds on a node's notices: they go out in every map the node gets.
const (
	maxNotices   = 8
	maxNoticeLen = 1024
)

// recheckTags removes, from every node, the tags it gave itself that its
// owner may not hold under pol: under the bootstrap default any tag goes,
// so a policy set later must not inherit what nobody checked. Tags from the
// node's auth key or from `meshd admin nodes tag` are the administrator's
// and stay. Each removal is logged, recorded in the node's notices (its
// map says why) and returned. A nil pol is the bootstrap default, under
// which every tag is allowed.
func (s *Server) recheckTags(ctx context.Context, pol Policy, file string) ([]TagRemoval, error) {
	if pol == nil {
		return nil, nil
	}
	// The scan runs without s.mu; each node is then checked again, fresh
	// from the store, under it.
	nodes, err := s.store.NodesWithSelfTags(ctx)
	if err != nil {
		return nil, fmt.Errorf("re-check node tags: %w", err)
	}
	var out []TagRemoval
	for _, n := range nodes {
		r, err := s.recheckNode(ctx, pol, file, n.ID)
		if err != nil {
			return out, fmt.Errorf("re-check the tags of node %d: %w", n.ID, err)
		}
		if r != nil {
			out = append(out, *r)
		}
	}
	return out, nil
}

func (s *Server) recheckNode(ctx context.Context, pol Policy, file string, id netmap.NodeID) (*TagRemoval, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n, err := s.store.Node(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		return nil, nil // deleted meanwhile
	}
	if err != nil {
		return nil, err
	}
	// The requester is who enrolled the node: the auth key's user, or the
	// key's tags as owners. A node whose key is gone has no owner to vouch
	// for its tags.
	var owner string
	var keyTags []string
	if n.AuthKeyID != "" {
		k, err := s.store.AuthKey(ctx, n.AuthKeyID)
		switch {
		case err == nil:
			owner, keyTags = k.User, k.Tags
		case !errors.Is(err, store.ErrNotFound):
			return nil, err
		}
	}
	var drop, reasons []string
	for _, t := range n.SelfTags {
		if !slices.Contains(n.Tags, t) {
			continue
		}
		if err := pol.CheckTags(owner, keyTags, []string{t}); err != nil {
			drop = append(drop, t)
			reasons = append(reasons, err.Error())
		}
	}
	if len(drop) == 0 {
		return nil, nil
	}
	gone := func(t string) bool { return slices.Contains(drop, t) }
	n.Tags = slices.DeleteFunc(slices.Clone(n.Tags), gone)
	n.SelfTags = slices.DeleteFunc(slices.Clone(n.SelfTags), gone)
	if len(n.Tags) == 0 && owner != "" {
		// No tag left: the device is its user's again, with a user's key
		// expiry, as when it enrols with --advertise-tags= and a user key.
		n.User = owner
		n.KeyExpiry = s.now().UTC().Add(s.opts.NodeKeyExpiry)
	}
	reason := cleanNotice(strings.Join(reasons, "; "))
	n.Notices = addNotice(n.Notices, cleanNotice(fmt.Sprintf("%s removed by policy %s set %s: %s",
		strings.Join(drop, ","), file, s.now().UTC().Format(time.RFC3339), reason)))
	if err := s.store.UpdateNode(ctx, n); err != nil {
		return nil, err
	}
	s.republishLocked(n)
	s.log.Warn("removed tags the node gave itself that its owner may not hold under the policy",
		"node", n.ID, "hostname", n.Hostname, "removed", drop, "owner", owner, "key_tags", keyTags, "policy", file, "reason", reason)
	rm := &TagRemoval{Node: n.ID, Hostname: n.Hostname, Tags: drop, Reason: reason}
	s.audit(ctx, &Actor{Kind: ActorCoordinator}, AuditTagsRemoved, nodeTarget(n.ID), rm)
	return rm, nil
}

// cleanNotice makes text safe to print on the node's terminal: no control
// characters (a user login or file name could carry escape sequences).
func cleanNotice(text string) string {
	text = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return ' '
		}
		return r
	}, text)
	if len(text) > maxNoticeLen {
		text = strings.ToValidUTF8(text[:maxNoticeLen-3], "") + "..."
	}
	return text
}

// addNotice appends a notice, keeping the newest maxNotices.
func addNotice(ns []string, n string) []string {
	ns = append(slices.Clone(ns), n)
	if len(ns) > maxNotices {
		ns = ns[len(ns)-maxNotices:]
	}
	return ns
}
