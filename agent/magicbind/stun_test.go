package magicbind

import (
	"context"
	"net"
	"slices"
	"strconv"
	"testing"
	"time"

	"meshd.dev/meshd/netmap"
)

// TestHomeByRelayLatencyWithoutSTUN: with UDP blocked (no STUN answers),
// the home region is the one whose relay connects fastest over TCP, not
// merely the first in the map.
func TestHomeByRelayLatencyWithoutSTUN(t *testing.T) {
	noSTUN := func(r netmap.DERPRegion, id int, code string) netmap.DERPRegion {
		r.ID, r.Code = id, code
		r.Nodes = slices.Clone(r.Nodes)
		r.Nodes[0].STUNPort = -1
		return r
	}
	r1, r2 := noSTUN(startRelay(t).Regions[0], 1, "near-first"), noSTUN(startRelay(t).Regions[0], 2, "far-second")
	for _, tt := range []struct {
		name string
		slow int // region whose relay answers only after the choice
		want int
	}{
		{"first region slow", 1, 2},
		{"second region slow", 2, 1},
	} {
		t.Run(tt.name, func(t *testing.T) {
			slowPort := strconv.Itoa(r1.Nodes[0].DERPPort)
			if tt.slow == 2 {
				slowPort = strconv.Itoa(r2.Nodes[0].DERPPort)
			}
			dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
				if _, port, _ := net.SplitHostPort(addr); port == slowPort {
					// Later than the other relay however loaded the
					// machine is: not before the choice is made (its
					// context ends then), where a fixed delay needed a
					// margin for the other dial to win the race.
					<-ctx.Done()
					return nil, ctx.Err()
				}
				return (&net.Dialer{}).DialContext(ctx, network, addr)
			}
			n := newTestNodeSetup(t, "a", "100.64.0.1", nodeSetup{opts: func(o *Options) { o.DERPDialContext = dial }})
			n.bind.SetNetworkMap(&netmap.NetworkMap{Self: n.node(1, false), DERPMap: netmap.DERPMap{Regions: []netmap.DERPRegion{r1, r2}}})
			deadline := time.Now().Add(10 * time.Second)
			for n.bind.HomeDERP() == 0 {
				if time.Now().After(deadline) {
					t.Fatal("no home region chosen")
				}
				time.Sleep(20 * time.Millisecond)
			}
			if h := n.bind.HomeDERP(); h != tt.want {
				t.Errorf("home region %d, want %d (region %d's relay answers late)", h, tt.want, tt.slow)
			}
		})
	}
}
