package flowlog

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"meshd.dev/meshd/filter"
	"meshd.dev/meshd/filter/filtertest"
	"meshd.dev/meshd/netmap"
	"meshd.dev/meshd/packet"
)

var (
	self = netip.MustParseAddr("100.64.0.1")
	peer = netip.MustParseAddr("100.64.0.2")
)

func parse(t testing.TB, p filtertest.Packet) (*packet.Parsed, int) {
	t.Helper()
	b := p.Build()
	var pp packet.Parsed
	pp.Decode(b)
	if !pp.Valid() {
		t.Fatalf("test packet %+v does not decode", p)
	}
	return &pp, len(b)
}

// TestTableAggregates: packets of one flow in both directions, in and out
// of batches, add up to one flow with the right counts each way and the
// opener taken from the SYN; the drain resets the counts, keeps an active
// flow's opener for the next interval, and removes a flow idle for a whole
// interval.
func TestTableAggregates(t *testing.T) {
	tb := NewTable(64)
	syn := filtertest.Packet{Src: peer, Dst: self, Proto: netmap.ProtoTCP, SrcPort: 40000, DstPort: 22, TCPFlags: filtertest.SYN}
	data := syn
	data.TCPFlags, data.Payload = filtertest.ACK, 100
	reply := data.Reply()
	now := time.Unix(1000, 0)

	b := tb.Begin(now)
	p, n := parse(t, syn)
	b.Add(p, n, filter.In, filter.Accept)
	for range 3 {
		p, n := parse(t, data)
		b.Add(p, n, filter.In, filter.Accept)
	}
	b.End()
	b = tb.Begin(now.Add(time.Second))
	for range 2 {
		p, n := parse(t, reply)
		b.Add(p, n, filter.Out, filter.Accept)
	}
	b.End()

	flows := tb.Drain(nil)
	if len(flows) != 1 {
		t.Fatalf("drained %d flows, want 1: %+v", len(flows), flows)
	}
	f := flows[0]
	want := Flow{
		Local: packet.AddrFromNetip(self), Remote: packet.AddrFromNetip(peer), LPort: 22, RPort: 40000,
		Proto: netmap.ProtoTCP, Verdict: filter.Accept, RemoteOpened: true,
		InPackets: 4, InBytes: 40 + 3*140, OutPackets: 2, OutBytes: 2 * 140,
		First: now, Last: now.Add(time.Second),
	}
	if f != want {
		t.Fatalf("flow\n got %+v\nwant %+v", f, want)
	}

	// Next interval: only a reply from this node. The flow is still the
	// peer's.
	b = tb.Begin(now.Add(time.Minute))
	p, n = parse(t, reply)
	b.Add(p, n, filter.Out, filter.Accept)
	b.End()
	flows = tb.Drain(nil)
	if len(flows) != 1 || !flows[0].RemoteOpened || flows[0].OutPackets != 1 || flows[0].InPackets != 0 {
		t.Fatalf("second interval: %+v", flows)
	}
	// Idle for an interval: nothing to report, and the flow is gone.
	if flows = tb.Drain(nil); len(flows) != 0 {
		t.Fatalf("idle interval drained %+v", flows)
	}
	b = tb.Begin(now.Add(3 * time.Minute))
	p, n = parse(t, reply)
	b.Add(p, n, filter.Out, filter.Accept)
	b.End()
	if flows = tb.Drain(nil); len(flows) != 1 || flows[0].RemoteOpened {
		t.Fatalf("after removal, the flow should be new and this node's: %+v", flows)
	}
}

// TestTableVerdictsApart: accepted and dropped packets of one 5-tuple are
// two flows, each with its verdict.
func TestTableVerdictsApart(t *testing.T) {
	tb := NewTable(64)
	pkt := filtertest.Packet{Src: peer, Dst: self, Proto: netmap.ProtoUDP, SrcPort: 5000, DstPort: 53, Payload: 10}
	b := tb.Begin(time.Unix(1, 0))
	p, n := parse(t, pkt)
	b.Add(p, n, filter.In, filter.Accept)
	b.Add(p, n, filter.In, filter.DropNoRule)
	b.Add(p, n, filter.In, filter.DropNoRule)
	b.End()
	got := map[filter.Verdict]uint64{}
	for _, f := range tb.Drain(nil) {
		got[f.Verdict] = f.InPackets
	}
	if len(got) != 2 || got[filter.Accept] != 1 || got[filter.DropNoRule] != 2 {
		t.Fatalf("packets by verdict: %v", got)
	}
}

