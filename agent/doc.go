// Package agent is the per-node daemon: it keeps the node's identity in a
// state dir, registers with the coordinator, follows the network map stream
// and runs a wireguard-go device (over a kernel TUN or gVisor's netstack)
// whose peers come from that map. cmd/meshd serves its methods on the local
// API (package localapi) and offers its Dial through the SOCKS5 and HTTP
// CONNECT proxies (package proxy).
//
// Lifecycle: New loads the state dir (keys, registration, last map) and
// locks it; Run brings the node back up if it was up before (the data plane
// starts from the saved map at once, even with the coordinator down) and
// runs until its context ends; Up registers with an auth key the first time
// and otherwise just starts; Down stops and stays stopped across restarts
// until the next Up. Nothing in the state dir is deleted by a clean stop.
//
// Data plane: one engine per set of own addresses. The engine builds the
// tun.Device (kernel TUN with netlink addresses and routes, or netstack),
// puts the data path wrapper (package tunwrap: the packet filter, fed with
// each map's rules, see filter.go, and the lazy peer table) right on it,
// builds the magic bind (package magicbind: direct UDP when a path answers
// disco pings, the peer's DERP relay otherwise) and configures wireguard-go
// in-process with UAPI text, never a UAPI socket. There is no bind or TUN
// seam: tests run the real bind on loopback. Each new map becomes a minimal UAPI diff: only added, removed or
// changed peers are touched, so sessions of unchanged peers survive.
//
// Kernel routes: the whole 100.64.0.0/10 and the tailnet's IPv6 /48 point
// at the TUN (constant as peers come and go; WireGuard's cryptokey routing
// drops what no peer owns). Accepted subnet routes and an exit node's
// default routes go into meshd's own table behind an ip rule (routes.go,
// router_linux.go; docs/routes.md).
package agent
