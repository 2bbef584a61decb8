// Package netmap holds the wire types shared by the coordinator and the
// agent: nodes, registration, the streamed network map and its deltas, the
// DERP map and compiled packet-filter rules. It has no behaviour beyond
// encoding, validation and applying a delta to a map.
package netmap

import (
	"encoding/json"
	"net/netip"
	"time"
)

// ProtocolVersion is the control protocol version this build speaks. The
// coordinator refuses clients older than MinProtocolVersion with a message
// saying to upgrade, rather than misreading their requests.
//
// Version 2 added node key proofs: from KeyProofVersion on a node proves
// it holds the private half of a node key before the coordinator publishes
// it. Older clients cannot, so the coordinator refuses their registrations
// and node key changes (asking to upgrade) but keeps serving their map
// streams under keys it already knows.
//
// Version 3 added packet filter patches (MapResponse.PacketFilterPatch):
// the coordinator sends them only to clients that speak it, and whole
// filters to older ones, which would ignore a patch.
//
// Version 4 let a filter patch replace a rule's destinations, protocols,
// capability grants and origin (FilterRulePatch): a policy change that
// alters ports reaches such clients as a patch, older ones whole.
//
// Version 5 let a reconnecting node keep its peers: it sends a digest of
// them (MapRequest.PeersDigest), and a coordinator whose full map would
// list the very same entries sends it without them (MapResponse.PeersKept).
const (
	ProtocolVersion        = 5
	MinProtocolVersion     = 1
	KeyProofVersion        = 2
	FilterPatchVersion     = 3
	FilterRulePatchVersion = 4
	PeersKeptVersion       = 5
)

// NodeID identifies a node in the coordinator's registry. It is stable for
// the node's lifetime and never reused.
type NodeID uint64

// Node is one machine in the tailnet as the coordinator describes it to its
// peers and to itself.
type Node struct {
	ID       NodeID `json:"id"`
	Hostname string `json:"hostname"`
	// DNSName is the node's MagicDNS name, HOSTNAME.SUFFIX. with the
	// trailing dot; unique in the tailnet because hostnames are.
	DNSName string `json:"dns_name,omitempty"`
	// OS is the operating system the node reported (Go's GOOS, "linux").
	OS         string        `json:"os,omitempty"`
	User       string        `json:"user,omitempty"` // owner's login; empty for tagged nodes
	Tags       []string      `json:"tags,omitempty"` // sorted, lowercase "tag:x"
	MachineKey MachinePublic `json:"machine_key"`
	NodeKey    NodePublic    `json:"node_key"`
	DiscoKey   DiscoPublic   `json:"disco_key"`
	// Addresses are the node's own tailnet addresses (/32 and /128).
	Addresses []netip.Prefix `json:"addresses"`
	// AllowedIPs are the prefixes routed to this node: its Addresses plus any
	// approved subnet routes.
	AllowedIPs []netip.Prefix `json:"allowed_ips"`
	// Endpoints are candidate UDP addresses (local interfaces, STUN results).
	Endpoints []netip.AddrPort `json:"endpoints,omitempty"`
	HomeDERP  int              `json:"home_derp,omitempty"` // DERP region id, 0 = none
	Online    bool             `json:"online"`
	LastSeen  time.Time        `json:"last_seen,omitzero"`
	Created   time.Time        `json:"created,omitzero"`
	// KeyExpiry is when the node key stops being valid; zero means never
	// (tagged nodes).
	KeyExpiry time.Time `json:"key_expiry,omitzero"`
	Ephemeral bool      `json:"ephemeral,omitempty"`
	// Capabilities granted to this node *as a peer* of the receiving node,
	// compiled from the policy's "app" grants. Keyed by capability name.
	Capabilities map[string][]json.RawMessage `json:"capabilities,omitempty"`
	// AdvertisedRoutes are the prefixes the node offers to route
	// (Hostinfo.RoutableIPs as last reported); 0.0.0.0/0 and ::/0 offer it
	// as an exit node. They route nothing until approved.
	AdvertisedRoutes []netip.Prefix `json:"advertised_routes,omitempty"`
	// ApprovedRoutes are the advertised routes in force: approved by an
	// administrator (`meshd admin routes approve`) or by the policy's
	// autoApprovers. Sorted.
	ApprovedRoutes []netip.Prefix `json:"approved_routes,omitempty"`
	// PrimaryRoutes are the approved routes this node carries now: of the
	// routers approved for one subnet, one online router is primary; the
	// others stand by. Exit routes are every approved exit node's.
	// AllowedIPs holds Addresses plus these.
	PrimaryRoutes []netip.Prefix `json:"primary_routes,omitempty"`
	// Notices are what the coordinator has to tell this node's operator
	// about its identity, such as tags a new policy removed and why
	// (`meshd status` shows them). Only in the node's own entry (Self);
	// peers' entries never carry them.
	Notices []string `json:"notices,omitempty"`
}

