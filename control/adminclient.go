package control

import (
	"context"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
)

// AdminClient talks to the coordinator's admin API.
type AdminClient struct {
	base  *url.URL
	token string
	hc    *http.Client
}

// NewAdminClient returns an admin client for the coordinator at rawURL.
// The token (the content of admin.token) carries the coordinator's
// fingerprint, which the client pins.
func NewAdminClient(rawURL, token string) (*AdminClient, error) {
	u, err := controlclient.ParseURL(rawURL)
	if err != nil {
		return nil, err
	}
	token = strings.TrimSpace(token)
	fp, err := controlclient.AdminTokenFingerprint(token)
	if err != nil {
		return nil, err
	}
	return &AdminClient{base: u, token: token, hc: &http.Client{Transport: controlclient.PinnedTransport(fp), Timeout: 30 * time.Second}}, nil
}

func (a *AdminClient) do(ctx context.Context, method, path string, in, out any) error {
	return controlclient.DoJSON(ctx, a.hc, method, a.base.JoinPath(path).String(), a.token, in, out, nil)
}

// CreateAuthKey creates a key; the result includes the secret.
func (a *AdminClient) CreateAuthKey(ctx context.Context, o AuthKeyOptions) (NewAuthKey, error) {
	var out NewAuthKey
	req := createKeyRequest{Reusable: o.Reusable, Ephemeral: o.Ephemeral, Preauthorized: o.Preauthorized, Tags: o.Tags, User: o.User}
	if o.Expiry != 0 {
		req.Expiry = o.Expiry.String()
	}
	err := a.do(ctx, http.MethodPost, "/admin/v1/keys", req, &out)
	return out, err
}

// AuthKeys lists auth keys.
func (a *AdminClient) AuthKeys(ctx context.Context) ([]AuthKey, error) {
	var out []AuthKey
	return out, a.do(ctx, http.MethodGet, "/admin/v1/keys", nil, &out)
}

// RevokeAuthKey revokes a key.
func (a *AdminClient) RevokeAuthKey(ctx context.Context, id string) error {
	return a.do(ctx, http.MethodPost, "/admin/v1/keys/"+url.PathEscape(id)+"/revoke", nil, nil)
}

// Nodes lists nodes.
func (a *AdminClient) Nodes(ctx context.Context) ([]NodeInfo, error) {
	var out []NodeInfo
	return out, a.do(ctx, http.MethodGet, "/admin/v1/nodes", nil, &out)
}

func nodePath(id netmap.NodeID) string {
	return "/admin/v1/nodes/" + strconv.FormatUint(uint64(id), 10)
}

// DeleteNode deletes a node.
func (a *AdminClient) DeleteNode(ctx context.Context, id netmap.NodeID) error {
	return a.do(ctx, http.MethodDelete, nodePath(id), nil, nil)
}

// ExpireNode expires a node's key now.
func (a *AdminClient) ExpireNode(ctx context.Context, id netmap.NodeID) error {
	return a.do(ctx, http.MethodPost, nodePath(id)+"/expire", nil, nil)
}

// ApproveNode authorizes a node waiting for approval.
func (a *AdminClient) ApproveNode(ctx context.Context, id netmap.NodeID) error {
	return a.do(ctx, http.MethodPost, nodePath(id)+"/approve", nil, nil)
}

// TagNode replaces a node's tags.
func (a *AdminClient) TagNode(ctx context.Context, id netmap.NodeID, tags []string) error {
	return a.do(ctx, http.MethodPost, nodePath(id)+"/tags", tagRequest{Tags: tags}, nil)
}

// UntagNode returns a node to user: it loses its tags and gets a user's key
// expiry.
func (a *AdminClient) UntagNode(ctx context.Context, id netmap.NodeID, user string) error {
	return a.do(ctx, http.MethodPost, nodePath(id)+"/tags", tagRequest{User: user}, nil)
}

// Users lists users.
func (a *AdminClient) Users(ctx context.Context) ([]User, error) {
	var out []User
	return out, a.do(ctx, http.MethodGet, "/admin/v1/users", nil, &out)
}

// SSHChecks lists the check-mode SSH logins waiting for approval.
func (a *AdminClient) SSHChecks(ctx context.Context) ([]netmap.SSHApproval, error) {
	var out []netmap.SSHApproval
	return out, a.do(ctx, http.MethodGet, "/admin/v1/ssh/checks", nil, &out)
}

// ApproveSSH approves a waiting check-mode SSH login.
func (a *AdminClient) ApproveSSH(ctx context.Context, id string) error {
	return a.do(ctx, http.MethodPost, "/admin/v1/ssh/checks/"+url.PathEscape(id)+"/approve", nil, nil)
}

// Routes lists every node's advertised, approved and primary routes.
func (a *AdminClient) Routes(ctx context.Context) ([]RouteInfo, error) {
	var out []RouteInfo
	return out, a.do(ctx, http.MethodGet, "/admin/v1/routes", nil, &out)
}

// ApproveRoute approves an advertised route of a node.
func (a *AdminClient) ApproveRoute(ctx context.Context, id netmap.NodeID, p netip.Prefix) error {
	return a.do(ctx, http.MethodPost, nodePath(id)+"/routes/approve", routeRequest{Route: p.String()}, nil)
}

// RejectRoute withdraws an administrator's approval of a node's route.
func (a *AdminClient) RejectRoute(ctx context.Context, id netmap.NodeID, p netip.Prefix) error {
	return a.do(ctx, http.MethodPost, nodePath(id)+"/routes/reject", routeRequest{Route: p.String()}, nil)
}
