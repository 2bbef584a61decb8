package control

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"reflect"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
)

// hub is the in-memory registry of visible nodes and the fan-out of map
// deltas to connected map sessions.
//
// Cost model: a change to one node (join, leave, endpoint or online change)
// is encoded once into a shared frame and enqueued to each session that can
// see the node, so it costs O(sessions affected) with O(1) encoding work,
// never a rebuild of every node's map (which would be O(n²) per change). A
// full map is built only for a session that starts without a usable resume
// point, and costs O(n) for that one session.
type hub struct {
	// policyMu serialises policy changes, which compute outside mu.
	policyMu sync.Mutex

	mu      sync.Mutex
	epoch   string
	version uint64
	nodes   map[netmap.NodeID]*netmap.Node // immutable values, replaced on change
	byKey   map[netmap.NodePublic]netmap.NodeID
	// peerJSON caches each node's JSON as a peer entry, so a full map is
	// assembled by copying bytes instead of encoding n nodes again (which
	// matters when a whole fleet reconnects after a coordinator restart).
	peerJSON  map[netmap.NodeID][]byte
	all       []*netmap.Node // cache for Policy.FilterFor; nil when stale
	sessions  map[netmap.NodeID][]*session
	policy    Policy
	indexer   NodeIndexer // policy's node index, if it keeps one
	capper    PeerCapper  // policy's app capabilities, if it has any
	bootstrap bool
	routes    routeState
	derpMap   *netmap.DERPMap
	queueLen  int
	now       func() time.Time
	keepAlive []byte // the keep-alive frame of this epoch
	// revoked, if set, is told every node key that stops being valid
	// (its node left the hub or took a new key), under mu: it must not
	// block.
	revoked func(netmap.NodePublic)
	// parallelChunk is how many viewers a setPolicy worker takes at a
	// time, and the fewest per worker worth starting one for.
	parallelChunk int
	// sessionsGen counts session opens and closes, so that a policy
	// change can tell whether any happened while it computed.
	sessionsGen uint64
	// filterDelay, if positive, is how long the filter refreshes that
	// joins and leaves cause may wait to be coalesced (refreshFilterLater);
	// afterFunc schedules the flush. Both set once before the hub serves.
	filterDelay time.Duration
	afterFunc   func(time.Duration, func())
	// announceDelay, if positive, is how long a newly registered node
	// that has not opened its map stream is kept from its peers
	// (unannounced); set once before the hub serves.
	announceDelay time.Duration
	unannounced   map[netmap.NodeID]bool
	dirty         map[netmap.NodeID]bool // viewers whose filter refresh waits
	flushArmed    bool
	// frames encodes every frame: the nodes one rule applies to share its
	// source list, formatted once.
	frames controlclient.FrameEncoder
	// srcDiffs remembers the last source diff filter patches were built
	// from (filterPatch).
	srcDiffs srcDiffCache
	// lastPatch is the last filter patch encoded, for patchFrame.
	lastPatch struct {
		with  *lazyFrame
		resp  netmap.MapResponse
		frame []byte
	}
	// keys writes the filter keys sessions' lastFilter hold, remembering
	// shared source lists as frames does.
	keys filterKeyer
	// fanout, if set, is told how long each node change took to queue
	// (metrics.go); set once before the hub serves.
	fanout func(time.Duration)
	// elsewhere, if set, reports whether a node holds a map stream on
	// another coordinator sharing the database: its last stream here
	// closing does not take it offline then. Called under mu: it must
	// not block or call into the hub.
	elsewhere func(netmap.NodeID) bool

	// log records which node changed at each version, for resuming streams
	// (id 0 marks a change that needs a full map, such as a policy change).
	stats struct {
		full, resumed atomic.Int64 // first messages sent, by kind
		peersKept     atomic.Int64 // full maps sent without the peers the node held
		// frames and writes count what map streams sent after their
		// first message: frames, and the socket writes (flushes) that
		// carried them; their ratio is how well bursts are batched.
		frames, writes atomic.Int64
		filterPatches  atomic.Int64 // filters sent as a patch
		// tlsFull and tlsResumed count map streams by their
		// connection's TLS handshake (tickets.go).
		tlsFull, tlsResumed atomic.Int64
	}

	// dns is the name service configuration every full map carries; set
	// once before the hub serves.
	dns netmap.DNSConfig
	// tlsCA is the tailnet CA certificate (DER) every full map carries;
	// set once before the hub serves.
	tlsCA []byte

	log     []change
	logNext int // ring position of the next entry
	logFull bool
}

type change struct {
	version uint64
	id      netmap.NodeID
}

// session is one open map stream.
type session struct {
	node       netmap.NodeID
	q          *frameQueue   // encoded frames, in order
	dead       chan struct{} // closed when the hub drops the session
	dropped    bool
	dropErr    error
	lastFilter []byte // filterKey of the last PacketFilter sent, under a real policy
	// patches: the client applies packet filter patches
	// (netmap.FilterPatchVersion), so a filter whose sources alone changed
	// goes as one.
	patches bool
	// rulePatches: the client's patches may also replace a rule's other
	// fields (netmap.FilterRulePatchVersion), so a policy change that
	// alters ports goes as a patch.
	rulePatches bool
	// filterAt is when a join or leave last refreshed this session's
	// filter at once (refreshFilterLaterLocked).
	filterAt time.Time
}