// RegisterRequest enrols a machine, or re-registers a known one. It is sent
// over the authenticated control channel, so the machine key is the TLS
// client certificate's and is not repeated here.
type RegisterRequest struct {
	Version  int         `json:"version"`
	NodeKey  NodePublic  `json:"node_key"`
	DiscoKey DiscoPublic `json:"disco_key"`
	// OldNodeKey is set when rotating the node key.
	OldNodeKey NodePublic `json:"old_node_key,omitzero"`
	Hostname   string     `json:"hostname"`
	// OS is the node's operating system (runtime.GOOS), shown by whois.
	OS          string   `json:"os,omitempty"`
	AuthKey     string   `json:"auth_key,omitempty"` // empty when the machine is already registered
	RequestTags []string `json:"request_tags,omitempty"`
	// NodeKeyProof proves the node holds NodeKey's private half (required
	// from KeyProofVersion on).
	NodeKeyProof *NodeKeyProof `json:"node_key_proof,omitempty"`
	// PeersDigest is NetworkMap.PeersDigest of the map the client holds,
	// sent when it reconnects with one: if the stream must start with a
	// full map (another replica, a restarted coordinator) and the peers
	// would be exactly these, they are left out (MapResponse.PeersKept).
	PeersDigest string `json:"peers_digest,omitempty"`
}

// RegisterResponse tells the node who it is.
type RegisterResponse struct {
	Node Node `json:"node"`
	// ServerKey is the coordinator's public key fingerprint that the node
	// should pin for later connections.
	ServerKey string `json:"server_key"`
}

// SetTagsRequest asks the coordinator to replace the tags of the calling
// machine's node, as `meshd up --advertise-tags` does on an enrolled node.
// The machine key (the TLS client certificate) authenticates it; no auth
// key is needed, because the policy's "tagOwners" decide, with the node's
// user or its current tags as the requester. Tags must not be empty: a
// tagged node returns to a user only by registering with that user's key.
type SetTagsRequest struct {
	Version int      `json:"version"`
	Tags    []string `json:"tags"`
}

// SetTagsResponse is the node as it is after a SetTagsRequest.
type SetTagsResponse struct {
	Node Node `json:"node"`
}

// LogoutRequest asks the coordinator to take the calling machine's node
// off the tailnet (`meshd logout`, and an ephemeral node's daemon when it
// shuts down). The machine key (the TLS client certificate) authenticates
// it; NodeKey must be the node's current key, so that a process holding a
// rotated-away key cannot log out the node that replaced it.
type LogoutRequest struct {
	Version int        `json:"version"`
	NodeKey NodePublic `json:"node_key"`
}

// LogoutResponse says what a LogoutRequest did: an ephemeral node is
// deleted at once (Deleted); any other node has its key expired (Expired)
// and must register again with an auth key, keeping its id and addresses.
type LogoutResponse struct {
	NodeID  NodeID `json:"node_id"`
	Deleted bool   `json:"deleted,omitempty"`
	Expired bool   `json:"expired,omitempty"`
}

