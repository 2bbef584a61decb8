package control

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"testing/synctest"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
)

func TestFilterPatch(t *testing.T) {
	dst := []netmap.NetPortRange{{Net: netip.MustParsePrefix("100.64.0.1/32"), Ports: netmap.AllPorts}}
	srcs := func(n int, skip ...int) []netip.Prefix {
		var out []netip.Prefix
		for i := 2; i < 2+n; i++ {
			if !slices.Contains(skip, i) {
				out = append(out, netip.PrefixFrom(netip.AddrFrom4([4]byte{100, 64, 0, byte(i)}), 32))
			}
		}
		return out
	}
	rule := func(s []netip.Prefix) netmap.FilterRule {
		return netmap.FilterRule{SrcIPs: s, DstPorts: dst, Origin: "policy.hujson:3"}
	}
	dst22 := []netmap.NetPortRange{{Net: dst[0].Net, Ports: netmap.PortRange{First: 22, Last: 22}}}
	// patch: a client of netmap.FilterPatchVersion is sent a patch;
	// rulePatch: one of netmap.FilterRulePatchVersion is.
	tests := []struct {
		name             string
		from, to         []netmap.FilterRule
		patch, rulePatch bool
	}{
		{name: "a join", from: []netmap.FilterRule{rule(srcs(20, 7))}, to: []netmap.FilterRule{rule(srcs(20))}, patch: true, rulePatch: true},
		{name: "a leave", from: []netmap.FilterRule{rule(srcs(20))}, to: []netmap.FilterRule{rule(srcs(20, 7))}, patch: true, rulePatch: true},
		{name: "second rule only", from: []netmap.FilterRule{rule(srcs(5)), rule(srcs(20))}, to: []netmap.FilterRule{rule(srcs(5)), rule(srcs(21))}, patch: true, rulePatch: true},
		{name: "the same", from: []netmap.FilterRule{rule(srcs(20))}, to: []netmap.FilterRule{rule(srcs(20))}},
		{name: "a rule more", from: []netmap.FilterRule{rule(srcs(20))}, to: []netmap.FilterRule{rule(srcs(20)), rule(srcs(2))}},
		{name: "ports and sources changed", from: []netmap.FilterRule{rule(srcs(20))},
			to: []netmap.FilterRule{{SrcIPs: srcs(21), DstPorts: dst22, Origin: "policy.hujson:3"}}, rulePatch: true},
		{name: "ports changed", from: []netmap.FilterRule{rule(srcs(20)), rule(srcs(5))},
			to: []netmap.FilterRule{rule(srcs(20)), {SrcIPs: srcs(5), DstPorts: dst22, Origin: "policy.hujson:3"}}, rulePatch: true},
		{name: "ports emptied", from: []netmap.FilterRule{rule(srcs(20))},
			to: []netmap.FilterRule{{SrcIPs: srcs(20), Origin: "policy.hujson:3"}}, rulePatch: true},
		{name: "origin changed", from: []netmap.FilterRule{rule(srcs(20))}, to: []netmap.FilterRule{{SrcIPs: srcs(21), DstPorts: dst, Origin: "policy.hujson:4"}}, rulePatch: true},
		{name: "protocols set", from: []netmap.FilterRule{rule(srcs(20))},
			to: []netmap.FilterRule{{SrcIPs: srcs(20), DstPorts: dst, IPProto: []uint8{6}, Origin: "policy.hujson:3"}}, rulePatch: true},
		{name: "protocols cleared", from: []netmap.FilterRule{{SrcIPs: srcs(20), DstPorts: dst, IPProto: []uint8{6, 17}, Origin: "policy.hujson:3"}},
			to: []netmap.FilterRule{rule(srcs(20))}, rulePatch: true},
		{name: "capabilities granted", from: []netmap.FilterRule{rule(srcs(20))},
			to: []netmap.FilterRule{{SrcIPs: srcs(20), DstPorts: dst, Origin: "policy.hujson:3",
				CapGrants: []netmap.CapGrant{{Dsts: []netip.Prefix{dst[0].Net}, Caps: map[string][]json.RawMessage{"example.com/cap/x": {json.RawMessage(`{"a":1}`)}}}}}}, rulePatch: true},
		{name: "most sources changed", from: []netmap.FilterRule{rule(srcs(20))}, to: []netmap.FilterRule{rule(srcs(4))}},
		{name: "unsorted new sources", from: []netmap.FilterRule{rule(srcs(3))}, to: []netmap.FilterRule{rule(append(srcs(3), srcs(1)...))}},
		{name: "unsorted old sources", from: []netmap.FilterRule{rule(slices.Concat(srcs(20, 2), srcs(1)))}, to: []netmap.FilterRule{rule(srcs(20))}},
	}
	for _, tt := range tests {
		for _, rules := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/rules=%v", tt.name, rules), func(t *testing.T) {
				want := tt.patch
				if rules {
					want = tt.rulePatch
				}
				oldKey, newKey := filterKey(nil, tt.from), filterKey(nil, tt.to)
				p, ok := filterPatch(nil, oldKey, newKey, tt.to, rules)
				if ok != want {
					t.Fatalf("patch = %v (%+v); want %v", ok, p, want)
				}
				if !ok {
					return
				}
				// Through JSON, as a node gets it.
				wire, err := controlclient.MarshalResponse(&netmap.MapResponse{Epoch: "e", PacketFilterPatch: p})
				if err != nil {
					t.Fatal(err)
				}
				resp, err := netmap.DecodeMapResponse(wire)
				if err != nil {
					t.Fatal(err)
				}
				if err := resp.Validate(); err != nil {
					t.Fatalf("patch %s: %v", wire, err)
				}
				got, err := netmap.ApplyFilterPatch(tt.from, resp.PacketFilterPatch)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(filterKey(nil, got), newKey) {
					t.Fatalf("patched filter %+v; want %+v", got, tt.to)
				}
				whole, _ := controlclient.MarshalResponse(&netmap.MapResponse{Epoch: "e", PacketFilter: &tt.to})
				limit := 4 // sources alone: a few of many
				if !tt.patch {
					limit = 2 // another field whole: smaller still
				}
				if limit*len(wire) > len(whole) {
					t.Fatalf("patch of %d bytes for a filter of %d: %s", len(wire), len(whole), wire)
				}
			})
		}
	}
}