// errSlowConsumer drops a session whose queue overflowed; the client
// reconnects and resumes, so one slow reader never stalls the coordinator.
var errSlowConsumer = errors.New("map session dropped: client too slow to read updates")

// MaxStreamsPerNode caps the map streams one node holds open at once.
// Beyond it the newest stream wins and the oldest is dropped, as the DERP
// relay does for a key: a node that reconnects before its old connection
// was found dead (a NAT rebinding, a suspended laptop) must get its map at
// once, not be refused until HTTP/2 pings time the old one out. More than
// one is allowed so that such overlaps cost nothing; the cap only stops a
// node (or a stolen machine key) from pinning coordinator memory and
// per-change work with streams.
const MaxStreamsPerNode = 4

// errStreamReplaced drops the oldest map stream of a node that opened more
// than MaxStreamsPerNode.
var errStreamReplaced = fmt.Errorf("map session dropped: the node opened a newer stream and holds at most %d", MaxStreamsPerNode)

const defaultQueueLen = 1024
const changeLogLen = 4096

func newHub(epoch string, derpMap *netmap.DERPMap, queueLen int, now func() time.Time) *hub {
	if queueLen <= 0 {
		queueLen = defaultQueueLen
	}
	h := &hub{
		epoch:     epoch,
		nodes:     make(map[netmap.NodeID]*netmap.Node),
		byKey:     make(map[netmap.NodePublic]netmap.NodeID),
		peerJSON:  make(map[netmap.NodeID][]byte),
		sessions:  make(map[netmap.NodeID][]*session),
		policy:    newBootstrapPolicy(),
		bootstrap: true,
		derpMap:   derpMap,
		dns:       netmap.DNSConfig{Suffix: netmap.DefaultDNSSuffix, SearchDomains: []string{netmap.DefaultDNSSuffix}},
		queueLen:  queueLen,
		now:       now,
		log:       make([]change, changeLogLen),

		parallelChunk: 64,
	}
	h.keepAlive, _ = controlclient.EncodeFrame(&netmap.MapResponse{Epoch: epoch, KeepAlive: true})
	return h
}

func (h *hub) logChange(id netmap.NodeID) {
	h.log[h.logNext] = change{version: h.version, id: id}
	h.logNext++
	if h.logNext == len(h.log) {
		h.logNext, h.logFull = 0, true
	}
}

// changesSince returns the ids changed after version since, and false if
// the log no longer holds all of them.
func (h *hub) changesSince(since uint64) ([]netmap.NodeID, bool) {
	n := h.logNext
	if h.logFull {
		n = len(h.log)
	}
	// Entries are in version order starting at the oldest.
	oldest := 0
	if h.logFull {
		oldest = h.logNext
	}
	if n > 0 && h.log[oldest].version > since+1 {
		return nil, false
	}
	if n == 0 && since != h.version {
		return nil, false
	}
	seen := map[netmap.NodeID]bool{}
	var ids []netmap.NodeID
	for i := 0; i < n; i++ {
		c := h.log[(oldest+i)%len(h.log)]
		if c.version <= since {
			continue
		}
		if c.id == 0 {
			return nil, false
		}
		if !seen[c.id] {
			seen[c.id] = true
			ids = append(ids, c.id)
		}
	}
	return ids, true
}

func (h *hub) base() netmap.MapResponse {
	return netmap.MapResponse{Epoch: h.epoch, Version: h.version, PolicyBootstrap: h.bootstrap}
}

// setDERPMap replaces the DERP map and sends it to every open stream. A
// resuming stream gets a full map afterwards, which carries it.
func (h *hub) setDERPMap(m *netmap.DERPMap) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if derpMapsEqual(h.derpMap, m) {
		return
	}
	h.derpMap = m
	h.version++
	h.logChange(0)
	r := h.base()
	r.DERPMap = m
	f := h.encode(&r)
	for _, ss := range h.sessions {
		for _, s := range ss {
			h.send(s, f)
		}
	}
}

func derpMapsEqual(a, b *netmap.DERPMap) bool {
	if a == nil || b == nil {
		return a == b
	}
	ja, errA := json.Marshal(a)
	jb, errB := json.Marshal(b)
	return errA == nil && errB == nil && bytes.Equal(ja, jb)
}

// lazyFrame encodes a response once, on first use, for every session that
// receives it.
type lazyFrame struct {
	resp netmap.MapResponse
	b    []byte
}

// bytes returns the encoded frame, or nil if it cannot be encoded (only a
// message over MaxMessageSize, which request validation rules out).
func (f *lazyFrame) bytes() []byte {
	if f.b == nil {
		f.b, _ = controlclient.EncodeFrame(&f.resp)
	}
	return f.b
}