// TestTableOverflow: a full table counts the packets of flows it cannot
// place and keeps counting the flows it has.
func TestTableOverflow(t *testing.T) {
	tb := NewTable(16) // 16 shards of the minimum 4: 64 flows
	b := tb.Begin(time.Unix(1, 0))
	for i := range 200 {
		p, n := parse(t, filtertest.Packet{Src: self, Dst: peer, Proto: netmap.ProtoUDP, SrcPort: uint16(1000 + i), DstPort: 53})
		b.Add(p, n, filter.Out, filter.Accept)
	}
	b.End()
	flows := tb.Drain(nil)
	if len(flows)+int(tb.Overflow()) != 200 || tb.Overflow() == 0 || len(flows) > 64 {
		t.Fatalf("%d flows kept, %d packets overflowed, of 200 one-packet flows in a 64-flow table", len(flows), tb.Overflow())
	}
}

// TestDataPathAllocs: counting packets, new flows and known ones, in
// batches, allocates nothing.
func TestDataPathAllocs(t *testing.T) {
	tb := NewTable(4096)
	var pkts []*packet.Parsed
	for i := range 64 {
		p, _ := parse(t, filtertest.Packet{Src: self, Dst: peer, Proto: netmap.ProtoTCP, SrcPort: uint16(1000 + i%8), DstPort: 443, TCPFlags: filtertest.ACK})
		pkts = append(pkts, p)
	}
	port := uint16(20000)
	allocs := testing.AllocsPerRun(100, func() {
		b := tb.Begin(time.Unix(5, 0))
		for _, p := range pkts {
			b.Add(p, 1420, filter.Out, filter.Accept)
			b.Add(p, 1420, filter.In, filter.DropNoRule)
		}
		// A new flow per run too.
		port++
		np := *pkts[0]
		np.SrcPort = port
		b.Add(&np, 60, filter.Out, filter.Accept)
		b.End()
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per batch", allocs)
	}
}

// blockingSink is a sink that takes nothing until released.
type blockingSink struct {
	release chan struct{}
	mu      sync.Mutex
	buf     bytes.Buffer
}

func (s *blockingSink) Write(b []byte) (int, error) {
	<-s.release
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.Write(b)
}

// TestBlockedSinkNeverBlocksDataPath: with a sink that takes nothing, the
// data path keeps counting packets at full speed interval after interval,
// the records that do not fit the queue are counted as dropped, and the
// ones queued are written once the sink recovers.
func TestBlockedSinkNeverBlocksDataPath(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		tb := NewTable(1024)
		sink := &blockingSink{release: make(chan struct{})}
		var logBuf bytes.Buffer
		l, err := NewLogger(tb, Options{Sink: sink, Interval: time.Minute, Queue: 4, Logger: slog.New(slog.NewTextHandler(&logBuf, nil))})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan struct{})
		go func() { l.Run(ctx); close(done) }()
		for interval := range 3 {
			// 10 flows an interval: the queue of 4 (plus the one the
			// writer holds) overflows.
			start := time.Now()
			b := tb.Begin(time.Now())
			for i := range 10 {
				p, n := parse(t, filtertest.Packet{Src: self, Dst: peer, Proto: netmap.ProtoUDP, SrcPort: uint16(1000 + i), DstPort: uint16(interval + 1)})
				b.Add(p, n, filter.Out, filter.Accept)
			}
			b.End()
			if time.Since(start) != 0 {
				t.Fatalf("counting packets waited %v of virtual time", time.Since(start))
			}
			time.Sleep(time.Minute)
			synctest.Wait()
		}
		st := l.Stats()
		if st.Written != 0 || st.Dropped != 30-5 {
			t.Fatalf("with the sink blocked: %+v, want 0 written and 25 dropped (4 queued, 1 in the writer)", st)
		}
		// The daemon's log says so, each interval that lost records.
		if n := strings.Count(logBuf.String(), "flow log incomplete"); n != 3 || !strings.Contains(logBuf.String(), "records_dropped=10") {
			t.Fatalf("%d warnings:\n%s", n, logBuf.String())
		}
		close(sink.release)
		synctest.Wait()
		if st := l.Stats(); st.Written != 5 {
			t.Fatalf("after the sink recovered: %+v, want the 5 held records written", st)
		}
		cancel()
		<-done
		if n := strings.Count(sink.buf.String(), "\n"); n != 5 {
			t.Fatalf("sink got %d lines, want 5", n)
		}
	})
}