// FuzzFilterPatch: whenever the coordinator chooses a patch, a node
// applying it to the old filter holds exactly the new one; and no key, even
// made-up bytes, makes the patch builder panic.
func FuzzFilterPatch(f *testing.F) {
	f.Add([]byte{2, 4, 9}, []byte{2, 3, 4, 9}, uint8(0))
	f.Add([]byte{1, 2, 3, 4, 5, 6, 7, 8}, []byte{1, 2, 3, 5, 6, 7, 8, 200}, uint8(1))
	f.Add([]byte{5, 4}, []byte{4, 5}, uint8(2))
	f.Add([]byte{2, 4, 9}, []byte{2, 4, 9}, uint8(8|16))
	f.Add([]byte{2, 4, 9}, []byte{2, 3, 4, 9}, uint8(16))
	f.Fuzz(func(t *testing.T, a, b []byte, mode uint8) {
		// Sources from bytes: IPv4 below 128, IPv6 from 128, bits from the
		// mode so that one address may appear with two lengths.
		srcs := func(bs []byte) []netip.Prefix {
			var out []netip.Prefix
			for i, x := range bs {
				if x < 128 {
					bits := 32
					if mode&4 != 0 && i%3 == 0 {
						bits = 24
					}
					out = append(out, netip.PrefixFrom(netip.AddrFrom4([4]byte{100, 64, x, 0}), bits).Masked())
				} else {
					out = append(out, netip.PrefixFrom(netip.AddrFrom16([16]byte{0: 0xfd, 15: x}), 128))
				}
			}
			if mode&1 == 0 {
				slices.SortFunc(out, netmap.ComparePrefix)
				out = slices.Compact(out)
			}
			return out
		}
		dst := []netmap.NetPortRange{{Net: netip.MustParsePrefix("100.64.0.1/32"), Ports: netmap.AllPorts}}
		rules := mode&8 != 0
		toDst := dst
		if mode&16 != 0 { // another port: only a rule patch can say it
			toDst = []netmap.NetPortRange{{Net: dst[0].Net, Ports: netmap.PortRange{First: uint16(len(a)), Last: 443}}}
		}
		from := []netmap.FilterRule{{SrcIPs: srcs(a), DstPorts: dst}}
		to := []netmap.FilterRule{{SrcIPs: srcs(b), DstPorts: toDst}}
		if mode&2 != 0 {
			from = append(from, netmap.FilterRule{SrcIPs: srcs(b), DstPorts: dst})
			to = append(to, netmap.FilterRule{SrcIPs: srcs(a), DstPorts: dst})
		}
		oldKey, newKey := filterKey(nil, from), filterKey(nil, to)
		var c srcDiffCache
		// Twice through one cache: the second answer is the remembered one.
		p0, ok0 := filterPatch(&c, oldKey, newKey, to, rules)
		if p, ok := filterPatch(&c, oldKey, newKey, to, rules); ok != ok0 || string(mustMarshal(t, p)) != string(mustMarshal(t, p0)) {
			t.Fatalf("from the cache: %v %+v; computed %v %+v", ok, p, ok0, p0)
		}
		if p, ok := filterPatch(nil, oldKey, newKey, to, rules); ok {
			if !rules && !slices.Equal(dst, toDst) {
				t.Fatalf("a patch of the ports for a client that cannot apply it: %s", mustMarshal(t, p))
			}
			got, err := netmap.ApplyFilterPatch(from, p)
			if err != nil {
				t.Fatalf("a chosen patch does not apply: %v (%+v)", err, p)
			}
			if !bytes.Equal(filterKey(nil, got), newKey) {
				t.Fatalf("patched %+v; want %+v", got, to)
			}
		}
		// Garbage where the old key should be: no panic, and a patch only
		// if it parses as a key.
		junk := append(binary.AppendUvarint(nil, 1), a...)
		filterPatch(&c, junk, newKey, to, rules)
		filterPatch(&c, a, newKey, to, rules)
	})
}

