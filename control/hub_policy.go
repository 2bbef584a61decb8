package control

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
)

// setPolicy swaps the policy and sends every session the visibility and
// filter changes. Each viewer's old and new peer sets come from the
// policies' own index when they have one (PeerLister, e.g. policy.Engine:
// the rules touching the viewer plus the size of the answer) and from a
// CanSee per node otherwise; the two sorted sets are then merged. When the
// two policies provably connect the same pairs (VisibilityKeyer: a change
// of ports or protocols), no peer set is listed at all unless capabilities
// or exit nodes need one. Capabilities are asked for only for viewers
// whose filter, under the old or the new policy, carries CapGrants: see
// PeerCapper; the old filters are not computed when the old policy grants
// none (CapabilityGranter). A filter that changed goes as a patch to
// sessions that take one (netmap.FilterRulePatch). The per-viewer work
// runs on every CPU (policies are safe for concurrent use).
//
// That work is done outside h.mu, against a snapshot of the nodes and
// sessions: joins, leaves and endpoint updates carry on under the old
// policy meanwhile instead of waiting for the whole tailnet's recompute.
// The swap, under h.mu, then sends what was computed and reconciles what
// changed since the snapshot (reconcileLocked), so that every session ends
// up where a recompute under the lock would have left it.
func (h *hub) setPolicy(p Policy) {
	h.policyMu.Lock()
	defer h.policyMu.Unlock()
	snap := h.snapshotForPolicy()
	next := policyState{policy: p}
	if p == nil {
		next.policy, next.bootstrap = newBootstrapPolicy(), true
	}
	next.indexer, _ = p.(NodeIndexer)
	next.capper, _ = p.(PeerCapper)
	updates := h.computePolicyUpdates(snap, next)

	h.mu.Lock()
	defer h.mu.Unlock()
	h.policy, h.bootstrap, h.indexer, h.capper = next.policy, next.bootstrap, next.indexer, next.capper
	h.version++
	h.logChange(0) // resuming across a policy change needs a full map
	h.reconcileLocked(snap, updates)
	h.reapproveLocked()
}

// policyState is the policy part of the hub.
type policyState struct {
	policy    Policy
	bootstrap bool
	indexer   NodeIndexer
	capper    PeerCapper
}

// policySnapshot is what setPolicy computes against, taken under h.mu.
type policySnapshot struct {
	old         policyState
	version     uint64
	sessionsGen uint64
	all         []*netmap.Node  // sorted by ID; never modified (allLocked makes a new slice)
	ids         []netmap.NodeID // all's IDs: searched without touching every node on the way
	viewers     []*netmap.Node  // nodes with open sessions
	// sent[i] is the filter key every session of viewers[i] was last sent,
	// or nil if they differ.
	sent [][]byte
	// rules[i]: every session of viewers[i] takes patches of a rule's
	// fields other than its sources (netmap.FilterRulePatchVersion).
	rules []bool
}

func (h *hub) snapshotForPolicy() *policySnapshot {
	h.mu.Lock()
	defer h.mu.Unlock()
	s := &policySnapshot{
		old:         policyState{policy: h.policy, bootstrap: h.bootstrap, indexer: h.indexer, capper: h.capper},
		version:     h.version,
		sessionsGen: h.sessionsGen,
		all:         h.allLocked(),
		viewers:     make([]*netmap.Node, 0, len(h.sessions)),
	}
	s.ids = make([]netmap.NodeID, len(s.all))
	for i, n := range s.all {
		s.ids[i] = n.ID
	}
	for id, ss := range h.sessions {
		v := h.nodes[id]
		if v == nil {
			continue
		}
		s.viewers = append(s.viewers, v)
		var key []byte
		rules := true
		for i, sess := range ss {
			rules = rules && sess.rulePatches
			if i == 0 {
				key = sess.lastFilter
			} else if !bytes.Equal(key, sess.lastFilter) {
				key = nil
			}
		}
		s.sent = append(s.sent, key)
		s.rules = append(s.rules, rules)
	}
	return s
}

// node returns the snapshot's node id, or nil.
func (s *policySnapshot) node(id netmap.NodeID) *netmap.Node {
	i, ok := slices.BinarySearch(s.ids, id)
	if !ok {
		return nil
	}
	return s.all[i]
}

