// Package filter is meshd's data-plane packet filter: it judges every packet
// that crosses the tunnel against the rules the policy engine compiled for
// this node (netmap.FilterRule), and keeps the flow state that lets replies
// in. It does no I/O; the agent's TUN wrapper calls it on whole batches.
//
// # Rules: compiled, immutable, swapped atomically
//
// Compile turns []netmap.FilterRule plus the node's own prefixes into a
// Rules value whose lookup never walks the rule list:
//
//   - protocol: an array of 256 entries;
//   - destination port: the policy's port ranges are cut into elementary
//     intervals at compile time; a 64 KiB port index (binary search if a
//     protocol has more than 256 intervals) gives the interval;
//   - destination address: a short mask-compare list (bart trie when there
//     are more than 8 prefixes) whose nested prefixes were merged at compile
//     time, so the longest match carries every source allowed to reach it;
//   - source address: single addresses (most of a tag-based policy) in flat
//     open-addressing hash sets, other prefixes in a mask-compare list or a
//     bart trie.
//
// Cells of identical rule sets and unions of identical source groups are
// built once, so 10,000 rules over tags of thousands of hosts stay small.
// The filter judges packets decoded by package packet: the TUN wrapper
// decodes each packet once for the filter, the peer table and MSS
// clamping, and the filter reads the fields it needs from the
// packet.Parsed (Inbound and Outbound decode for callers that hold only
// bytes). For a packet with ports, the common shape of the rules (a port
// index, a short destination list, source host sets) is read straight
// from those fields by Rules.allows; anything else goes through the
// general lookup. Inbound packets to a local port this node has opened
// flows from (a small bitmap the outbound path fills, never pruned: it
// only orders the two questions) ask the flow table before the rules,
// because they are most likely replies; the verdict is the same in either
// order (TestReplyFirstSameVerdicts).
// The cost per packet is a handful of loads whatever the rule count; see
// BenchmarkFilter and bench/filtercmp. Rules are immutable; a Filter holds
// them in an atomic.Pointer, and a batch is judged by the one Rules value it
// loaded first, so no packet sees half a policy.
//
// # Flow state
//
// Flow state lives in the Filter, not in Rules, so swapping rules never
// loses a flow. Flows are learned from outbound packets only (a peer cannot
// create state by sending), keyed by (protocol, local address and port,
// remote address and port); ICMP echo flows by identifier:
//
//   - an outbound TCP SYN, any first outbound UDP/SCTP packet and ICMP echo
//     request open a flow this node owns: the peer's replies are accepted;
//     other protocols (GRE, ESP, ...) are tracked by protocol and addresses;
//   - an outbound SYN-ACK answers a connection the peer opened: the flow is
//     recorded, but the peer's packets stay judged by the rules in force, so
//     revoking the rule cuts the connection on the next packet;
//   - a flow first seen mid-stream (after a daemon restart or a map swap) is
//     picked up as conntrack's loose mode does: it belongs to the peer if a
//     rule lets the peer open it, otherwise to this node, so a multi-day
//     training job's connections survive a restart;
//   - inbound TCP that matches no rule and no flow of this node is dropped,
//     SYN or not (Tailscale lets every non-SYN packet through); ICMP errors
//     pass only when they quote a packet of a tracked flow (through IPv6
//     extension headers; flows of portless protocols by their addresses).
//     So the "packet too big" the agent itself answers an oversized
//     outbound packet with goes through the inbound path like any other.
//
// FIN or RST shortens a TCP flow's idle timeout to 30 s; idle timeouts are
// otherwise 120 h for TCP (as Linux conntrack), 180 s for UDP, 30 s for ICMP
// echo. They are honoured to within min(1 s, timeout/64): a packet of a
// known flow rewrites the flow's expiry only when it has fallen behind by
// more than that, so nearly every such packet is a pure read.
//
// The flow table is bounded (Options.MaxFlows, 65,536 by default, about 8.5 MiB
// preallocated) and sharded 64 ways by a keyed hash of the whole flow key, each
// shard a fixed array with open addressing, backward-shift deletion and an
// intrusive LRU list: nothing is allocated per packet and there is no global
// lock. Fairness: each remote address may hold at most MaxFlowsPerPeer
// entries (MaxFlows/4 by default, enforced per shard with 25% slack); a
// peer at its quota recycles its own least recently used flow, never
// another peer's. So one peer (or a service that makes this node answer a
// spray of ports) can hold at most about a quarter of the table, and other
// peers' flows are evicted, in LRU order, only when their shard is full.
// The hash seed is random per Filter, so peers cannot aim flows at one
// shard or one probe chain.
//
// A packet of a known flow takes no lock: the shard is read as a seqlock
// (writers hold the shard mutex and make a sequence number odd while they
// change which key a slot or index position holds; a reader that sees it
// odd or changed asks again under the lock), and with the expiry slack
// above it writes nothing, so both cores can read one busy flow without
// trading its cache line. New flows, evictions and state changes (FIN,
// RST, SYN) take the shard lock. A batch remembers the last flow whose
// reply it let in: with GRO, most of a batch is one flow, and its packets
// after the first need no lookup (a FIN or RST always looks up).
//
// Fragments: the first fragment is judged by its ports like any packet;
// when accepted its (source, destination, protocol, IP ID) is remembered
// for 30 s in a separate bounded table, and later fragments pass only if
// they match. Orphan fragments and fragments of dropped datagrams are
// dropped (DropFragment). A first fragment that does not hold the whole
// transport header is malformed.
//
// # Drops
//
// Every drop is counted by direction and Verdict (Stats, shaped for
// `meshd status --json`; the counters share the ring's lock, which a drop
// takes anyway), kept in a ring of the last
// Options.RecentDrops packets (RecentDrops, for `meshd debug drops`) and
// logged through a rate limiter. Malformed packets (short, bad IHL, lying
// lengths, broken IPv4 options, too many or misplaced IPv6 extension
// headers, type-0 routing headers, truncated transport headers: whatever
// packet.Parsed.Decode refuses) are dropped with DropMalformed, never a
// panic; FuzzFilter checks that.
//
// # Outbound
//
// This node's rules describe what it accepts; what a peer accepts is the
// peer's to enforce and is not in this node's map. So the outbound
// direction drops only malformed packets, and learns flows.
//
// # Using it from a TUN wrapper
//
// wireguard-go's tun.Device moves batches: Read(bufs, sizes, offset) for
// packets leaving through the tunnel, Write(bufs, offset) for packets that
// arrived. A wrapper decodes each packet into a packet.Parsed kept beside
// the batch and hands both over:
//
//	f.OutboundBatch(bufs[:n], pp, offset, sizes[:n], time.Now()) // drops get sizes[i] = 0, which wireguard-go skips
//
//	kept := f.InboundBatch(bufs, pp, offset, time.Now()) // compacts bufs and pp in place
//	_, err := dev.Write(kept, offset)
//
// or, to decode and judge each inbound packet in one pass while its
// header is in cache (one Rules and one time for the batch all the same):
//
//	in := f.BeginIn(time.Now())
//	for i, b := range bufs { p := &pp[i]; p.Decode(b[offset:]); v := in.Judge(p, b[offset:]); ... }
//	in.Done(accepted) // adds the batch's accepts to the metrics count
//
// agent/tunwrap is that wrapper.
// The same wrapper serves a kernel TUN and gVisor netstack, which both
// implement tun.Device. With Linux TUN offloads, wireguard-go's tun package
// splits GSO super-packets before Read returns and coalesces after Write,
// so the filter always sees plain IP packets.
package filter
