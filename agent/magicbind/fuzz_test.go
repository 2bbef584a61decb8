package magicbind

import (
	"net/netip"
	"testing"

	"golang.zx2c4.com/wireguard/conn"

	"meshd.dev/meshd/nat/disco"
	"meshd.dev/meshd/nat/stun"
	"meshd.dev/meshd/netmap"
)

// FuzzReceive feeds arbitrary datagrams through the socket demultiplexer,
// from a known peer's address and from a stranger's: nothing panics,
// disco and STUN never reach WireGuard, and WireGuard only ever sees a
// packet with the endpoint of the peer whose address it came from.
func FuzzReceive(f *testing.F) {
	self, peerKey := netmap.NewNodePrivate(), netmap.NewNodePrivate()
	selfDisco, peerDisco := netmap.NewDiscoPrivate(), netmap.NewDiscoPrivate()
	known := netip.MustParseAddrPort("127.0.0.1:41641")
	stranger := netip.MustParseAddrPort("127.0.0.2:41641")

	f.Add([]byte{1, 0, 0, 0, 1, 2, 3, 4}, true)
	f.Add([]byte{4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, false)
	f.Add(disco.Seal(peerDisco, selfDisco.Public(), disco.Ping{TxID: disco.NewTxID(), NodeKey: peerKey.Public()}), true)
	f.Add(disco.Seal(peerDisco, selfDisco.Public(), disco.CallMeMaybe{Endpoints: []netip.AddrPort{known}}), false)
	f.Add([]byte(disco.Magic+"short"), true)
	_, req := stun.NewRequest()
	f.Add(req, false)

	f.Fuzz(func(t *testing.T, pkt []byte, fromKnown bool) {
		b := New(Options{NodeKey: self, DiscoKey: selfDisco})
		b.SetNetworkMap(&netmap.NetworkMap{Peers: map[netmap.NodeID]*netmap.Node{1: {
			ID: 1, NodeKey: peerKey.Public(), DiscoKey: peerDisco.Public(), Endpoints: []netip.AddrPort{known},
		}}})
		src := stranger
		if fromKnown {
			src = known
		}
		inner := func(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
			sizes[0] = copy(packets[0], pkt)
			eps[0] = &conn.StdNetEndpoint{AddrPort: src}
			return 1, nil
		}
		packets, sizes, eps := [][]byte{make([]byte, 2048)}, make([]int, 1), make([]conn.Endpoint, 1)
		n, err := b.wrapReceive(inner)(packets, sizes, eps)
		if n != 1 || err != nil {
			t.Fatalf("n=%d err=%v", n, err)
		}
		if sizes[0] == 0 {
			return
		}
		got := packets[0][:sizes[0]]
		if disco.Looks(got) || stun.Is(got) {
			t.Fatalf("disco/STUN datagram handed to WireGuard")
		}
		ep, ok := eps[0].(*Endpoint)
		if !ok || ep.p.key != peerKey.Public() || !fromKnown {
			t.Fatalf("packet from %v handed to WireGuard with endpoint %#v", src, eps[0])
		}
	})
}
