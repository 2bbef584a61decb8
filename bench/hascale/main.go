// Command hascale measures coordinators under simulated nodes that speak
// the real control protocol: each node has its own machine key, TLS
// connection and map stream (controlclient.Client), registers with an
// auth key and follows its map. It reports how long the fleet takes to
// connect, the memory each coordinator process holds per connected node,
// how long a policy change takes to reach every node (p50/p99/max), and
// whether ephemeral joins and leaves at a steady rate lose or duplicate a
// node. Run it against one coordinator (SQLite) and against replicas
// sharing PostgreSQL (URLs separated by commas); bench/hascale/run does
// both side by side (bench/README.md).
package main

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"meshd.dev/meshd/control"
	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "hascale:", err)
		os.Exit(1)
	}
}

type config struct {
	urls         []string
	token        string
	pids         []int
	nodes        int
	tenants      int
	rounds       int
	churnRate    int
	churnFor     time.Duration
	churnTenants int
	ephTimeout   time.Duration
	concurrency  int
	failover     bool
	leave        string // "logout" or "disconnect"
}

func run() error {
	var c config
	urls := flag.String("coordinators", "", "coordinator URLs, comma-separated (replicas of one tailnet)")
	flag.StringVar(&c.token, "token-file", "", "admin token file")
	pids := flag.String("pids", "", "coordinator process ids, comma-separated, to measure their memory")
	flag.IntVar(&c.nodes, "nodes", 1000, "simulated nodes")
	flag.IntVar(&c.tenants, "tenants", 0, "tenants (nodes see only their tenant); 0: nodes/100")
	flag.IntVar(&c.rounds, "policy-rounds", 5, "policy changes to time")
	flag.IntVar(&c.churnRate, "churn-rate", 100, "ephemeral joins (and as many leaves) per second")
	flag.DurationVar(&c.churnFor, "churn-for", 10*time.Second, "how long to churn")
	flag.IntVar(&c.churnTenants, "churn-tenants", 0, "tenants the ephemeral nodes join, in turn (1: all into tenant 0, the hottest case); 0: every tenant")
	flag.DurationVar(&c.ephTimeout, "ephemeral-timeout", 2*time.Second, "the coordinators' --ephemeral-timeout")
	flag.IntVar(&c.concurrency, "concurrency", 16, "registrations in flight while connecting the fleet")
	flag.StringVar(&c.leave, "leave", "logout", "how an ephemeral node leaves: logout (as meshd's daemon does when it stops: the node is deleted at once) or disconnect (a crash: offline now, deleted at the ephemeral timeout)")
	flag.BoolVar(&c.failover, "failover", false, "at the end, kill (SIGKILL) the first coordinator of -pids and time every node holding a policy change made on the second")
	flag.Parse()
	c.urls = strings.Split(*urls, ",")
	if *urls == "" || c.token == "" {
		return errors.New("need -coordinators and -token-file")
	}
	for _, p := range strings.Split(*pids, ",") {
		if p == "" {
			continue
		}
		n, err := strconv.Atoi(p)
		if err != nil {
			return err
		}
		c.pids = append(c.pids, n)
	}
	if c.leave != "logout" && c.leave != "disconnect" {
		return fmt.Errorf("-leave %q: want logout or disconnect", c.leave)
	}
	if c.tenants == 0 {
		c.tenants = max(1, c.nodes/100)
	}
	if c.churnTenants <= 0 || c.churnTenants > c.tenants {
		c.churnTenants = c.tenants
	}
	return bench(context.Background(), c)
}

// sim is one simulated node.
type sim struct {
	id     netmap.NodeID
	tenant int
	addr   netmap.NodeID
	home   int // index of the coordinator it streams from
	client *controlclient.Client
	cancel context.CancelFunc
	done   chan error

	mu sync.Mutex
	// seen is when the node first held a map with policy round r's
	// marker.
	seen  map[int]time.Time
	peers map[netmap.NodeID]bool // every peer seen since watch was set
	// watch makes the node record the peers it sees (the churn's
	// watchers); the others skip the walk over every peer per update.
	watch atomic.Bool
	first chan struct{}
	once  sync.Once
}