// TestBlockedSinkAtExit: Run returns within a second of its context
// ending even when the sink never takes a line.
func TestBlockedSinkAtExit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		sink := &blockingSink{release: make(chan struct{})}
		defer close(sink.release)
		tb := NewTable(64)
		l, err := NewLogger(tb, Options{Sink: sink})
		if err != nil {
			t.Fatal(err)
		}
		b := tb.Begin(time.Now())
		p, n := parse(t, filtertest.Packet{Src: self, Dst: peer, Proto: netmap.ProtoICMPv4, ICMPType: 8})
		b.Add(p, n, filter.Out, filter.Accept)
		b.End()
		ctx, cancel := context.WithCancel(t.Context())
		cancel()
		start := time.Now()
		l.Run(ctx)
		if d := time.Since(start); d != time.Second {
			t.Fatalf("Run took %v after cancel, want the 1s grace", d)
		}
	})
}

// TestRecords: the lines a Logger writes, for a flow this node opened, a
// flow a peer opened through a rule, and a dropped flow: oriented from the
// opener, with node identities, the rule's origin and the drop reason.
func TestRecords(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		rules, err := filter.Compile([]netmap.FilterRule{{
			SrcIPs:   []netip.Prefix{netip.PrefixFrom(peer, 32)},
			DstPorts: []netmap.NetPortRange{{Net: netip.PrefixFrom(self, 32), Ports: netmap.PortRange{First: 22, Last: 22}}},
			Origin:   "policy.hujson:7",
		}}, []netip.Prefix{netip.PrefixFrom(self, 32)})
		if err != nil {
			t.Fatal(err)
		}
		names := map[netip.Addr]*Node{
			self: {ID: "1", Hostname: "me", User: "alice@example.com"},
			peer: {ID: "2", Hostname: "gpu", Tags: []string{"tag:gpu"}},
		}
		var out bytes.Buffer
		tb := NewTable(64)
		l, err := NewLogger(tb, Options{
			Sink: &out, Identify: func(a netip.Addr) *Node { return names[a] },
			Rules: func() *filter.Rules { return rules },
		})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan struct{})
		go func() { l.Run(ctx); close(done) }()

		start := time.Now()
		b := tb.Begin(start)
		add := func(p filtertest.Packet, dir filter.Direction, v filter.Verdict) {
			pp, n := parse(t, p)
			b.Add(pp, n, dir, v)
		}
		outSyn := filtertest.Packet{Src: self, Dst: peer, Proto: netmap.ProtoTCP, SrcPort: 50000, DstPort: 443, TCPFlags: filtertest.SYN}
		add(outSyn, filter.Out, filter.Accept)
		add(filtertest.Packet{Src: peer, Dst: self, Proto: netmap.ProtoTCP, SrcPort: 443, DstPort: 50000, TCPFlags: filtertest.SYN | filtertest.ACK}, filter.In, filter.Accept)
		inSyn := filtertest.Packet{Src: peer, Dst: self, Proto: netmap.ProtoTCP, SrcPort: 40000, DstPort: 22, TCPFlags: filtertest.SYN}
		add(inSyn, filter.In, filter.Accept)
		denied := filtertest.Packet{Src: peer, Dst: self, Proto: netmap.ProtoTCP, SrcPort: 40001, DstPort: 9000, TCPFlags: filtertest.SYN}
		add(denied, filter.In, filter.DropNoRule)
		add(denied, filter.In, filter.DropNoRule)
		b.End()
		time.Sleep(time.Minute)
		synctest.Wait()
		cancel()
		<-done

		got := map[string]Record{}
		for line := range strings.Lines(out.String()) {
			var r Record
			if err := json.Unmarshal([]byte(line), &r); err != nil {
				t.Fatalf("line %q: %v", line, err)
			}
			got[r.Dst] = r
		}
		me, gpu := names[self], names[peer]
		want := map[string]Record{
			"100.64.0.2:443": {Start: start.UTC(), End: start.UTC(), Proto: "tcp", Src: "100.64.0.1:50000", Dst: "100.64.0.2:443",
				SrcNode: me, DstNode: gpu, Direction: "out", TxPackets: 1, TxBytes: 40, RxPackets: 1, RxBytes: 40, Verdict: "accept"},
			"100.64.0.1:22": {Start: start.UTC(), End: start.UTC(), Proto: "tcp", Src: "100.64.0.2:40000", Dst: "100.64.0.1:22",
				SrcNode: gpu, DstNode: me, Direction: "in", TxPackets: 1, TxBytes: 40, Verdict: "accept", Rule: "policy.hujson:7"},
			"100.64.0.1:9000": {Start: start.UTC(), End: start.UTC(), Proto: "tcp", Src: "100.64.0.2:40001", Dst: "100.64.0.1:9000",
				SrcNode: gpu, DstNode: me, Direction: "in", TxPackets: 2, TxBytes: 80, Verdict: "drop", Reason: "no_rule"},
		}
		if len(got) != len(want) {
			t.Fatalf("records:\n%s", out.String())
		}
		for k, w := range want {
			g, _ := json.Marshal(got[k])
			wj, _ := json.Marshal(w)
			if !bytes.Equal(g, wj) {
				t.Errorf("record to %s\n got %s\nwant %s", k, g, wj)
			}
		}
	})
}