// errEncode drops a session whose next message could not be encoded; the
// client reconnects and gets a fresh map rather than silently missing one.
var errEncode = errors.New("map session dropped: could not encode an update")

func (h *hub) send(s *session, frame []byte) {
	if s.dropped {
		return
	}
	if frame == nil {
		h.dropLocked(s, errEncode)
		return
	}
	if !s.q.push(frame) {
		h.dropLocked(s, errSlowConsumer)
	}
}

func (h *hub) dropLocked(s *session, err error) {
	if s.dropped {
		return
	}
	s.dropped, s.dropErr = true, err
	close(s.dead)
}

// get returns the current node (nil if not visible in the hub).
func (h *hub) get(id netmap.NodeID) *netmap.Node {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.nodes[id]
}

// upsert adds or replaces n and sends the delta to the affected sessions. n
// must not be modified afterwards.
func (h *hub) upsert(n *netmap.Node) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.upsertLocked(n)
}

// upsertOneLocked replaces n alone; upsertLocked decides its routes first.
func (h *hub) upsertOneLocked(n *netmap.Node) {
	if h.fanout != nil {
		start := time.Now()
		defer func() { h.fanout(time.Since(start)) }()
	}
	// The name is derived here, not stored, so a new --dns-suffix renames
	// every node at the next start.
	n.DNSName = netmap.DNSName(n.Hostname, h.dns.Suffix)
	old := h.nodes[n.ID]
	h.nodes[n.ID] = n
	// A key is revoked at the relays only by the node that owns it, and
	// never changes owner here: the coordinator refuses a key another node
	// holds before it gets this far, and if that ever failed, the first
	// owner keeps its relay identity rather than the claimant taking it
	// (and later getting it revoked by rotating away from it).
	if old != nil && old.NodeKey != n.NodeKey && h.byKey[old.NodeKey] == n.ID {
		delete(h.byKey, old.NodeKey)
		h.revokeLocked(old.NodeKey)
	}
	if _, held := h.byKey[n.NodeKey]; !held {
		h.byKey[n.NodeKey] = n.ID
	}
	delete(h.peerJSON, n.ID)
	h.all = nil
	// Under an indexing policy the viewers that can see n, before and
	// after, come from the index: a join or an endpoint change then costs
	// the nodes that see it, not a CanSee per open session (which made a
	// join into a 100-node tenant cost 10,000 CanSee calls at 10,000
	// nodes). CanSee is symmetric, so n's peers are its viewers.
	var oldPeers []netmap.NodeID
	pl, indexed := h.policy.(PeerLister)
	indexed = indexed && h.indexer != nil
	if indexed && old != nil {
		oldPeers = pl.Peers(old)
	}
	if h.indexer != nil {
		h.indexer.UpsertNode(n)
	}
	h.version++
	h.logChange(n.ID)
	// A new node is announced to its peers when its stream opens, not at
	// registration a moment before: it can send nothing until it holds
	// its map, and the announcement then carries it online, which saves
	// every peer a frame (the online patch) per join. One that does not
	// stream within announceDelay is announced offline then.
	if h.unannounced[n.ID] {
		delete(h.unannounced, n.ID)
		old, oldPeers = nil, nil // no viewer was told of it
	} else if old == nil && !n.Online && h.announceDelay > 0 && h.afterFunc != nil {
		if h.unannounced == nil {
			h.unannounced = make(map[netmap.NodeID]bool)
		}
		h.unannounced[n.ID] = true
		id := n.ID
		h.afterFunc(h.announceDelay, func() { h.announce(id) })
		return
	}

	var patchF *lazyFrame
	if old != nil {
		if p, ok := patchFor(old, n); ok {
			patchF = &lazyFrame{resp: h.base()}
			patchF.resp.PeersPatch = []netmap.PeerPatch{p}
		}
	}
	changedF := &lazyFrame{resp: h.base()}
	changedF.resp.PeersChanged = []netmap.Node{withCaps(n, nil)}
	removedF := &lazyFrame{resp: h.base()}
	removedF.resp.PeersRemoved = []netmap.NodeID{n.ID}
	// Routes are identity too: a router's primary routes decide which
	// nodes may reach it, and so whom it sees.
	identityChanged := old != nil && patchF == nil && (old.User != n.User || !slices.Equal(old.Tags, n.Tags) || !slices.Equal(old.AllowedIPs, n.AllowedIPs))

	visit := func(id netmap.NodeID, ss []*session, oldVis, newVis bool) {
		viewer := h.nodes[id]
		if viewer == nil {
			return
		}
		var f *lazyFrame
		switch {
		case oldVis && newVis && patchF != nil:
			f = patchF // patched fields never change capabilities
		case newVis:
			f = changedF
			if caps := h.capsLocked(viewer, n); len(caps) > 0 || !usesExit(h.policy, viewer, n) {
				f = &lazyFrame{resp: h.base()}
				f.resp.PeersChanged = []netmap.Node{peerEntry(h.policy, viewer, n, caps)}
			}
		case oldVis:
			f = removedF
		}
		if f != nil {
			// Patched fields (endpoints, DERP home, online, keys) never
			// change a filter.
			switch {
			case identityChanged:
				h.refreshFilterLocked(viewer, ss, f)
			case patchF == nil:
				h.refreshFilterLaterLocked(viewer, ss, f)
			default:
				for _, s := range ss {
					h.send(s, f.bytes())
				}
			}
		}
	}
	if ss := h.sessions[n.ID]; len(ss) > 0 {
		var f []byte
		if !h.bootstrap && identityChanged {
			// Who this node may see depends on its identity: resend its
			// whole map (O(n), for this node only).
			full := h.fullLocked(n)
			f, _ = full.frame() // nil on error: send drops
			key := h.keys.append(nil, *full.resp.PacketFilter)
			for _, s := range ss {
				s.lastFilter = key
			}
		} else {
			r := h.base()
			r.Self = n
			f = h.encode(&r)
		}
		for _, s := range ss {
			h.send(s, f)
		}
		switch {
		case identityChanged:
			h.refreshFilterLocked(n, ss, nil)
		case patchF == nil:
			h.refreshFilterLaterLocked(n, ss, nil)
		}
	}
	if indexed {
		mergeIDs(oldPeers, pl.Peers(n), func(id netmap.NodeID, inOld, inNew bool) {
			if ss := h.sessions[id]; len(ss) > 0 && id != n.ID {
				visit(id, ss, inOld, inNew)
			}
		})
		return
	}
	for id, ss := range h.sessions {
		if id == n.ID {
			continue
		}
		if viewer := h.nodes[id]; viewer != nil {
			visit(id, ss, old != nil && h.policy.CanSee(viewer, old), h.policy.CanSee(viewer, n))
		}
	}
}