// policyUpdate is what one viewer is sent for a policy change. Only the
// encoded frame is kept, not the response: a policy change that adds many
// peers to every node would otherwise hold every node's entries at once.
type policyUpdate struct {
	// frame is the update encoded for the snapshot's version + 1. It is
	// nil when the encoding failed (the sessions are then dropped and
	// resume with a full map), or when same and the sessions held the
	// filter already: then filter is kept, to send it after all if they
	// no longer do.
	frame  []byte
	filter []netmap.FilterRule
	key    []byte // filterKey of the new filter
	same   bool   // nothing changed but maybe the filter
	// patchOf, when not nil, is the filter key frame's filter patch
	// applies to: frame then changes nothing but the filter, and filter is
	// kept for the sessions that no longer hold that key.
	patchOf []byte
	// changed are the IDs in the update's PeersChanged, ascending: their
	// entries are the snapshot's, which reconcileLocked may have to bring
	// up to date.
	changed []netmap.NodeID
}

// computePolicyUpdates works out, without h.mu, each viewer's update from
// the old policy to next over the snapshot. next's index (if any) is set to
// the snapshot's nodes; it is not in use by anyone else yet.
//
// The old policy's index is the hub's live one, which joins and leaves keep
// changing meanwhile: it may answer for a node that changed since the
// snapshot. reconcileLocked resends every such node, so those answers do
// not matter; for all other pairs the live index and the snapshot agree.
func (h *hub) computePolicyUpdates(snap *policySnapshot, next policyState) []policyUpdate {
	old := snap.old
	type before struct {
		peers []netmap.NodeID
		caps  bool // the old filter grants capabilities to someone
	}
	was := make([]before, len(snap.viewers))
	var oldAll []*netmap.Node
	if old.indexer == nil {
		oldAll = snap.all
	}
	// sameVis: no peer list can change, so the old ones are the new ones
	// (a change of ports, the common edit, by far). oldGrants: the old
	// filters may hold capabilities, which the peer entries carry.
	sameVis := !old.bootstrap && !next.bootstrap && sameVisibility(old.policy, next.policy)
	oldGrants := old.capper != nil && grantsCapabilities(old.policy)
	if !sameVis || oldGrants {
		h.parallel(len(snap.viewers), func(i int) {
			v := snap.viewers[i]
			if !sameVis {
				was[i].peers = visible(old.policy, old.indexer != nil, v, snap.all)
			}
			was[i].caps = oldGrants && filterHasCaps(old.policy.FilterFor(v, oldAll))
		})
	}
	if next.indexer != nil {
		next.indexer.SetNodes(snap.all)
	}
	var newAll []*netmap.Node
	if next.indexer == nil {
		newAll = snap.all
	}
	base := netmap.MapResponse{Epoch: h.epoch, Version: snap.version + 1, PolicyBootstrap: next.bootstrap}
	// The exit nodes, ascending: a viewer's entry of one changes when the
	// policy changes whether the viewer may use it (ExitUser).
	var exits []netmap.NodeID
	for _, n := range snap.all {
		if isExitPeer(n) {
			exits = append(exits, n.ID)
		}
	}
	updates := make([]policyUpdate, len(snap.viewers))
	h.parallel(len(snap.viewers), func(i int) {
		viewer := snap.viewers[i]
		f := next.policy.FilterFor(viewer, newAll)
		if f == nil {
			f = []netmap.FilterRule{} // as filterFor: empty means deny all
		}
		newCaps := next.capper != nil && filterHasCaps(f)
		oldCaps := was[i].caps
		var is []netmap.NodeID
		if !sameVis || oldCaps || newCaps || len(exits) > 0 {
			is = visible(next.policy, next.indexer != nil, viewer, snap.all)
		}
		wasIDs := was[i].peers
		if sameVis {
			wasIDs = is // every peer stays: only capabilities and exit use may change
		}
		var oldVC, newVC viewerCaps
		if oldCaps {
			oldVC = newViewerCaps(old.capper, old.indexer != nil, viewer)
		}
		if newCaps {
			newVC = newViewerCaps(next.capper, next.indexer != nil, viewer)
		}
		u := &updates[i]
		r := base
		a, b, c := 0, 0, 0
		for a < len(wasIDs) || b < len(is) {
			switch {
			case b == len(is) || a < len(wasIDs) && wasIDs[a] < is[b]:
				r.PeersRemoved = append(r.PeersRemoved, wasIDs[a])
				a++
			case a == len(wasIDs) || is[b] < wasIDs[a]:
				if m := snap.node(is[b]); m != nil {
					var caps map[string][]json.RawMessage
					if newCaps {
						caps = newVC.of(m)
					}
					r.PeersChanged = append(r.PeersChanged, peerEntry(next.policy, viewer, m, caps))
				}
				b++
			default: // visible before and after: only capabilities and exit node use may change
				for c < len(exits) && exits[c] < is[b] {
					c++
				}
				exitPeer := c < len(exits) && exits[c] == is[b]
				if !oldCaps && !newCaps && !exitPeer {
					// Nothing to look up: the common case, by far.
				} else if m := snap.node(is[b]); m != nil {
					var oc, nc map[string][]json.RawMessage
					if oldCaps {
						oc = oldVC.of(m)
					}
					if newCaps {
						nc = newVC.of(m)
					}
					if !capsEqual(oc, nc) || exitPeer && usesExit(old.policy, viewer, m) != usesExit(next.policy, viewer, m) {
						r.PeersChanged = append(r.PeersChanged, peerEntry(next.policy, viewer, m, nc))
					}
				}
				a++
				b++
			}
		}
		for _, m := range r.PeersChanged {
			u.changed = append(u.changed, m.ID)
		}
		r.PacketFilter = &f
		u.key = h.keys.append(nil, f)
		u.same = old.bootstrap == next.bootstrap && len(r.PeersChanged) == 0 && len(r.PeersRemoved) == 0
		switch {
		case u.same && bytes.Equal(snap.sent[i], u.key):
			u.filter = f
		case u.same && !old.bootstrap && !next.bootstrap && snap.rules[i] && snap.sent[i] != nil:
			// Only the filter changed, and every session holds the one
			// keyed sent[i]: a patch of the rules that changed (a port
			// change in a tenant of 100 is ~350 bytes, not 5 KB).
			if p, ok := filterPatch(nil, snap.sent[i], u.key, f, true); ok {
				r.PacketFilter, r.PacketFilterPatch = nil, p
				u.patchOf, u.filter = snap.sent[i], f
			}
			u.frame = h.encode(&r)
		default:
			u.frame = h.encode(&r)
		}
	})
	return updates
}