// TestRotatingFile: lines go whole into files of at most maxSize bytes,
// the newest in FILE, older ones in FILE.1 and FILE.2, and no more than
// keep old files survive; every file is 0600.
func TestRotatingFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "flows.jsonl")
	rf, err := OpenRotating(path, 100, 2)
	if err != nil {
		t.Fatal(err)
	}
	line := func(i int) string { return strings.Repeat(string(rune('a'+i)), 39) + "\n" } // 40 bytes
	for i := range 9 {
		if _, err := rf.Write([]byte(line(i))); err != nil {
			t.Fatal(err)
		}
	}
	if err := rf.Close(); err != nil {
		t.Fatal(err)
	}
	// 2 lines per file: 0-1, 2-3, 4-5, 6-7, 8. The first two files are gone.
	for name, want := range map[string]string{
		path:        line(8),
		path + ".1": line(6) + line(7),
		path + ".2": line(4) + line(5),
	} {
		b, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		if string(b) != want {
			t.Errorf("%s = %q, want %q", filepath.Base(name), b, want)
		}
		if st, _ := os.Stat(name); st.Mode().Perm() != 0o600 {
			t.Errorf("%s mode %v, want 0600", filepath.Base(name), st.Mode().Perm())
		}
	}
	if _, err := os.Stat(path + ".3"); !os.IsNotExist(err) {
		t.Errorf("%s.3 exists (keep is 2): %v", filepath.Base(path), err)
	}
	// Reopening appends to the current file.
	rf, err = OpenRotating(path, 100, 2)
	if err != nil {
		t.Fatal(err)
	}
	rf.Write([]byte(line(9)))
	rf.Close()
	if b, _ := os.ReadFile(path); string(b) != line(8)+line(9) {
		t.Errorf("after reopen: %q", b)
	}
}

// TestNewLoggerRejects: bad options are errors.
func TestNewLoggerRejects(t *testing.T) {
	for _, o := range []Options{{}, {Sink: &bytes.Buffer{}, Interval: -1}, {Sink: &bytes.Buffer{}, Queue: -1}} {
		if _, err := NewLogger(NewTable(4), o); err == nil {
			t.Errorf("NewLogger(%+v) accepted", o)
		}
	}
}

// TestTableConcurrent: packets counted from several goroutines while the
// table is drained are each reported exactly once.
func TestTableConcurrent(t *testing.T) {
	tb := NewTable(1024)
	const writers, perWriter = 4, 5000
	var pkts []*packet.Parsed
	for i := range 100 {
		p, _ := parse(t, filtertest.Packet{Src: self, Dst: peer, Proto: netmap.ProtoUDP, SrcPort: uint16(1000 + i), DstPort: 53})
		pkts = append(pkts, p)
	}
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for i := range perWriter {
				b := tb.Begin(time.Unix(1, 0))
				b.Add(pkts[(i*7+w)%len(pkts)], 100, filter.Out, filter.Accept)
				b.Add(pkts[(i*7+w)%len(pkts)], 100, filter.In, filter.Accept)
				b.End()
			}
		})
	}
	done := make(chan struct{})
	var total uint64
	go func() {
		defer close(done)
		var buf []Flow
		for range 50 {
			buf = tb.Drain(buf[:0])
			for _, f := range buf {
				total += f.OutPackets + f.InPackets
			}
		}
	}()
	wg.Wait()
	<-done
	for _, f := range tb.Drain(nil) {
		total += f.OutPackets + f.InPackets
	}
	if want := uint64(writers * perWriter * 2); total != want || tb.Overflow() != 0 {
		t.Fatalf("counted %d packets (overflow %d), want %d", total, tb.Overflow(), want)
	}
}