// TestFilterPatchesPerClientVersion: a join into a tenant reaches members
// streaming with protocol 3 or 4 as a patch of their filter's sources and
// one streaming with protocol 2 as its whole filter; a policy change that
// changes ports reaches protocol 4 as a patch and the others whole; all
// end with the filter of a full map.
func TestFilterPatchesPerClientVersion(t *testing.T) {
	const pol = `{"tagOwners": {"tag:a": [], "tag:b": []},
		"grants": [{"src": ["tag:a"], "dst": ["tag:a"], "ip": ["*"]}, {"src": ["tag:b"], "dst": ["tag:a"], "ip": ["tcp:22"]}]}`
	h := newHub("e1", nil, 0, nil)
	h.setPolicy(mustEngine(t, pol))
	for id := netmap.NodeID(1); id <= 20; id++ {
		h.upsert(hubNode(id, "tag:a"))
	}
	h.upsert(hubNode(21, "tag:b"))
	type client struct {
		s       *session
		m       *netmap.NetworkMap
		id      netmap.NodeID
		version int
	}
	var cs []*client
	for _, c := range []struct {
		id netmap.NodeID
		v  int
	}{{1, netmap.ProtocolVersion}, {2, 2}, {4, netmap.FilterPatchVersion}} {
		s, first, err := h.subscribe(c.id, c.v, 0, "", "")
		if err != nil {
			t.Fatal(err)
		}
		m := &netmap.NetworkMap{}
		if err := m.Apply(decodeMsg(t, first)); err != nil {
			t.Fatal(err)
		}
		cs = append(cs, &client{s: s, m: m, id: c.id, version: c.v})
	}
	// step applies what c was sent and counts the filters that came whole
	// and as patches, checking the frames' sizes.
	step := func(c *client) (whole, patches int) {
		for _, f := range c.s.q.take(nil) {
			resp, _, err := controlclient.ReadMapResponse(bytes.NewReader(f), nil)
			if err != nil {
				t.Fatal(err)
			}
			if resp.PacketFilter != nil {
				whole++
			}
			if resp.PacketFilterPatch != nil {
				patches++
				if len(resp.PeersChanged) == 0 && len(f) > 300 {
					t.Errorf("a patch frame of %d bytes: %s", len(f), f[4:])
				}
			}
			if err := c.m.Apply(resp); err != nil {
				t.Fatal(err)
			}
		}
		return whole, patches
	}
	check := func(what string, wantWhole, wantPatches [3]int) {
		t.Helper()
		for i, c := range cs {
			whole, patches := step(c)
			if whole != wantWhole[i] || patches != wantPatches[i] {
				t.Fatalf("%s: node %d (protocol %d) got %d whole filters and %d patches; want %d and %d",
					what, c.id, c.version, whole, patches, wantWhole[i], wantPatches[i])
			}
			h.mu.Lock()
			want := decodeMsg(t, h.fullLocked(h.nodes[c.id]))
			h.mu.Unlock()
			compareMaps(t, what, c.m, want)
		}
	}
	// Another member streaming with protocol 3 gets the very frame node 1
	// gets: one encoding serves the tenant.
	s3, _, err := h.subscribe(3, netmap.ProtocolVersion, 0, "", "")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cs { // nodes 2 to 4 came online
		step(c)
	}
	h.upsert(hubNode(30, "tag:a"))
	if a, b := cs[0].s.q.take(nil), s3.q.take(nil); len(a) != 1 || len(b) != 1 || &a[0][0] != &b[0][0] {
		t.Fatalf("after a join, node 1 was sent %q and node 3 %q; want the same frame, the peer change with the patch", a, b)
	} else {
		for _, f := range a {
			cs[0].s.q.push(f)
		}
	}
	check("after a join", [3]int{0, 1, 0}, [3]int{1, 0, 1})
	h.upsert(hubNode(31, "tag:b")) // the tcp:22 rule's sources
	check("after a tag:b join", [3]int{0, 1, 0}, [3]int{1, 0, 1})
	h.remove(5, controlclient.ErrNotRegistered)
	check("after a leave", [3]int{0, 1, 0}, [3]int{1, 0, 1})
	h.remove(21, controlclient.ErrNotRegistered)
	h.remove(31, controlclient.ErrNotRegistered) // the tcp:22 rule goes
	check("after the tag:b rule emptied", [3]int{1, 2, 1}, [3]int{1, 0, 1})
	h.setPolicy(mustEngine(t, `{"tagOwners": {"tag:a": [], "tag:b": []}, "grants": [{"src": ["tag:a"], "dst": ["tag:a"], "ip": ["tcp:80"]}]}`))
	check("after a policy change", [3]int{0, 1, 1}, [3]int{1, 0, 0})
	var doc bytes.Buffer
	json.Indent(&doc, mustMarshal(t, cs[0].m.PacketFilter), "", " ")
	if !bytes.Contains(doc.Bytes(), []byte(`"first": 80`)) {
		t.Fatalf("filter after the policy change: %s", doc.Bytes())
	}
}

