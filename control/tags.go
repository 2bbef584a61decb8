package control

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
)

// registrationTags returns the tags of a node registering with an auth key
// carrying keyTags and advertising requested (both normalized, and
// requested already allowed by CheckTags). When the key's tags own every
// requested tag in "tagOwners", the requested tags replace the key's: the
// key is an enrolment identity (a tenant's provisioning tag) and the node
// becomes what it asked to be. Otherwise the key's tags are carried and the
// requested ones join them.
func registrationTags(pol Policy, keyTags, requested []string) []string {
	if o, ok := pol.(TagOwnership); ok && len(keyTags) > 0 && o.OwnedByTags(keyTags, requested) {
		return slices.Clone(requested)
	}
	return slices.Compact(slices.Sorted(slices.Values(append(slices.Clone(keyTags), requested...))))
}

// setTags replaces the tags of machine mk's node on the node's own request
// (`meshd up --advertise-tags` on an enrolled node). The requester is the
// node's user, or its current tags through "tagOwners" with tags as
// owners; the new tags replace the old ones. Under the bootstrap default
// (no policy, so no owners) a node cannot re-tag itself. Like admin tagging, the node
// then is a tagged node: no user and no key expiry. It keeps its id and
// addresses. A request for no tags is refused: a tagged node returns to a
// user only by registering with that user's auth key.
func (s *Server) setTags(ctx context.Context, mk netmap.MachinePublic, req netmap.SetTagsRequest) (*netmap.SetTagsResponse, error) {
	if err := checkVersion(req.Version); err != nil {
		return nil, err
	}
	if len(req.Tags) > 64 {
		return nil, fmt.Errorf("%w: %d tags, at most 64", controlclient.ErrBadRequest, len(req.Tags))
	}
	tags, err := netmap.NormalizeTags(req.Tags)
	if err != nil {
		return nil, fmt.Errorf("%w: requested tags: %v", controlclient.ErrBadRequest, err)
	}
	if len(tags) == 0 {
		return nil, fmt.Errorf("%w: a node cannot drop all its tags by itself: register it again with a user's auth key (meshd up --force-reauth --authkey KEY --advertise-tags=)", controlclient.ErrBadRequest)
	}
	pol := s.policy()
	s.mu.Lock()
	defer s.mu.Unlock()
	n, err := s.nodeForMap(ctx, mk)
	if err != nil {
		return nil, err
	}
	if _, ok := pol.(bootstrapPolicy); ok && !slices.Equal(n.Tags, tags) {
		// The allow-all default has no tagOwners, so nobody owns a tag:
		// letting any node take any tag by itself would be a new way to
		// fail open (registration under the default is the admin's key).
		return nil, fmt.Errorf("%w: no policy is loaded, so no tag has owners a node could re-tag itself with: set a policy whose \"tagOwners\" give the tags to the node's user or tags, or ask an admin (meshd admin nodes tag %d %s)",
			controlclient.ErrTagsForbidden, n.ID, strings.Join(tags, ","))
	}
	if !slices.Equal(n.Tags, tags) {
		if err := pol.CheckTags(n.User, n.Tags, tags); err != nil {
			return nil, fmt.Errorf("%w: node %d may not take these tags: %v", controlclient.ErrTagsForbidden, n.ID, err)
		}
		old := n.Tags
		n.Tags, n.User, n.KeyExpiry = tags, "", time.Time{}
		// The node asked for these itself: a later policy re-checks them.
		n.SelfTags, n.Notices = slices.Clone(tags), nil
		if err := s.store.UpdateNode(ctx, n); err != nil {
			return nil, err
		}
		s.republishLocked(n)
		s.log.Info("node re-tagged itself", "node", n.ID, "old", old, "new", tags)
		actor := NodeActor(&n.Node)
		s.audit(ctx, &actor, AuditNodeTags, nodeTarget(n.ID), auditChange{Before: map[string][]string{"tags": old}, After: map[string][]string{"tags": tags}})
	}
	wn := n.Node
	if cur := s.hub.get(n.ID); cur != nil {
		wn = *cur
	}
	return &netmap.SetTagsResponse{Node: wn}, nil
}