// markerPort is the port policy round r grants (round 0: 22 only).
func markerPort(r int) uint16 { return uint16(10000 + r) }

func policyText(tenants, round int) string {
	var b strings.Builder
	b.WriteString("{\n\"tagOwners\": {")
	for t := range tenants {
		if t > 0 {
			b.WriteString(",")
		}
		fmt.Fprintf(&b, "\"tag:t%d\": []", t)
	}
	b.WriteString("},\n\"grants\": [")
	for t := range tenants {
		if t > 0 {
			b.WriteString(",\n")
		}
		fmt.Fprintf(&b, `{"src": ["tag:t%d"], "dst": ["tag:t%d"], "ip": ["tcp:22", "tcp:%d"]}`, t, t, markerPort(round))
	}
	b.WriteString("]\n}\n")
	return b.String()
}

// roundOf returns the policy round m's filter carries, or -1.
func roundOf(m *netmap.NetworkMap) int {
	for _, r := range m.PacketFilter {
		for _, d := range r.DstPorts {
			if p := d.Ports.First; p >= 10000 && p == d.Ports.Last {
				return int(p - 10000)
			}
		}
	}
	return -1
}

func newClient(url string) (*controlclient.Client, netmap.NodePrivate, error) {
	_, mk, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, netmap.NodePrivate{}, err
	}
	nk := netmap.NewNodePrivate()
	c, err := controlclient.NewClient(controlclient.ClientOptions{URL: url, MachineKey: mk, NodeKey: nk,
		Logger: slog.New(slog.DiscardHandler), MinBackoff: 200 * time.Millisecond, MaxBackoff: 5 * time.Second})
	return c, nk, err
}

// urlsFrom lists every coordinator URL starting with home's, so that a node
// streams from home and fails over to the others.
func urlsFrom(urls []string, home int) string {
	out := slices.Concat(urls[home:], urls[:home])
	return strings.Join(out, ",")
}

func start(ctx context.Context, urls []string, home int, key, host string) (*sim, error) {
	c, nk, err := newClient(urlsFrom(urls, home))
	if err != nil {
		return nil, err
	}
	dk := netmap.NewDiscoPrivate()
	resp, err := c.Register(ctx, netmap.RegisterRequest{NodeKey: nk.Public(), DiscoKey: dk.Public(), Hostname: host, AuthKey: key})
	if err != nil {
		c.Close()
		return nil, err
	}
	s := &sim{id: resp.Node.ID, home: home, client: c, done: make(chan error, 1), seen: map[int]time.Time{}, peers: map[netmap.NodeID]bool{}, first: make(chan struct{})}
	fctx, cancel := context.WithCancel(ctx)
	s.cancel = cancel
	go func() {
		s.done <- c.FollowView(fctx, netmap.MapRequest{NodeKey: nk.Public(), DiscoKey: dk.Public()}, func(m *netmap.NetworkMap) {
			now := time.Now()
			r := roundOf(m)
			s.mu.Lock()
			if _, ok := s.seen[r]; !ok {
				s.seen[r] = now
			}
			if s.watch.Load() {
				for id := range m.Peers {
					s.peers[id] = true
				}
			}
			s.mu.Unlock()
			s.once.Do(func() { close(s.first) })
		})
	}()
	return s, nil
}

// ready waits for the node's first map, or the error that ended its
// stream first.
func (s *sim) ready() error {
	select {
	case <-s.first:
		return nil
	case err := <-s.done:
		s.done <- err
		return fmt.Errorf("map stream: %w", err)
	}
}

func (s *sim) stop() {
	s.cancel()
	<-s.done
	s.client.Close()
}