// announce tells a node's peers of it if its stream has not yet.
func (h *hub) announce(id netmap.NodeID) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.unannounced[id] {
		return
	}
	if n := h.nodes[id]; n != nil {
		nn := *n // nodes are replaced, never modified in place
		h.upsertOneLocked(&nn)
	}
	delete(h.unannounced, id)
}

// mergeIDs calls fn for each ID in a or b (both ascending), saying which
// of the two hold it.
func mergeIDs(a, b []netmap.NodeID, fn func(id netmap.NodeID, inA, inB bool)) {
	i, j := 0, 0
	for i < len(a) || j < len(b) {
		switch {
		case j == len(b) || i < len(a) && a[i] < b[j]:
			fn(a[i], true, false)
			i++
		case i == len(a) || b[j] < a[i]:
			fn(b[j], false, true)
			j++
		default:
			fn(a[i], true, true)
			i++
			j++
		}
	}
}

func (h *hub) revokeLocked(k netmap.NodePublic) {
	if h.revoked != nil {
		h.revoked(k)
	}
}

// patchFrame encodes filter patch p, in with's frame when with is not nil,
// reusing the last frame it encoded when that said the same: the members of
// a tenant get the same patch for a join (the same rule, the same sources
// from srcDiffs) with the same peer change, and the frame is shared as a
// peer change's is.
func (h *hub) patchFrame(with *lazyFrame, p []netmap.FilterRulePatch) []byte {
	lp := &h.lastPatch
	r := h.base()
	if with != nil {
		r = with.resp
	}
	if lp.frame != nil && lp.with == with && lp.resp.Epoch == r.Epoch && lp.resp.Version == r.Version &&
		lp.resp.PolicyBootstrap == r.PolicyBootstrap && samePatch(lp.resp.PacketFilterPatch, p) {
		return lp.frame
	}
	r.PacketFilterPatch = p
	lp.with, lp.resp, lp.frame = with, r, h.encode(&r)
	return lp.frame
}

// samePatch reports whether a and b are the same patch built from the
// same diff: equal rules with the very same lists, which srcDiffCache
// hands out unchanged.
func samePatch(a, b []netmap.FilterRulePatch) bool {
	same := func(x, y []netip.Prefix) bool {
		return len(x) == len(y) && (len(x) == 0 || &x[0] == &y[0])
	}
	return slices.EqualFunc(a, b, func(x, y netmap.FilterRulePatch) bool {
		return x.Rule == y.Rule && same(x.Add, y.Add) && same(x.Remove, y.Remove)
	})
}

// encode returns r as a frame, or nil (which send turns into a drop).
func (h *hub) encode(r *netmap.MapResponse) []byte {
	b, _ := h.frames.Encode(r)
	return b
}

