// Package policy is the tailnet policy engine: huJSON in, a validated
// Policy out, compiled per node into inbound packet-filter rules, peer
// visibility and "app" capabilities. It is pure: no network, no disk, no
// goroutines. An Engine is safe for concurrent use, and its queries that
// only read the node index (Peers, PeerCapsFor, FilterFor given no node
// list) run in parallel.
//
// The file format is the one Tailscale users write (sections "groups",
// "hosts", "tagOwners", "acls", "grants", "tests", "ssh", "autoApprovers",
// "nodeAttrs"), so policies carry over where the features exist. Section
// and field names match in any case, as Tailscale's parser matches them.
// Unknown sections and fields are errors rather than silently ignored,
// Tailscale constructs meshd lacks are refused with what to use instead or
// accepted with a warning (README.md lists each), and every problem is
// reported at the FILE:LINE:COL of the offending value. "ssh" is
// enforced by the coordinator at each login (docs/ssh.md) and
// "autoApprovers" by the coordinator's route approval
// (Engine.AutoApproves). "nodeAttrs" is validated but not enforced yet: Lint
// warns about each one present, naming its line, so that nobody takes such
// a rule for one in force.
//
// Use:
//
//	p, err := policy.Parse("policy.hujson", data) // validates and runs "tests"
//	e := policy.NewEngine(p)                     // or policy.NewEngine(policy.Bootstrap())
//	e.SetNodes(all)                              // then UpsertNode / RemoveNode
//	rules := e.FilterFor(n, nil)                 // inbound rules for n
//	peers := e.Peers(n)                          // whom n may see
//	caps := e.PeerCaps(n, peer)                  // peer's capabilities on n
//	byPeer := e.PeerCapsFor(n)                   // every peer's, in one call
//
// Semantics worth knowing:
//
//   - Deny by default; a rule lets src open flows to dst (return traffic is
//     the filter's flow state). "acls" and "grants" compile to the same rules.
//   - A tagged node is a service identity: user, group and autogroup:member
//     selectors never match it, even if the coordinator kept the enrolling
//     user on record.
//   - Tags and groups are case-insensitive (lowercased); user logins too.
//   - autogroup:admin may appear only in "tagOwners". meshd has no admin
//     devices, so it grants no user anything: such tags are applied through
//     the admin API or by auth keys an admin created with them (CheckTags).
//   - "tests" are evaluated against the policy alone: a user stands for one
//     untagged device of theirs, a tag for a device carrying only that tag,
//     a group for each member (an accept passes only if every member
//     passes); autogroup:self as a destination is another device of the
//     source's user; a destination names one port; no proto means TCP.
//   - autogroup:self is a destination only, and only of rules whose
//     sources are all users (a user, a group, autogroup:member).
//   - autogroup:internet (a destination of acls and grants) is exit node
//     use: on exit nodes it compiles to the internet less the private,
//     tailnet and link-local ranges; "*" does not include it (as in
//     Tailscale), and UsesExit says which clients get an exit node's
//     default routes. A grant's "via" (tags) limits its routed
//     destinations to the routers carrying those tags.
//   - Without any policy, Bootstrap is Tailscale's default: everything
//     reaches everything. Lint flags a file equivalent to it as a wide rule.
package policy