// MapRequest opens the map stream, or (Stream=false) reports endpoints and
// other node state changes without opening one.
type MapRequest struct {
	Version   int              `json:"version"`
	NodeKey   NodePublic       `json:"node_key"`
	DiscoKey  DiscoPublic      `json:"disco_key"`
	Stream    bool             `json:"stream"`
	Endpoints []netip.AddrPort `json:"endpoints,omitempty"`
	HomeDERP  int              `json:"home_derp,omitempty"`
	// Since is the last map version the client applied. If the coordinator
	// still holds every change after it, the stream starts with those deltas
	// instead of a full map.
	Since uint64 `json:"since,omitempty"`
	// Epoch is the coordinator epoch Since belongs to (a restarted
	// coordinator has a new one and sends a full map).
	Epoch string `json:"epoch,omitempty"`
	// NodeKeyProof proves the node holds NodeKey's private half. Needed
	// only when NodeKey is not the key the coordinator has for the node;
	// ignored otherwise.
	NodeKeyProof *NodeKeyProof `json:"node_key_proof,omitempty"`
	// PeersDigest is NetworkMap.PeersDigest of the map the client holds,
	// sent when it reconnects with one: if the stream must start with a
	// full map (another replica, a restarted coordinator) and the peers
	// would be exactly these, they are left out (MapResponse.PeersKept).
	PeersDigest string `json:"peers_digest,omitempty"`
	// Hostinfo, when non-nil, replaces what the coordinator knows of the
	// node's offers (nil keeps it, so a plain endpoint report never
	// withdraws routes).
	Hostinfo *Hostinfo `json:"hostinfo,omitempty"`
}

// Hostinfo is what a node reports about itself beyond keys and endpoints.
type Hostinfo struct {
	// RoutableIPs are the prefixes the node offers to route for the
	// tailnet (`meshd up --advertise-routes`); 0.0.0.0/0 and ::/0 offer it
	// as an exit node (`--advertise-exit-node`). CheckRoutableIPs says
	// which lists are acceptable.
	RoutableIPs []netip.Prefix `json:"routable_ips"`
}

// ChallengeRequest asks the coordinator for a node key challenge
// (POST /machine/challenge, authenticated by the machine key like every
// machine request).
type ChallengeRequest struct {
	Version int `json:"version"`
}

// Challenge is the coordinator's answer to a ChallengeRequest: what a
// NodeKeyProof must seal, and the key to seal it to. The challenge is
// bound to the asking machine's key and expires within a minute.
type Challenge struct {
	ServerKey ChallengePublic `json:"server_key"`
	Challenge []byte          `json:"challenge"`
	Expires   time.Time       `json:"expires"`
}

// NodeKeyProof shows that its sender holds a node key's private half: a
// NaCl box (X25519, XSalsa20-Poly1305) from the node key to the
// coordinator's ServerKey that seals the machine key and the challenge.
// Only the node key's holder (or the coordinator) can make one, the way a
// relay checks a client in the DERP handshake.
type NodeKeyProof struct {
	Challenge []byte `json:"challenge"`
	Nonce     []byte `json:"nonce"`
	Box       []byte `json:"box"`
}

// MapResponse is one message of the map stream. The first message of a
// stream is either a full map (Full=true: Self, Peers, DERPMap and
// PacketFilter are authoritative) or, when resuming, a delta. Later messages
// are deltas or keep-alives.
type MapResponse struct {
	Epoch     string `json:"epoch"`
	Version   uint64 `json:"version"`
	Full      bool   `json:"full,omitempty"`
	KeepAlive bool   `json:"keep_alive,omitempty"`

	Self *Node `json:"self,omitempty"`

	// Peers is the complete peer list (only when Full).
	Peers []Node `json:"peers,omitempty"`
	// PeersKept, only in a full map without Peers, says that the peer
	// list is exactly the one the client holds, whose digest it sent
	// (MapRequest.PeersDigest): it keeps them, and everything else is
	// replaced as in any full map.
	PeersKept bool `json:"peers_kept,omitempty"`
	// PeersChanged are peers added or replaced whole.
	PeersChanged []Node `json:"peers_changed,omitempty"`
	// PeersRemoved are peers that are gone (deleted or no longer visible).
	PeersRemoved []NodeID `json:"peers_removed,omitempty"`
	// PeersPatch are small in-place changes (endpoints, DERP home, online).
	PeersPatch []PeerPatch `json:"peers_patch,omitempty"`

	DERPMap *DERPMap `json:"derp_map,omitempty"`
	// DNS replaces the node's name service configuration when non-nil
	// (always in a full map).
	DNS *DNSConfig `json:"dns,omitempty"`
	// PacketFilter replaces the node's inbound filter when non-nil. An empty
	// non-nil slice means deny all inbound.
	PacketFilter *[]FilterRule `json:"packet_filter,omitempty"`
	// PacketFilterPatch changes rules of the filter the stream holds (the
	// last PacketFilter, with any patches since), sent instead of
	// PacketFilter when the rules stay as many: to clients from
	// FilterPatchVersion on when only sources changed, from
	// FilterRulePatchVersion on when other fields did too
	// (FilterRulePatch). Never with PacketFilter.
	PacketFilterPatch []FilterRulePatch `json:"packet_filter_patch,omitempty"`
	// PolicyBootstrap reports that no policy is loaded and the coordinator's
	// allow-all default is in force.
	PolicyBootstrap bool `json:"policy_bootstrap,omitempty"`
	// TLSCA replaces the tailnet CA certificate (DER) when non-nil: the CA
	// that signs nodes' TLS certificates for their DNS names
	// (POST /machine/cert), name-constrained to the DNS suffix and the
	// tailnet's address ranges. Always in a full map from a coordinator
	// that runs one; nodes learn it only over the pinned control channel.
	TLSCA []byte `json:"tls_ca,omitempty"`
}