// reconcileLocked sends the computed updates and then whatever changed
// since the snapshot, under the new policy. h.mu held, the new policy in
// force.
//
// A session's state before this is the old policy's view of the current
// nodes: the snapshot's view plus every change made since, sent as it
// happened. CanSee and the capabilities are functions of the two nodes, so
// an update computed over the snapshot is right for every pair of nodes
// that did not change since. What remains:
//   - sessions of nodes that were not viewers then, or whose own identity
//     changed since, get a full map under the new policy;
//   - every node that changed since is sent again to each viewer as the
//     new policy has it (or removed), and the filters of the viewers that
//     see it before or after are refreshed; a change of patched fields only
//     (endpoints, online, keys) changes no visibility or filter, but an
//     update may have listed the node with its snapshot fields, and is
//     followed by the patch.
func (h *hub) reconcileLocked(snap *policySnapshot, updates []policyUpdate) {
	var changed []netmap.NodeID // IDs added, removed or replaced since the snapshot
	if h.version != snap.version+1 {
		for _, n := range snap.all {
			if h.nodes[n.ID] != n {
				changed = append(changed, n.ID)
			}
		}
		for id := range h.nodes {
			if snap.node(id) == nil {
				changed = append(changed, id)
			}
		}
		slices.Sort(changed)
	}
	if h.indexer != nil {
		for _, id := range changed {
			if n := h.nodes[id]; n != nil {
				h.indexer.UpsertNode(n)
			} else {
				h.indexer.RemoveNode(id)
			}
		}
	}
	// Each changed node's frames, encoded once for every viewer: its
	// patch if only patched fields changed, else its entry and its removal.
	type resend struct {
		patch, entry, removed *lazyFrame
	}
	frames := make(map[netmap.NodeID]*resend, len(changed))
	moved := make(map[netmap.NodeID]bool) // changed beyond patched fields
	for _, id := range changed {
		was, cur := snap.node(id), h.nodes[id]
		rs := &resend{}
		frames[id] = rs
		if was != nil && cur != nil {
			if p, ok := patchFor(was, cur); ok {
				rs.patch = &lazyFrame{resp: h.base()}
				rs.patch.resp.PeersPatch = []netmap.PeerPatch{p}
				continue
			}
		}
		moved[id] = true
		if cur != nil {
			rs.entry = &lazyFrame{resp: h.base()}
			rs.entry.resp.PeersChanged = []netmap.Node{withCaps(cur, nil)}
		}
		rs.removed = &lazyFrame{resp: h.base()}
		rs.removed.resp.PeersRemoved = []netmap.NodeID{id}
	}

	// Sessions that get a full map instead of the computed update: those
	// of nodes whose identity changed, and those opened since.
	full := make(map[netmap.NodeID]bool, len(moved))
	for id := range moved {
		if len(h.sessions[id]) > 0 {
			full[id] = true
		}
	}
	if h.sessionsGen != snap.sessionsGen {
		viewed := make(map[netmap.NodeID]bool, len(snap.viewers))
		for _, v := range snap.viewers {
			viewed[v.ID] = true
		}
		for id := range h.sessions {
			if !viewed[id] {
				full[id] = true
			}
		}
	}
	for id := range full {
		n := h.nodes[id]
		if n == nil {
			continue
		}
		m := h.fullLocked(n)
		f, _ := m.frame() // nil on error: send drops
		key := h.keys.append(nil, *m.resp.PacketFilter)
		for _, s := range h.sessions[id] {
			s.lastFilter = key
			h.send(s, f)
		}
	}

	for i, viewer := range snap.viewers {
		if full[viewer.ID] {
			continue
		}
		ss := h.sessions[viewer.ID]
		if len(ss) == 0 {
			continue
		}
		u := &updates[i]
		var frame, whole []byte
		for _, s := range ss {
			if u.same && bytes.Equal(s.lastFilter, u.key) {
				continue // nothing this node sees changed: send nothing
			}
			if u.patchOf != nil && (!s.rulePatches || !bytes.Equal(s.lastFilter, u.patchOf)) {
				// The patch does not fit what this session holds now (a
				// join changed its filter since the snapshot): the filter
				// whole, which is all the update carries.
				if whole == nil {
					r := h.base()
					r.PacketFilter = &u.filter
					whole = h.encode(&r)
				}
				s.lastFilter = u.key
				h.send(s, whole)
				continue
			}
			if frame == nil {
				frame = h.versionedFrame(u, snap.version)
			}
			if u.patchOf != nil {
				h.stats.filterPatches.Add(1)
			}
			s.lastFilter = u.key
			h.send(s, frame)
		}
		if len(changed) == 0 {
			continue
		}
		refresh := false
		for _, id := range changed {
			if id == viewer.ID {
				continue // its own patched fields: nothing to say as a peer
			}
			rs := frames[id]
			_, listed := slices.BinarySearch(u.changed, id)
			if rs.patch != nil {
				if listed { // else the session has its current fields already, or not the node
					for _, s := range ss {
						h.send(s, rs.patch.bytes())
					}
				}
				continue
			}
			was, cur := snap.node(id), h.nodes[id]
			newVis := cur != nil && h.policy.CanSee(viewer, cur)
			var f []byte
			switch {
			case newVis:
				f = rs.entry.bytes()
				if caps := h.capsLocked(viewer, cur); len(caps) > 0 || !usesExit(h.policy, viewer, cur) {
					r := h.base()
					r.PeersChanged = []netmap.Node{peerEntry(h.policy, viewer, cur, caps)}
					f = h.encode(&r)
				}
			case listed || cur != nil && snap.old.policy.CanSee(viewer, cur):
				// The session may hold it: from the update, or from the
				// change itself, sent under the old policy.
				f = rs.removed.bytes()
			}
			if f != nil {
				for _, s := range ss {
					h.send(s, f)
				}
			}
			refresh = refresh || newVis || was != nil && h.policy.CanSee(viewer, was)
		}
		if refresh {
			h.refreshFilterLocked(viewer, ss, nil)
		}
	}
}

