package magicbind

import "meshd.dev/meshd/netmap"

// Key is the node key of the endpoint's peer: every packet the bind hands
// WireGuard carries its sender's Endpoint, so a layer above the bind can
// attribute received packets to peers without a lookup by address.
func (e *Endpoint) Key() netmap.NodePublic { return e.p.key }
