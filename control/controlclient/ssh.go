package controlclient

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	"meshd.dev/meshd/netmap"
)

// The coordinator endpoints a node's SSH server asks (docs/ssh.md).
const (
	SSHAuthorizePath = "/machine/ssh/authorize"
	SSHWaitPath      = "/machine/ssh/wait"
	SSHSessionPath   = "/machine/ssh/session"
)

// SSHAuthorize asks the coordinator whether the node at req.CallerAddr
// may log in to this node as req.LocalUser.
func (c *Client) SSHAuthorize(ctx context.Context, req netmap.SSHAuthRequest) (*netmap.SSHAuthResponse, error) {
	if req.Version == 0 {
		req.Version = netmap.ProtocolVersion
	}
	var resp netmap.SSHAuthResponse
	err := c.do(ctx, SSHAuthorizePath, req, &resp)
	if ae, ok := errors.AsType[*APIError](err); ok && ae.Status == http.StatusNotFound && ae.Code == "" {
		return nil, fmt.Errorf("ssh authorization from %s: the coordinator does not know SSH: upgrade it", c.base().Host)
	}
	if err != nil {
		return nil, fmt.Errorf("ssh authorization from %s: %w", c.base().Host, err)
	}
	return &resp, nil
}

// SSHWait waits (up to about 25 s per call) for an admin to approve the
// check-mode login checkID.
func (c *Client) SSHWait(ctx context.Context, checkID string) (*netmap.SSHWaitResponse, error) {
	var resp netmap.SSHWaitResponse
	if err := c.do(ctx, SSHWaitPath, netmap.SSHWaitRequest{Version: netmap.ProtocolVersion, CheckID: checkID}, &resp); err != nil {
		return nil, fmt.Errorf("ssh approval from %s: %w", c.base().Host, err)
	}
	return &resp, nil
}

// SSHSessionEnd reports that an SSH session on this node ended, for the
// coordinator's audit log. The coordinator rate-limits reports per node
// (ErrRateLimited).
func (c *Client) SSHSessionEnd(ctx context.Context, end netmap.SSHSessionEnd) error {
	if end.Version == 0 {
		end.Version = netmap.ProtocolVersion
	}
	if err := c.do(ctx, SSHSessionPath, end, &struct{}{}); err != nil {
		return fmt.Errorf("ssh session report to %s: %w", c.base().Host, err)
	}
	return nil
}