func mustMarshal(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestSrcDiffCacheReusedList: a caller that rewrites its source list in
// place gets a fresh diff, not the one remembered for the old contents.
func TestSrcDiffCacheReusedList(t *testing.T) {
	from := appendPrefixes(nil, []netip.Prefix{netip.MustParsePrefix("100.64.0.2/32")})
	to := []netip.Prefix{netip.MustParsePrefix("100.64.0.2/32"), netip.MustParsePrefix("100.64.0.3/32")}
	var c srcDiffCache
	add, _, _ := c.diff(from, to)
	if len(add) != 1 || add[0] != to[1] {
		t.Fatalf("add %v", add)
	}
	to[1] = netip.MustParsePrefix("100.64.0.4/32")
	if add, _, _ := c.diff(from, to); len(add) != 1 || add[0] != to[1] {
		t.Fatalf("after rewriting the list in place: add %v; want [100.64.0.4/32]", add)
	}
}

// TestNewNodeAnnouncedWhenStreaming: a registered node reaches its peers
// when its map stream opens, online and with the filter patch in one frame;
// one that does not stream is announced offline after announceDelay; one
// removed before either is never announced.
func TestNewNodeAnnouncedWhenStreaming(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHub("e1", nil, 0, time.Now)
		h.afterFunc = func(d time.Duration, f func()) { time.AfterFunc(d, f) }
		h.announceDelay = 2 * time.Second
		h.setPolicy(mustEngine(t, `{"tagOwners": {"tag:a": []}, "grants": [{"src": ["tag:a"], "dst": ["tag:a"], "ip": ["*"]}]}`))
		h.upsert(hubNode(1, "tag:a"))
		s, m := subscribeMap(t, h, 1)
		frames := func() []*netmap.MapResponse {
			var out []*netmap.MapResponse
			for _, f := range s.q.take(nil) {
				resp, _, err := controlclient.ReadMapResponse(bytes.NewReader(f), nil)
				if err != nil {
					t.Fatal(err)
				}
				if err := m.Apply(resp); err != nil {
					t.Fatal(err)
				}
				out = append(out, resp)
			}
			return out
		}
		h.upsert(hubNode(2, "tag:a"))
		if got := frames(); len(got) != 0 {
			t.Fatalf("a registration without a stream sent %d frames at once; want none", len(got))
		}
		if _, _, err := h.subscribe(2, netmap.ProtocolVersion, 0, "", ""); err != nil {
			t.Fatal(err)
		}
		got := frames()
		if len(got) != 1 || len(got[0].PeersChanged) != 1 || !got[0].PeersChanged[0].Online || got[0].PacketFilterPatch == nil {
			t.Fatalf("when its stream opened: %+v; want one frame with the node online and the filter patch", got)
		}
		h.mu.Lock()
		want := decodeMsg(t, h.fullLocked(h.nodes[1]))
		h.mu.Unlock()
		compareMaps(t, "after the stream opened", m, want)

		h.upsert(hubNode(3, "tag:a"))
		time.Sleep(time.Second)
		synctest.Wait()
		if got := frames(); len(got) != 0 {
			t.Fatalf("a second after a registration without a stream: %d frames; want none yet", len(got))
		}
		time.Sleep(time.Second)
		synctest.Wait()
		got = frames()
		if len(got) != 1 || len(got[0].PeersChanged) != 1 || got[0].PeersChanged[0].ID != 3 || got[0].PeersChanged[0].Online {
			t.Fatalf("after announceDelay: %+v; want node 3, offline", got)
		}

		h.upsert(hubNode(4, "tag:a"))
		h.remove(4, controlclient.ErrNotRegistered)
		time.Sleep(3 * time.Second)
		synctest.Wait()
		for _, r := range frames() {
			if slices.ContainsFunc(r.PeersChanged, func(n netmap.Node) bool { return n.ID == 4 }) {
				t.Fatalf("a node removed before it was announced was announced: %+v", r)
			}
		}
		if _, ok := m.Peers[4]; ok {
			t.Fatal("node 1's map holds the removed node 4")
		}
	})
}
