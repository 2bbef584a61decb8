package magicbind

import (
	"math/rand/v2"
	"net/netip"
	"testing"

	"golang.zx2c4.com/wireguard/conn"

	"meshd.dev/meshd/netmap"
)

// mapPeers is the size of the large maps below: the largest tailnet the
// coordinator is built for.
const mapPeers = 10000

// bigMap is a network map of n peers as the coordinator sends one: each
// with a node and disco key, a tailnet address, a home among three relay
// regions and two endpoints (its public STUN mapping and its LAN address).
// Keys come from a seeded generator (real keys cost a scalar
// multiplication each), so every call returns the same peers, in fresh
// values.
func bigMap(n int) *netmap.NetworkMap {
	rng := rand.New(rand.NewChaCha8([32]byte{1}))
	nm := &netmap.NetworkMap{Peers: make(map[netmap.NodeID]*netmap.Node, n)}
	for r := 1; r <= 3; r++ {
		nm.DERPMap.Regions = append(nm.DERPMap.Regions, netmap.DERPRegion{ID: r, Code: "r" + string(rune('0'+r)),
			Nodes: []netmap.DERPNode{{Name: "a", Host: "relay.invalid", DERPPort: 443, STUNPort: 3478}}})
	}
	for i := range n {
		nd := &netmap.Node{ID: netmap.NodeID(i + 1), Hostname: "peer", HomeDERP: 1 + i%3}
		for j := range nd.NodeKey {
			nd.NodeKey[j] = byte(rng.Uint32())
		}
		for j := range nd.DiscoKey {
			nd.DiscoKey[j] = byte(rng.Uint32())
		}
		nd.Addresses = []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{100, 64, byte(i >> 8), byte(i)}), 32)}
		nd.Endpoints = []netip.AddrPort{peerEndpoint(i, 0), peerEndpoint(i, 1)}
		nm.Peers[nd.ID] = nd
	}
	return nm
}

// peerEndpoint is endpoint j of peer i in bigMap (198.18.0.0/15: test
// addresses; nothing is sent to them).
func peerEndpoint(i, j int) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18 + byte(j), byte(i >> 8), byte(i)}), 41641)
}

// learntEndpoint is the n-th address learnt in a benchmark: a NAT mapping
// no map published (198.20.0.0/16 is not in bigMap).
func learntEndpoint(n int) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 20, byte(n >> 8), byte(n)}), uint16(1024+n>>16))
}

// churned is nm with peer 1's endpoints moved (its NAT rebound): what most
// map updates of a large tailnet look like.
func churned(nm *netmap.NetworkMap) *netmap.NetworkMap {
	out := nm.Clone()
	nd := *out.Peers[1]
	nd.Endpoints = []netip.AddrPort{netip.AddrPortFrom(nd.Endpoints[0].Addr(), 41642), nd.Endpoints[1]}
	out.Peers[1] = &nd
	return out
}

func benchBind() *Bind {
	return New(Options{NodeKey: netmap.NewNodePrivate(), DiscoKey: netmap.NewDiscoPrivate()})
}

// BenchmarkFirstMap10000: a bind with no peers receives a map of 10,000
// (the agent's first map after it starts).
func BenchmarkFirstMap10000(b *testing.B) {
	nm := bigMap(mapPeers)
	b.ReportAllocs()
	for b.Loop() {
		benchBind().SetNetworkMap(nm)
	}
}

// BenchmarkMapChurn: of 10,000 peers, one changes its endpoints; the bind
// gets the map with and without the change in turn.
func BenchmarkMapChurn(b *testing.B) {
	nm := bigMap(mapPeers)
	maps := [2]*netmap.NetworkMap{nm, churned(nm)}
	mb := benchBind()
	mb.SetNetworkMap(nm)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		i++
		mb.SetNetworkMap(maps[i%2])
	}
}

// BenchmarkMapSame: the map of 10,000 peers arrives again with nothing
// changed for the bind (only, say, the packet filter did), in fresh values
// as the agent builds them.
func BenchmarkMapSame(b *testing.B) {
	mb := benchBind()
	mb.SetNetworkMap(bigMap(mapPeers))
	maps := [2]*netmap.NetworkMap{bigMap(mapPeers), bigMap(mapPeers)}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		i++
		mb.SetNetworkMap(maps[i%2])
	}
}

// BenchmarkLearnAddr: with 10,000 peers in the map, authenticated disco
// pings and pongs tie new addresses to peers (hard NATs map every flow to
// a new port), round robin over the peers.
func BenchmarkLearnAddr(b *testing.B) {
	nm := bigMap(mapPeers)
	mb := benchBind()
	mb.SetNetworkMap(nm)
	peers := make([]*peer, 0, mapPeers)
	for i := range mapPeers {
		peers = append(peers, mb.peers[nm.Peers[netmap.NodeID(i+1)].NodeKey])
	}
	b.ReportAllocs()
	n := 0
	for b.Loop() {
		mb.learnAddr(learntEndpoint(n), peers[n%mapPeers])
		n++
	}
}

// BenchmarkDemux10000 is BenchmarkDemux in a bind with 10,000 peers, a
// thousand of which have an address learnt from disco: a batch from a
// peer's published endpoint, and one from a learnt address.
func BenchmarkDemux10000(b *testing.B) {
	nm := bigMap(mapPeers)
	mb := benchBind()
	mb.SetNetworkMap(nm)
	for i := range 1000 {
		mb.learnAddr(learntEndpoint(i), mb.peers[nm.Peers[netmap.NodeID(i*7+1)].NodeKey])
	}
	for _, bc := range []struct {
		name string
		src  netip.AddrPort
	}{
		{"published", peerEndpoint(5000, 0)},
		{"learnt", learntEndpoint(500)},
	} {
		b.Run(bc.name, func(b *testing.B) {
			const batch = conn.IdealBatchSize
			stdEP := &conn.StdNetEndpoint{AddrPort: bc.src}
			inner := func(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
				for i := range packets {
					packets[i][0] = 4 // WireGuard transport data
					sizes[i] = 1420
					eps[i] = stdEP
				}
				return len(packets), nil
			}
			recv := mb.wrapReceive(inner)
			packets, sizes, eps := make([][]byte, batch), make([]int, batch), make([]conn.Endpoint, batch)
			for i := range packets {
				packets[i] = make([]byte, 1500)
			}
			b.ReportAllocs()
			for b.Loop() {
				if n, _ := recv(packets, sizes, eps); n != batch || sizes[0] == 0 {
					b.Fatal("packet not delivered")
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*batch), "ns/packet")
		})
	}
}