// PeerPatch changes some fields of a peer already in the map; nil fields are
// unchanged. Patches keep endpoint churn cheap: a few dozen bytes per peer
// instead of a whole Node.
type PeerPatch struct {
	ID        NodeID            `json:"id"`
	Endpoints *[]netip.AddrPort `json:"endpoints,omitempty"`
	HomeDERP  *int              `json:"home_derp,omitempty"`
	Online    *bool             `json:"online,omitempty"`
	LastSeen  *time.Time        `json:"last_seen,omitempty"`
	DiscoKey  *DiscoPublic      `json:"disco_key,omitempty"`
	NodeKey   *NodePublic       `json:"node_key,omitempty"`
}

// DERPMap lists the relay regions nodes may use.
type DERPMap struct {
	Regions []DERPRegion `json:"regions"`
}

// DERPRegion is a set of DERP servers that mesh with each other.
type DERPRegion struct {
	ID    int        `json:"id"`
	Code  string     `json:"code"`
	Name  string     `json:"name,omitempty"`
	Nodes []DERPNode `json:"nodes"`
}

// DERPNode is one relay server.
type DERPNode struct {
	Name     string `json:"name"`
	Host     string `json:"host"` // hostname or IP literal
	DERPPort int    `json:"derp_port"`
	STUNPort int    `json:"stun_port,omitempty"` // 0: no STUN; -1: disabled
	STUNOnly bool   `json:"stun_only,omitempty"`
	// CertFingerprint pins the relay's TLS certificate (hex SHA-256 of the
	// SubjectPublicKeyInfo) for relays with self-signed certificates, such as
	// the coordinator's embedded one.
	CertFingerprint string `json:"cert_fingerprint,omitempty"`
}

// FilterRule is one compiled packet-filter rule for traffic arriving at a
// node: packets from SrcIPs to any of DstPorts, with a protocol in IPProto,
// may open a flow. Return traffic is allowed by the filter's flow state, not
// by rules.
type FilterRule struct {
	SrcIPs   []netip.Prefix `json:"src_ips"`
	DstPorts []NetPortRange `json:"dst_ports"`
	// IPProto lists IANA protocol numbers. Empty means TCP, UDP, ICMPv4 and
	// ICMPv6, as in Tailscale.
	IPProto []uint8 `json:"ip_proto,omitempty"`
	// CapGrants carries "app" grants: capabilities the destination grants to
	// the sources. They match no packets.
	CapGrants []CapGrant `json:"cap_grants,omitempty"`
	// Origin names the policy rule this was compiled from (file:line), for
	// explaining drops and accepts.
	Origin string `json:"origin,omitempty"`
}

// NetPortRange is a destination prefix and port range.
type NetPortRange struct {
	Net   netip.Prefix `json:"net"`
	Ports PortRange    `json:"ports"`
}

// PortRange is an inclusive range of ports; {0, 65535} is every port.
type PortRange struct {
	First uint16 `json:"first"`
	Last  uint16 `json:"last"`
}

// AllPorts is every port.
var AllPorts = PortRange{First: 0, Last: 65535}

// CapGrant grants capabilities on destinations Dsts.
type CapGrant struct {
	Dsts []netip.Prefix               `json:"dsts"`
	Caps map[string][]json.RawMessage `json:"caps"`
}

// IANA protocol numbers used by filter rules.
const (
	ProtoICMPv4 uint8 = 1
	ProtoTCP    uint8 = 6
	ProtoUDP    uint8 = 17
	ProtoICMPv6 uint8 = 58
	ProtoSCTP   uint8 = 132
)