func rssKB(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			return n
		}
	}
	return 0
}

// cpuSeconds is the CPU time (user and system) the processes pids have
// used, from /proc (clock ticks of 1/100 s, Linux's USER_HZ); pid 0 is
// this process.
func cpuSeconds(pids ...int) float64 {
	var ticks int
	for _, pid := range pids {
		path := fmt.Sprintf("/proc/%d/stat", pid)
		if pid == 0 {
			path = "/proc/self/stat"
		}
		b, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		// The command name may hold spaces: fields count from its ')'.
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
		if len(f) > 12 {
			u, _ := strconv.Atoi(f[11])
			s, _ := strconv.Atoi(f[12])
			ticks += u + s
		}
	}
	return float64(ticks) / 100
}

func percentile(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	slices.Sort(d)
	i := int(float64(len(d)-1) * p)
	return d[i]
}

func bench(ctx context.Context, c config) error {
	tok, err := os.ReadFile(c.token)
	if err != nil {
		return err
	}
	admin, err := control.NewAdminClient(c.urls[0], strings.TrimSpace(string(tok)))
	if err != nil {
		return err
	}
	if _, err := admin.SetPolicy(ctx, "bench.hujson", []byte(policyText(c.tenants, 0))); err != nil {
		return fmt.Errorf("set policy: %w", err)
	}
	keys := make([]string, c.tenants)
	for t := range keys {
		k, err := admin.CreateAuthKey(ctx, control.AuthKeyOptions{Reusable: true, Preauthorized: true, Tags: []string{fmt.Sprintf("tag:t%d", t)}})
		if err != nil {
			return fmt.Errorf("create key: %w", err)
		}
		keys[t] = k.Key
	}
	eph := make([]string, c.churnTenants)
	for t := range eph {
		k, err := admin.CreateAuthKey(ctx, control.AuthKeyOptions{Reusable: true, Preauthorized: true, Ephemeral: true, Tags: []string{fmt.Sprintf("tag:t%d", t)}})
		if err != nil {
			return fmt.Errorf("create ephemeral key: %w", err)
		}
		eph[t] = k.Key
	}
	rss0 := make([]int, len(c.pids))
	for i, p := range c.pids {
		rss0[i] = rssKB(p)
	}

	// Connect the fleet.
	fmt.Printf("coordinators: %d, nodes: %d, tenants: %d (nodes see only their tenant: %d peers each)\n", len(c.urls), c.nodes, c.tenants, c.nodes/c.tenants-1)
	sims := make([]*sim, c.nodes)
	t0 := time.Now()
	cpu0, self0 := cpuSeconds(c.pids...), cpuSeconds(0)
	var next atomic.Int64
	var wg sync.WaitGroup
	var firstErr atomic.Value
	var retries atomic.Int64
	for range c.concurrency {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= c.nodes {
					return
				}
				// A real node retries a registration the coordinator
				// cut off (connlimit's handshake timeout under load).
				var s *sim
				var err error
				for try := 0; try < 5; try++ {
					if s, err = start(ctx, c.urls, i%len(c.urls), keys[i%c.tenants], fmt.Sprintf("sim-%d", i)); err == nil {
						break
					}
					retries.Add(1)
				}
				if err != nil {
					firstErr.CompareAndSwap(nil, fmt.Errorf("node %d: %w", i, err))
					return
				}
				if err := s.ready(); err != nil {
					firstErr.CompareAndSwap(nil, fmt.Errorf("node %d: %w", i, err))
					return
				}
				s.tenant = i % c.tenants
				sims[i] = s
			}
		})
	}
	wg.Wait()
	if err, _ := firstErr.Load().(error); err != nil {
		return err
	}
	connect := time.Since(t0)
	fmt.Printf("connect: %d nodes registered and holding a full map in %v (%.0f nodes/s, %d registrations retried)\n", c.nodes, connect.Round(time.Millisecond), float64(c.nodes)/connect.Seconds(), retries.Load())
	cpu1, self1 := cpuSeconds(c.pids...), cpuSeconds(0)
	fmt.Printf("cpu: connect: coordinators %.1fs (%.2f ms per node), this simulator %.1fs\n", cpu1-cpu0, (cpu1-cpu0)*1000/float64(c.nodes), self1-self0)
	time.Sleep(2 * time.Second) // let online patches settle before measuring memory
	for i, p := range c.pids {
		per := len(c.urls)
		if per == 0 {
			per = 1
		}
		streams := c.nodes / len(c.pids)
		d := rssKB(p) - rss0[i]
		fmt.Printf("memory: coordinator pid %d RSS %d MiB (+%d MiB for %d streams: %.1f KiB per connected node)\n", p, rssKB(p)/1024, d/1024, streams, float64(d)/float64(streams))
	}

	// Policy fan-out.
	for r := 1; r <= c.rounds; r++ {
		start := time.Now()
		cpu0, self0 := cpuSeconds(c.pids...), cpuSeconds(0)
		if _, err := admin.SetPolicy(ctx, "bench.hujson", []byte(policyText(c.tenants, r))); err != nil {
			return fmt.Errorf("set policy round %d: %w", r, err)
		}
		set := time.Since(start)
		deadline := time.Now().Add(60 * time.Second)
		var lat []time.Duration
		byHome := make([][]time.Duration, len(c.urls))
		for {
			lat = lat[:0]
			for i := range byHome {
				byHome[i] = byHome[i][:0]
			}
			for _, s := range sims {
				s.mu.Lock()
				at, ok := s.seen[r]
				s.mu.Unlock()
				if ok {
					lat = append(lat, at.Sub(start))
					byHome[s.home] = append(byHome[s.home], at.Sub(start))
				}
			}
			if len(lat) == len(sims) || time.Now().After(deadline) {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if len(lat) != len(sims) {
			return fmt.Errorf("policy round %d reached %d of %d nodes within 60s", r, len(lat), len(sims))
		}
		line := fmt.Sprintf("policy change %d: set (stored, local recompute) %v; all %d nodes: p50 %v p99 %v max %v", r, set.Round(time.Millisecond),
			len(lat), percentile(lat, 0.5).Round(time.Millisecond), percentile(lat, 0.99).Round(time.Millisecond), percentile(lat, 1).Round(time.Millisecond))
		if len(c.urls) > 1 {
			for i, l := range byHome {
				line += fmt.Sprintf("; via %s: max %v", c.urls[i], percentile(l, 1).Round(time.Millisecond))
			}
		}
		line += fmt.Sprintf("; cpu: coordinators %.2fs, simulator %.2fs", cpuSeconds(c.pids...)-cpu0, cpuSeconds(0)-self0)
		fmt.Println(line)
	}

	// Ephemeral churn: joins at churnRate per second into the first
	// churnTenants tenants in turn, each leaving about a second after its
	// first map; 100 nodes of those tenants watch (sim i is in tenant
	// i%tenants).
	var watchers []*sim
	perTenant := max(1, 100/c.churnTenants)
	for t := range c.churnTenants {
		for i := t; i < len(sims) && i < t+perTenant*c.tenants; i += c.tenants {
			watchers = append(watchers, sims[i])
			sims[i].watch.Store(true)
		}
	}
	type joined struct {
		id     netmap.NodeID
		tenant int
		err    error
		offer  time.Duration // when the join was due, from the churn's start
		lat    time.Duration // from the join's start to holding its first map
		first  time.Duration // when it held its first map, from the churn's start
		left   time.Duration // when its leave was done, from the churn's start
	}
	var mu sync.Mutex
	var joins []joined
	tick := time.NewTicker(time.Second / time.Duration(c.churnRate))
	churnStart := time.Now()
	churnCPU, churnSelf := cpuSeconds(c.pids...), cpuSeconds(0)
	var cw sync.WaitGroup
	n := 0
	for time.Since(churnStart) < c.churnFor {
		<-tick.C
		// Every join due by now, not one per tick: a ticker drops the
		// ticks of a starved reader, which would quietly offer less load
		// than asked for.
		due := int(time.Since(churnStart).Seconds() * float64(c.churnRate))
		for ; n < due; n++ {
			i := n
			offer := time.Duration(i) * time.Second / time.Duration(c.churnRate)
			cw.Go(func() {
				t0 := time.Now()
				fail := func(err error) {
					mu.Lock()
					joins = append(joins, joined{err: err, offer: offer})
					mu.Unlock()
				}
				s, err := start(ctx, c.urls, i%len(c.urls), eph[i%c.churnTenants], fmt.Sprintf("eph-%d", i))
				if err != nil {
					fail(err)
					return
				}
				if err := s.ready(); err != nil {
					fail(err)
					return
				}
				j := joined{id: s.id, tenant: i % c.churnTenants, offer: offer, lat: time.Since(t0), first: time.Since(churnStart)}
				time.Sleep(time.Second)
				if c.leave == "logout" {
					lctx, cancel := context.WithTimeout(ctx, 30*time.Second)
					_, err := s.client.Logout(lctx)
					cancel()
					if err != nil {
						s.stop()
						fail(fmt.Errorf("leave: %w", err))
						return
					}
				}
				s.stop()
				j.left = time.Since(churnStart)
				mu.Lock()
				joins = append(joins, j)
				mu.Unlock()
			})
		}
	}
	tick.Stop()
	cw.Wait()
	churn := time.Since(churnStart)
	failed := 0
	ids := map[netmap.NodeID]int{} // tenant
	dups := 0
	var lats, early, late []time.Duration
	// Sustained means keeping pace while offered: the joins holding their
	// first map by the end of the offer window, and the leaves done by
	// then plus the second each node stays, per second of the window. A
	// backlog shows as fewer, and as the late joins waiting longer than
	// the early ones.
	joinedInTime, leftInTime := 0, 0
	for _, j := range joins {
		if j.err != nil {
			failed++
			if failed == 1 {
				fmt.Println("first churn failure:", j.err)
			}
			continue
		}
		lats = append(lats, j.lat)
		switch {
		case j.offer < c.churnFor/4:
			early = append(early, j.lat)
		case j.offer >= c.churnFor*3/4:
			late = append(late, j.lat)
		}
		if j.first <= c.churnFor {
			joinedInTime++
		}
		if j.left <= c.churnFor+time.Second {
			leftInTime++
		}
		if _, ok := ids[j.id]; ok {
			dups++
		}
		ids[j.id] = j.tenant
	}
	// Every watcher must have seen every ephemeral node of its tenant (no
	// lost join),
	// and they must all be gone after the ephemeral timeout.
	// Changes may still be on their way when the last leave returns:
	// wait (up to a minute) for every watcher to have seen every join.
	missed := 0
	converge := time.Now()
	for {
		missed = 0
		for _, w := range watchers {
			w.mu.Lock()
			for id, t := range ids {
				if t == w.tenant && !w.peers[id] {
					missed++
				}
			}
			w.mu.Unlock()
		}
		if missed == 0 || time.Since(converge) > time.Minute {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	fmt.Printf("churn: every watcher had seen every join %v after the last leave\n", time.Since(converge).Round(10*time.Millisecond))
	var left int
	deadline := time.Now().Add(c.ephTimeout + 30*time.Second)
	for {
		infos, err := admin.Nodes(ctx)
		if err != nil {
			return err
		}
		left = len(infos) - c.nodes
		if left == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	if joined := len(ids); joined > 0 {
		cpu := cpuSeconds(c.pids...) - churnCPU
		fmt.Printf("cpu: churn (joins, leaves and reaping): coordinators %.1fs (%.1f ms per join and leave), this simulator %.1fs\n", cpu, cpu*1000/float64(joined), cpuSeconds(0)-churnSelf)
	}
	fmt.Printf("churn: %d joins offered in %v (%.0f/s), leaving by %s; join to first map p50 %v p99 %v max %v; p50 of the first and last quarter's joins %v, %v\n", n, c.churnFor,
		float64(n)/c.churnFor.Seconds(), c.leave, percentile(lats, 0.5).Round(time.Millisecond), percentile(lats, 0.99).Round(time.Millisecond), percentile(lats, 1).Round(time.Millisecond),
		percentile(early, 0.5).Round(time.Millisecond), percentile(late, 0.5).Round(time.Millisecond))
	fmt.Printf("churn: sustained %.1f joins/s (holding their first map within the %v window) and %.1f leaves/s (done within it plus the 1s stay)\n",
		float64(joinedInTime)/c.churnFor.Seconds(), c.churnFor, float64(leftInTime)/c.churnFor.Seconds())
	fmt.Printf("churn: %d ephemeral joins and leaves in %v (%.1f/s each), %d failed, %d duplicate ids, %d (watcher, join) pairs missed by %d watchers, %d ephemeral nodes left after the timeout\n",
		len(ids), churn.Round(time.Millisecond), float64(len(ids))/churn.Seconds(), failed, dups, missed, len(watchers), left)
	if c.failover {
		if err := failover(ctx, c, sims, strings.TrimSpace(string(tok))); err != nil {
			return err
		}
	}
	for _, s := range sims {
		s.cancel()
	}
	return nil
}

// failover kills the first coordinator (SIGKILL: no goodbye to any
// stream), makes a policy change on the second at once, and times every
// node holding it: the nodes that streamed from the dead replica must
// notice, fail over to the survivor and get the change from it.
func failover(ctx context.Context, c config, sims []*sim, tok string) error {
	if len(c.urls) < 2 || len(c.pids) < 1 {
		return errors.New("-failover needs two coordinators and the first one's pid")
	}
	admin, err := control.NewAdminClient(c.urls[1], tok)
	if err != nil {
		return err
	}
	r := c.rounds + 1
	if err := syscall.Kill(c.pids[0], syscall.SIGKILL); err != nil {
		return fmt.Errorf("kill coordinator %d: %w", c.pids[0], err)
	}
	killed := time.Now()
	if _, err := admin.SetPolicy(ctx, "bench.hujson", []byte(policyText(c.tenants, r))); err != nil {
		return fmt.Errorf("set policy on the survivor: %w", err)
	}
	set := time.Since(killed)
	deadline := killed.Add(2 * time.Minute)
	byHome := make([][]time.Duration, len(c.urls))
	for {
		for i := range byHome {
			byHome[i] = byHome[i][:0]
		}
		n := 0
		for _, s := range sims {
			s.mu.Lock()
			at, ok := s.seen[r]
			s.mu.Unlock()
			if ok {
				byHome[s.home] = append(byHome[s.home], at.Sub(killed))
				n++
			}
		}
		if n == len(sims) || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	line := fmt.Sprintf("failover: coordinator %d killed, policy set on the survivor %v later", c.pids[0], set.Round(time.Millisecond))
	for i, l := range byHome {
		line += fmt.Sprintf("; %d nodes homed on %s had it: p50 %v p99 %v max %v", len(l), c.urls[i],
			percentile(l, 0.5).Round(time.Millisecond), percentile(l, 0.99).Round(time.Millisecond), percentile(l, 1).Round(time.Millisecond))
	}
	fmt.Println(line)
	total := 0
	for _, l := range byHome {
		total += len(l)
	}
	if total != len(sims) {
		return fmt.Errorf("failover: %d of %d nodes had the change within 2 minutes of the kill", total, len(sims))
	}
	return nil
}
