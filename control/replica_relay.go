package control

import (
	"cmp"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"meshd.dev/meshd/netmap"
)

// Embedded relays of replicas. Each replica started without --derp-map
// runs a relay of its own, and a node uses the first relay node of a
// region. Were every replica to hand out only its own relay, two nodes
// streaming from different replicas would each wait for the other at a
// different server, and relayed traffic between them would be lost. So
// the replicas' embedded relays are the nodes of one region, EmbeddedDERPRegionID,
// in the order the replicas started, and every replica hands out that same
// map: every node uses the oldest live replica's relay. A replica
// announces its relay ("r:NAME:STARTED,DERPPORT,STUNPORT,FINGERPRINT,HOST")
// when it sets it, and again when another replica says hello; a replica
// gone from the database leaves the region at the next liveness check,
// and nodes move to the next relay when the new map reaches them.

// replicaRelay is one replica's embedded relay, as announced.
type replicaRelay struct {
	node    netmap.DERPNode
	started int64 // when the replica started (unix ns): its place in the region
}

func (rr replicaRelay) announcement(name string) string {
	n := rr.node
	return fmt.Sprintf("r:%s:%d,%d,%d,%s,%s", name, rr.started, n.DERPPort, n.STUNPort, n.CertFingerprint, n.Host)
}

// maxRelayHost bounds the host an announcement may name (a DNS name is at
// most 253 bytes).
const maxRelayHost = 253

// parseRelayAnnouncement parses what announcement writes. Announcements
// come from other replicas through the database; one that does not parse
// is ignored.
func parseRelayAnnouncement(msg string) (name string, rr replicaRelay, err error) {
	rest, ok := strings.CutPrefix(msg, "r:")
	if !ok {
		return "", rr, fmt.Errorf("relay announcement %.60q: want r:NAME:...", msg)
	}
	name, fields, ok := strings.Cut(rest, ":")
	if !ok || name == "" {
		return "", rr, fmt.Errorf("relay announcement %.60q: no replica name", msg)
	}
	f := strings.SplitN(fields, ",", 5)
	if len(f) != 5 {
		return "", rr, fmt.Errorf("relay announcement %.60q: want STARTED,DERPPORT,STUNPORT,FINGERPRINT,HOST", msg)
	}
	started, err1 := strconv.ParseInt(f[0], 10, 64)
	derpPort, err2 := strconv.Atoi(f[1])
	stunPort, err3 := strconv.Atoi(f[2])
	if err1 != nil || err2 != nil || err3 != nil {
		return "", rr, fmt.Errorf("relay announcement %.60q: start time and ports must be numbers", msg)
	}
	rr = replicaRelay{started: started, node: netmap.DERPNode{
		Name: name, Host: f[4], DERPPort: derpPort, STUNPort: stunPort, CertFingerprint: f[3],
	}}
	if len(rr.node.Host) > maxRelayHost || strings.ContainsAny(rr.node.Host, " /\x00") {
		return "", rr, fmt.Errorf("relay announcement %.60q: bad host", msg)
	}
	// The region must stay valid with this node in it.
	m := netmap.DERPMap{Regions: []netmap.DERPRegion{{ID: EmbeddedDERPRegionID, Nodes: []netmap.DERPNode{rr.node}}}}
	if err := m.Validate(); err != nil || derpPort == 0 {
		return "", rr, fmt.Errorf("relay announcement %.60q: not a usable relay: %v", msg, err)
	}
	return name, rr, nil
}

// embeddedRegion is the DERP map of the replicas' embedded relays:
// region EmbeddedDERPRegionID, the oldest replica's relay first.
func embeddedRegion(relays map[string]replicaRelay) *netmap.DERPMap {
	names := make([]string, 0, len(relays))
	for name := range relays {
		names = append(names, name)
	}
	slices.SortFunc(names, func(a, b string) int {
		return cmp.Or(cmp.Compare(relays[a].started, relays[b].started), strings.Compare(a, b))
	})
	m := EmbeddedDERPMap("", 0, 0, "")
	m.Regions[0].Nodes = m.Regions[0].Nodes[:0]
	for _, name := range names {
		m.Regions[0].Nodes = append(m.Regions[0].Nodes, relays[name].node)
	}
	return m
}

// setOwnRelay makes this replica's embedded relay a node of the shared
// region and announces it.
func (r *replication) setOwnRelay(n netmap.DERPNode) {
	n.Name = r.name
	r.mu.Lock()
	r.own = &replicaRelay{node: n, started: r.started}
	r.mu.Unlock()
	r.announceRelay()
	r.refreshRelays()
}

// announceRelay announces this replica's embedded relay, if it has one.
func (r *replication) announceRelay() {
	r.mu.Lock()
	own := r.own
	r.mu.Unlock()
	if own == nil {
		return
	}
	if err := r.db.Announce(r.s.ctx, own.announcement(r.name)); err != nil && r.s.ctx.Err() == nil {
		r.s.log.Warn("change feed: announce the embedded relay", "err", err)
	}
}

// relayAnnounced records another replica's embedded relay.
func (r *replication) relayAnnounced(msg string) {
	name, rr, err := parseRelayAnnouncement(msg)
	if err != nil {
		r.s.log.Warn("change feed: ignored an announcement", "err", err)
		return
	}
	if name == r.name {
		return
	}
	r.mu.Lock()
	old, had := r.relays[name]
	r.relays[name] = rr
	r.mu.Unlock()
	if !had || old != rr {
		r.s.log.Info("embedded relay of another replica joins the region", "replica", name, "host", rr.node.Host, "derp_port", rr.node.DERPPort)
		r.refreshRelays()
	}
}

// refreshRelays hands out the region of the live replicas' embedded
// relays, if this replica runs one (otherwise its map is its own to keep).
func (r *replication) refreshRelays() {
	r.mu.Lock()
	if r.own == nil {
		r.mu.Unlock()
		return
	}
	all := make(map[string]replicaRelay, len(r.relays)+1)
	for name, rr := range r.relays {
		all[name] = rr
	}
	all[r.name] = *r.own
	r.mu.Unlock()
	r.s.hub.setDERPMap(embeddedRegion(all))
}

// Replicated reports whether this coordinator is a replica sharing a
// PostgreSQL database with others.
func (s *Server) Replicated() bool { return s.repl != nil }
