package agent

import (
	"errors"
	"fmt"
	"strings"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
)

// defaultControlClient builds the real coordinator client.
func defaultControlClient(c ControlConfig) (ControlClient, error) {
	cl, err := controlclient.NewClient(controlclient.ClientOptions{URL: c.URL, MachineKey: c.MachineKey, ServerPin: c.ServerPin, NodeKey: c.NodeKey, Logger: c.Logger, DialContext: c.DialContext})
	if err != nil {
		return nil, fmt.Errorf("coordinator %s: %w", c.URL, err)
	}
	return cl, nil
}

// explainControlError turns a registration failure into a one-line error
// saying what to do.
func explainControlError(url string, err error) error {
	var hint string
	switch {
	case errors.Is(err, controlclient.ErrAuthKeyUnknown):
		hint = "check the key, or create one with `meshd admin keys create`"
	case errors.Is(err, controlclient.ErrAuthKeyExpired):
		hint = "create a new key with `meshd admin keys create`"
	case errors.Is(err, controlclient.ErrAuthKeyUsed):
		hint = "single-use keys work once; create a new one, or use --reusable"
	case errors.Is(err, controlclient.ErrAuthKeyRevoked):
		hint = "the key was revoked; create a new one"
	case errors.Is(err, controlclient.ErrPinMismatch):
		hint = "the coordinator's key is not the one this auth key or state dir expects; check --coordinator (possible interception)"
	case errors.Is(err, controlclient.ErrNotRegistered), errors.Is(err, controlclient.ErrNodeExpired):
		hint = "the coordinator removed or expired this node; run meshd up --authkey KEY to enrol it again"
	case errors.Is(err, controlclient.ErrTagsForbidden):
		hint = "the auth key may not apply those tags; drop --advertise-tags or use a key that carries them"
	case errors.Is(err, controlclient.ErrKeyInUse):
		hint = "another node in the tailnet holds this node's WireGuard or disco key, and no two nodes may share one: if this state dir was copied from another machine, start this node with a fresh --state-dir; otherwise ask the administrator to check `meshd admin nodes list`"
	case errors.Is(err, controlclient.ErrKeyProof):
		hint = "the coordinator publishes a node key only with proof that the node holds it, and this node could not give it: check that identity.json in the state dir is intact, or start with a fresh --state-dir"
	case errors.Is(err, controlclient.ErrTooOld):
		hint = "this meshd is older than the coordinator accepts: upgrade meshd on this node"
	default:
		hint = "check --coordinator and that the coordinator is running and reachable"
	}
	// The client's errors already name the coordinator.
	return fmt.Errorf("%w (%s)", err, hint)
}

// explainRetagError turns a refused re-tag into a one-line error saying
// what to do.
func explainRetagError(url string, id netmap.NodeID, tags []string, err error) error {
	if errors.Is(err, controlclient.ErrTagsForbidden) {
		return fmt.Errorf("%w (the policy's tagOwners decide which tags this node may take by itself; an admin may apply them: meshd admin nodes tag %d %s)",
			err, id, strings.Join(tags, ","))
	}
	return explainControlError(url, err)
}

// waitingApproval reports whether the coordinator refused the node because
// it waits for an admin's approval.
func waitingApproval(err error) bool { return errors.Is(err, controlclient.ErrNotAuthorized) }

// needsReauth reports whether the control loop ended because the
// coordinator no longer accepts this node, so that an auth key given to
// `meshd up` should be used to enrol it again.
func needsReauth(err error) bool {
	return errors.Is(err, controlclient.ErrNotRegistered) || errors.Is(err, controlclient.ErrNodeExpired)
}