// remove deletes a node from the hub, tells the sessions that could see it,
// and drops the node's own sessions with reason.
func (h *hub) remove(id netmap.NodeID, reason error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	old := h.nodes[id]
	if old == nil {
		return
	}
	delete(h.nodes, id)
	delete(h.unannounced, id)
	if h.byKey[old.NodeKey] == id {
		delete(h.byKey, old.NodeKey)
		h.revokeLocked(old.NodeKey)
	}
	delete(h.peerJSON, id)
	h.all = nil
	// The viewers come from the index, as in upsertOneLocked, taken
	// before the node leaves it.
	var viewers []netmap.NodeID
	pl, indexed := h.policy.(PeerLister)
	indexed = indexed && h.indexer != nil
	if indexed {
		viewers = pl.Peers(old)
	}
	if h.indexer != nil {
		h.indexer.RemoveNode(id)
	}
	h.version++
	h.logChange(id)
	defer func() {
		delete(h.routes.routers, id)
		delete(h.routes.admin, id)
		h.reelectLocked()
	}()
	removedF := &lazyFrame{resp: h.base()}
	removedF.resp.PeersRemoved = []netmap.NodeID{id}
	for _, s := range h.sessions[id] {
		h.dropLocked(s, reason)
	}
	tell := func(viewer *netmap.Node, ss []*session) {
		h.refreshFilterLaterLocked(viewer, ss, removedF)
	}
	if indexed {
		for _, vid := range viewers {
			if ss := h.sessions[vid]; len(ss) > 0 && vid != id {
				if viewer := h.nodes[vid]; viewer != nil {
					tell(viewer, ss)
				}
			}
		}
		return
	}
	for vid, ss := range h.sessions {
		if vid == id {
			continue
		}
		if viewer := h.nodes[vid]; viewer != nil && h.policy.CanSee(viewer, old) {
			tell(viewer, ss)
		}
	}
}

// allLocked returns every node, cached between changes.
func (h *hub) allLocked() []*netmap.Node {
	if h.all == nil {
		h.all = make([]*netmap.Node, 0, len(h.nodes))
		for _, n := range h.nodes {
			h.all = append(h.all, n)
		}
		slices.SortFunc(h.all, func(a, b *netmap.Node) int { return int(a.ID) - int(b.ID) })
	}
	return h.all
}

func (h *hub) filterFor(n *netmap.Node) []netmap.FilterRule {
	var all []*netmap.Node
	if h.indexer == nil {
		all = h.allLocked()
	}
	f := h.policy.FilterFor(n, all)
	if f == nil {
		f = []netmap.FilterRule{} // non-nil: an empty filter means deny all
	}
	return f
}

// refreshFilterLocked resends n's packet filter to its sessions if it
// changed. A node's filter lists only its own addresses as destinations and
// the nodes that may reach it as sources, so a change to node x can only
// change the filters of nodes that see x (before or after) and of x itself:
// callers refresh just those, keeping a change O(affected) under a real
// policy too. Policy.CanSee must hold whenever either node may reach the
// other, as documented. Under the bootstrap policy filters
// never depend on the node list, so there is nothing to do.
//
// with, when not nil, is a peer change for n's sessions that caused the
// refresh, sent first. A filter patch rides in its frame: a join or leave
// reaches each member of a tenant as one frame, not two to read.
func (h *hub) refreshFilterLocked(n *netmap.Node, ss []*session, with *lazyFrame) {
	if h.bootstrap {
		h.sendAll(ss, with)
		return
	}
	delete(h.dirty, n.ID)
	f := h.filterFor(n)
	b := h.keys.append(nil, f)
	var whole []byte // encoded once for the sessions that need it
	for _, s := range ss {
		if bytes.Equal(b, s.lastFilter) {
			h.sendWith(s, with)
			continue
		}
		if s.patches {
			if p, ok := filterPatch(&h.srcDiffs, s.lastFilter, b, f, s.rulePatches); ok {
				h.stats.filterPatches.Add(1)
				s.lastFilter = b
				h.send(s, h.patchFrame(with, p))
				continue
			}
		}
		h.sendWith(s, with)
		s.lastFilter = b
		if whole == nil {
			r := h.base()
			r.PacketFilter = &f
			whole = h.encode(&r)
		}
		h.send(s, whole)
	}
}

// sendAll sends f, if not nil, to every session of ss.
func (h *hub) sendAll(ss []*session, f *lazyFrame) {
	for _, s := range ss {
		h.sendWith(s, f)
	}
}

// sendWith sends f to s if f is not nil.
func (h *hub) sendWith(s *session, f *lazyFrame) {
	if f != nil {
		h.send(s, f.bytes())
	}
}

