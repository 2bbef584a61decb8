package control

import (
	"context"
	"errors"
	"fmt"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/control/store"
	"meshd.dev/meshd/netmap"
)

// logout takes machine mk's node off the tailnet on its own request. An
// ephemeral node is deleted at once, as its ephemeral timeout would have
// done later: its peers get one removal instead of an offline patch now
// and a removal at the timeout, and its hostname is free for the next
// node at once (a sidecar's replacement pod). Any other node keeps its
// id and addresses but has its key expired, as `meshd admin nodes expire`
// does: it leaves every map and comes back only with an auth key.
func (s *Server) logout(ctx context.Context, mk netmap.MachinePublic, req netmap.LogoutRequest) (*netmap.LogoutResponse, error) {
	if err := checkVersion(req.Version); err != nil {
		return nil, err
	}
	if req.NodeKey.IsZero() {
		return nil, fmt.Errorf("%w: node_key is missing", controlclient.ErrBadRequest)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	n, err := s.store.NodeByMachine(ctx, mk)
	if errors.Is(err, store.ErrNotFound) {
		return nil, fmt.Errorf("%w: this machine has no node (never enrolled, or deleted already): nothing to log out", controlclient.ErrNotRegistered)
	}
	if err != nil {
		return nil, err
	}
	if n.NodeKey != req.NodeKey {
		return nil, fmt.Errorf("%w: node key %s is not node %d's current key: only the node's own current key logs it out", controlclient.ErrBadRequest, req.NodeKey.ShortString(), n.ID)
	}
	actor := NodeActor(&n.Node)
	if n.Ephemeral {
		if err := s.deleteNodeLocked(ctx, n.ID, &actor, map[string]string{"reason": "logout"}); err != nil {
			return nil, err
		}
		s.log.Info("ephemeral node deleted on logout", "node", n.ID)
		return &netmap.LogoutResponse{NodeID: n.ID, Deleted: true}, nil
	}
	now := s.now().UTC()
	if !n.KeyExpiry.IsZero() && !now.Before(n.KeyExpiry) {
		return nil, fmt.Errorf("%w: node %d's key expired already at %s: it is logged out", controlclient.ErrNodeExpired, n.ID, n.KeyExpiry.Format(time.RFC3339))
	}
	n.KeyExpiry = now
	if err := s.store.UpdateNode(ctx, n); err != nil {
		return nil, err
	}
	s.hub.remove(n.ID, controlclient.ErrNodeExpired)
	s.log.Info("node logged out: key expired", "node", n.ID)
	s.audit(ctx, &actor, AuditNodeExpire, nodeTarget(n.ID), map[string]string{"reason": "logout"})
	return &netmap.LogoutResponse{NodeID: n.ID, Expired: true}, nil
}