// versionedFrame returns u's frame carrying the hub's current version: the
// frame was encoded before the swap, for the version the swap would have
// had if nothing had changed meanwhile (snapVersion + 1).
func (h *hub) versionedFrame(u *policyUpdate, snapVersion uint64) []byte {
	switch {
	case u.frame != nil && snapVersion+1 == h.version:
		return u.frame
	case u.frame != nil:
		return spliceVersion(u.frame, h.epoch, snapVersion+1, h.version) // nil (a drop) if it cannot
	case u.same:
		// Skipped as unneeded, but a session's filter changed meanwhile.
		r := h.base()
		r.PacketFilter = &u.filter
		return h.encode(&r)
	}
	return nil // the encoding failed: send drops the session
}

// spliceVersion returns frame (a MapResponse frame of epoch at version
// from) at version to, or nil if it does not start as expected. It saves
// encoding the whole response again under the hub lock: the version is
// the second field, right after the epoch.
func spliceVersion(frame []byte, epoch string, from, to uint64) []byte {
	head := fmt.Appendf(nil, `{"epoch":%s,"version":`, strconv.Quote(epoch))
	old := strconv.AppendUint(nil, from, 10)
	body := frame[controlclient.FrameHeaderLen:]
	if !bytes.HasPrefix(body, head) || !bytes.HasPrefix(body[len(head):], old) {
		return nil
	}
	rest := body[len(head)+len(old):]
	if len(rest) == 0 || rest[0] != ',' && rest[0] != '}' {
		return nil
	}
	out := make([]byte, controlclient.FrameHeaderLen, len(frame)+20)
	out = append(out, head...)
	out = strconv.AppendUint(out, to, 10)
	out = append(out, rest...)
	if len(out)-controlclient.FrameHeaderLen > netmap.MaxMessageSize {
		return nil
	}
	binary.BigEndian.PutUint32(out, uint32(len(out)-controlclient.FrameHeaderLen))
	return out
}