// refreshFilterLaterLocked is refreshFilterLocked for the changes whose
// filter updates may be coalesced: joins and leaves. The first such change
// for a viewer in filterDelay updates its filter at once, so that a lone
// join is admitted by its peers before its first packet; further ones in
// that time wait for one update at its end. Under a tenant of k nodes each
// join or leave changes k filters of k sources, and a burst of joins into
// one tenant would otherwise re-encode and resend every member's whole
// filter once per join (O(k²) bytes each), which is what bounded the join
// rate. Waiting never widens access: a joiner is admitted by its peers'
// filters up to filterDelay late, and a leaver's addresses, which stay in
// them as long, belong to no node (addresses are not reused until the pool
// wraps around) and have no WireGuard peer. Changes that can narrow access
// (a node's tags, user or addresses) and policy changes refresh at once.
func (h *hub) refreshFilterLaterLocked(n *netmap.Node, ss []*session, with *lazyFrame) {
	if h.filterDelay <= 0 || h.afterFunc == nil || h.bootstrap {
		h.refreshFilterLocked(n, ss, with)
		return
	}
	if h.dirty[n.ID] {
		h.sendAll(ss, with) // the flush will send the filter
		return
	}
	now := h.now()
	recent := false
	for _, s := range ss {
		recent = recent || now.Sub(s.filterAt) < h.filterDelay
	}
	if !recent {
		for _, s := range ss {
			s.filterAt = now
		}
		h.refreshFilterLocked(n, ss, with)
		return
	}
	if h.dirty == nil {
		h.dirty = make(map[netmap.NodeID]bool)
	}
	h.dirty[n.ID] = true
	h.sendAll(ss, with)
	if !h.flushArmed {
		h.flushArmed = true
		h.afterFunc(h.filterDelay, h.flushFilters)
	}
}

// flushFilters sends the filter refreshes that waited.
func (h *hub) flushFilters() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.flushArmed = false
	now := h.now()
	for id := range h.dirty {
		if n, ss := h.nodes[id], h.sessions[id]; n != nil && len(ss) > 0 {
			for _, s := range ss {
				s.filterAt = now
			}
			h.refreshFilterLocked(n, ss, nil) // deletes id from dirty
		}
	}
	clear(h.dirty)
}

// mapMessage is a map response whose peer list (full maps only) is held as
// cached JSON and spliced in when the frame is built.
type mapMessage struct {
	resp  *netmap.MapResponse
	peers [][]byte
	enc   *controlclient.FrameEncoder // the hub's
}

// frame encodes m as one stream frame.
func (m *mapMessage) frame() ([]byte, error) {
	if len(m.peers) == 0 {
		return m.enc.Encode(m.resp)
	}
	head, err := m.enc.Marshal(m.resp) // resp.Peers is nil: omitted
	if err != nil {
		return nil, err
	}
	size := len(head) + len(`,"peers":[]`) + len(m.peers)
	for _, p := range m.peers {
		size += len(p)
	}
	if size > netmap.MaxMessageSize {
		return nil, fmt.Errorf("map response of %d bytes exceeds the %d byte limit", size, netmap.MaxMessageSize)
	}
	out := make([]byte, controlclient.FrameHeaderLen, controlclient.FrameHeaderLen+size)
	out = append(out, head[:len(head)-1]...) // drop the closing brace
	out = append(out, `,"peers":[`...)
	for i, p := range m.peers {
		if i > 0 {
			out = append(out, ',')
		}
		out = append(out, p...)
	}
	out = append(out, "]}"...)
	binary.BigEndian.PutUint32(out, uint32(len(out)-controlclient.FrameHeaderLen))
	return out, nil
}

// capsLocked returns the capabilities peer holds on viewer under the
// current policy.
func (h *hub) capsLocked(viewer, peer *netmap.Node) map[string][]json.RawMessage {
	if h.capper == nil {
		return nil
	}
	return h.capper.PeerCaps(viewer, peer)
}

// viewerCaps answers what each peer holds on one viewer: from the
// policy's batch answer when it has one and its index is current
// (PeerCapsBatcher), else a PeerCaps call per peer.
type viewerCaps struct {
	capper  PeerCapper
	viewer  *netmap.Node
	batched bool
	ids     []netmap.NodeID // holders, ascending
	caps    []map[string][]json.RawMessage
}

func newViewerCaps(c PeerCapper, indexed bool, viewer *netmap.Node) viewerCaps {
	vc := viewerCaps{capper: c, viewer: viewer}
	if b, ok := c.(PeerCapsBatcher); ok && indexed {
		vc.ids, vc.caps = b.PeerCapsFor(viewer)
		vc.batched = true
	}
	return vc
}

func (vc viewerCaps) of(peer *netmap.Node) map[string][]json.RawMessage {
	if !vc.batched {
		return vc.capper.PeerCaps(vc.viewer, peer)
	}
	if i, ok := slices.BinarySearch(vc.ids, peer.ID); ok {
		return vc.caps[i]
	}
	return nil
}

// withCaps returns n as a peer entry: with the capabilities it holds on
// the receiver, and without its notices, which are for n's own operator.
func withCaps(n *netmap.Node, caps map[string][]json.RawMessage) netmap.Node {
	c := *n
	c.Capabilities = caps
	c.Notices = nil
	return c
}

func (h *hub) peerJSONLocked(n *netmap.Node) []byte {
	b, ok := h.peerJSON[n.ID]
	if !ok {
		b, _ = json.Marshal(withCaps(n, nil)) // a Node always encodes
		h.peerJSON[n.ID] = b
	}
	return b
}

