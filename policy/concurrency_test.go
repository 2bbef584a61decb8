package policy

import (
	"fmt"
	"sync"
	"testing"

	"meshd.dev/meshd/netmap"
)

// TestConcurrentUse exercises the engine from several goroutines, as the
// coordinator does (map sessions, registrations, the admin API); run with
// -race.
func TestConcurrentUse(t *testing.T) {
	p := loadSeed(t)
	e := NewEngine(p)
	base := []*netmap.Node{
		testNode(1, "alice@example.com"), testNode(2, "bob@example.com"),
		testNode(3, "", "tag:inference-server"), testNode(4, "", "tag:prod"),
	}
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 200 {
				switch g {
				case 0:
					e.UpsertNode(testNode(100+i%10, fmt.Sprintf("u%d@example.com", i%3)))
				case 1:
					e.RemoveNode(netmap.NodeID(100 + i%10))
				case 2:
					all := append([]*netmap.Node{testNode(200, "carol@tenant-a.example")}, base...)
					e.FilterFor(base[2], all)
					e.Peers(base[0])
					e.PeerCapsFor(base[2])
				default:
					e.CanSee(base[0], base[2])
					e.PeerCaps(base[2], base[0])
					e.FilterFor(base[3], nil)
				}
			}
		})
	}
	wg.Wait()
	if !reach(t, e, base[0], base[2], netmap.ProtoTCP, 22) {
		t.Error("alice lost access to the inference server")
	}
}