// fullLocked builds n's full map. Only byte-slice references to the cached
// peer entries are collected under the lock; the copying happens in frame.
// Under an indexing policy the peer list comes from its index (PeerLister),
// so a fleet reconnecting after a coordinator restart costs each node its
// own peers, not a CanSee call per node of the tailnet.
func (h *hub) fullLocked(self *netmap.Node) *mapMessage {
	r := h.base()
	r.Full = true
	dns := h.dns
	r.DNS = &dns
	r.TLSCA = h.tlsCA
	sc := *self
	r.Self = &sc
	var peers []*netmap.Node
	if pl, ok := h.policy.(PeerLister); ok && h.indexer != nil {
		for _, id := range pl.Peers(self) {
			if p := h.nodes[id]; p != nil {
				peers = append(peers, p)
			}
		}
	} else {
		peers = make([]*netmap.Node, 0, len(h.nodes))
		for _, p := range h.allLocked() {
			if p.ID != self.ID && h.policy.CanSee(self, p) {
				peers = append(peers, p)
			}
		}
	}
	f := h.filterFor(self)
	r.PacketFilter = &f
	hasCaps := h.capper != nil && filterHasCaps(f) // see PeerCapper
	var vc viewerCaps
	if hasCaps {
		vc = newViewerCaps(h.capper, h.indexer != nil, self)
	}
	m := &mapMessage{resp: &r, peers: make([][]byte, 0, len(peers)), enc: &h.frames}
	for _, p := range peers {
		var caps map[string][]json.RawMessage
		if hasCaps {
			caps = vc.of(p)
		}
		if len(caps) > 0 || !usesExit(h.policy, self, p) {
			// Per-viewer entry: not cacheable.
			b, _ := json.Marshal(peerEntry(h.policy, self, p, caps))
			m.peers = append(m.peers, b)
			continue
		}
		m.peers = append(m.peers, h.peerJSONLocked(p))
	}
	r.DERPMap = h.derpMap
	return m
}

// resumeLocked builds the delta that brings a client at version since (of
// epoch) up to date, or returns nil if it needs a full map.
func (h *hub) resumeLocked(self *netmap.Node, since uint64, epoch string) *mapMessage {
	if epoch != h.epoch || since == 0 || since > h.version {
		return nil
	}
	ids, ok := h.changesSince(since)
	if !ok {
		return nil
	}
	r := h.base()
	for _, id := range ids {
		if id == self.ID {
			sc := *self
			r.Self = &sc
			continue
		}
		if p := h.nodes[id]; p != nil && h.policy.CanSee(self, p) {
			r.PeersChanged = append(r.PeersChanged, peerEntry(h.policy, self, p, h.capsLocked(self, p)))
		} else {
			r.PeersRemoved = append(r.PeersRemoved, id)
		}
	}
	f := h.filterFor(self)
	r.PacketFilter = &f
	return &mapMessage{resp: &r, enc: &h.frames}
}

// subscribe opens a map session for node id, marking it online. The first
// message is returned rather than queued so the caller can encode a large
// full map outside the hub lock.
func (h *hub) subscribe(id netmap.NodeID, version int, since uint64, epoch, peersDigest string) (*session, *mapMessage, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := h.nodes[id]
	if n == nil {
		return nil, nil, controlclient.ErrNotRegistered
	}
	if len(h.sessions[id]) == 0 && !n.Online {
		nn := *n
		nn.Online = true
		h.upsertLocked(&nn)
		n = &nn
	}
	live := 0
	for _, o := range h.sessions[id] {
		if !o.dropped {
			live++
		}
	}
	// Sessions are appended, so the first live ones are the oldest.
	for _, o := range h.sessions[id] {
		if live < MaxStreamsPerNode {
			break
		}
		if !o.dropped {
			h.dropLocked(o, errStreamReplaced)
			live--
		}
	}
	s := &session{node: id, q: newFrameQueue(h.queueLen), dead: make(chan struct{}),
		patches: version >= netmap.FilterPatchVersion, rulePatches: version >= netmap.FilterRulePatchVersion}
	h.sessions[id] = append(h.sessions[id], s)
	h.sessionsGen++
	first := h.resumeLocked(n, since, epoch)
	switch {
	case first != nil:
		h.stats.resumed.Add(1)
	default:
		first = h.fullLocked(n)
		if peersDigest != "" && version >= netmap.PeersKeptVersion && netmap.DigestPeerEntries(first.peers) == peersDigest {
			// The node holds these very entries (from another replica,
			// or before a restart): the rest of the full map is enough.
			first.peers, first.resp.PeersKept = nil, true
			h.stats.peersKept.Add(1)
		} else {
			h.stats.full.Add(1)
		}
	}
	if !h.bootstrap {
		s.lastFilter = h.keys.append(nil, *first.resp.PacketFilter)
	}
	return s, first, nil
}

// unsubscribe ends a session. If it was the node's last, the node goes
// offline and unsubscribe returns the offline node (nil otherwise).
func (h *hub) unsubscribe(s *session) *netmap.Node {
	h.mu.Lock()
	defer h.mu.Unlock()
	ss := h.sessions[s.node]
	i := slices.Index(ss, s)
	if i < 0 {
		return nil
	}
	ss = slices.Delete(ss, i, i+1)
	h.sessionsGen++
	if len(ss) > 0 {
		h.sessions[s.node] = ss
		return nil
	}
	delete(h.sessions, s.node)
	n := h.nodes[s.node]
	if n == nil || h.elsewhere != nil && h.elsewhere(s.node) {
		return nil
	}
	nn := *n
	nn.Online = false
	nn.LastSeen = h.now().UTC().Truncate(time.Second)
	h.upsertLocked(&nn)
	return &nn
}

func (h *hub) nodeKeyKnown(k netmap.NodePublic) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	_, ok := h.byKey[k]
	return ok
}

// expired returns the visible nodes whose key expired by now.
func (h *hub) expired(now time.Time) []netmap.NodeID {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []netmap.NodeID
	for id, n := range h.nodes {
		if !n.KeyExpiry.IsZero() && !now.Before(n.KeyExpiry) {
			out = append(out, id)
		}
	}
	return out
}

// online reports whether node id has an open map session.
func (h *hub) online(id netmap.NodeID) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.sessions[id]) > 0
}

// parallel runs fn(0..n-1) on up to GOMAXPROCS goroutines (serially for
// small n, where starting them costs more than it saves) and returns when
// all calls have. It reads only h.parallelChunk.
func (h *hub) parallel(n int, fn func(i int)) {
	workers := min(runtime.GOMAXPROCS(0), n/h.parallelChunk)
	if workers <= 1 {
		for i := range n {
			fn(i)
		}
		return
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for {
				end := int(next.Add(int64(h.parallelChunk)))
				start := end - h.parallelChunk
				if start >= n {
					return
				}
				for i := start; i < min(end, n); i++ {
					fn(i)
				}
			}
		})
	}
	wg.Wait()
}

// filterHasCaps reports whether a filter grants capabilities: by the
// PeerCapper contract, no peer holds any on a node whose filter has none.
func filterHasCaps(f []netmap.FilterRule) bool {
	for i := range f {
		if len(f[i].CapGrants) > 0 {
			return true
		}
	}
	return false
}

// visible returns the IDs viewer may see under p, sorted, from p's index if
// it has one that is current (indexed), else by a CanSee per node of all
// (sorted by ID).
func visible(p Policy, indexed bool, viewer *netmap.Node, all []*netmap.Node) []netmap.NodeID {
	if pl, ok := p.(PeerLister); ok && indexed {
		return pl.Peers(viewer)
	}
	ids := make([]netmap.NodeID, 0, len(all))
	for _, m := range all {
		if m.ID != viewer.ID && p.CanSee(viewer, m) {
			ids = append(ids, m.ID)
		}
	}
	return ids
}

// connected is the number of nodes with an open map stream.
func (h *hub) connected() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.sessions)
}

// patchFor returns the patch that turns old into n, if they differ only in
// fields a PeerPatch carries.
func patchFor(old, n *netmap.Node) (netmap.PeerPatch, bool) {
	probe := *n
	probe.Endpoints, probe.HomeDERP, probe.Online, probe.LastSeen = old.Endpoints, old.HomeDERP, old.Online, old.LastSeen
	probe.DiscoKey, probe.NodeKey = old.DiscoKey, old.NodeKey
	if !reflect.DeepEqual(&probe, old) {
		return netmap.PeerPatch{}, false
	}
	p := netmap.PeerPatch{ID: n.ID}
	if !slices.Equal(old.Endpoints, n.Endpoints) {
		eps := n.Endpoints
		if eps == nil {
			eps = []netip.AddrPort{}
		}
		p.Endpoints = &eps
	}
	if old.HomeDERP != n.HomeDERP {
		p.HomeDERP = &n.HomeDERP
	}
	if old.Online != n.Online {
		p.Online = &n.Online
	}
	if !old.LastSeen.Equal(n.LastSeen) {
		p.LastSeen = &n.LastSeen
	}
	if old.DiscoKey != n.DiscoKey {
		p.DiscoKey = &n.DiscoKey
	}
	if old.NodeKey != n.NodeKey {
		p.NodeKey = &n.NodeKey
	}
	return p, true
}

func capsEqual(a, b map[string][]json.RawMessage) bool {
	if len(a) != len(b) {
		return false
	}
	for k, av := range a {
		bv, ok := b[k]
		if !ok || len(av) != len(bv) {
			return false
		}
		for i := range av {
			if !bytes.Equal(av[i], bv[i]) {
				return false
			}
		}
	}
	return true
}

// DefaultFilterDelay is ServerOptions.FilterDelay's default: at most ten
// filter updates a second per node from joins and leaves, well inside the
// second a change has to reach the fleet.
const DefaultFilterDelay = 100 * time.Millisecond

// DefaultAnnounceDelay is how long a newly registered node that has not
// opened its map stream waits to be announced to its peers: `meshd up`
// opens it within milliseconds of registering.
const DefaultAnnounceDelay = 2 * time.Second
