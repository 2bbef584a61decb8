package flowlog

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"meshd.dev/meshd/filter"
	"meshd.dev/meshd/packet"
)

// DefaultInterval is how long a Logger aggregates before it writes.
const DefaultInterval = time.Minute

// DefaultQueue is how many records may wait for a slow sink.
const DefaultQueue = 4096

// Node is who holds a flow's address, as the network map says.
type Node struct {
	ID       string   `json:"id"`
	Hostname string   `json:"hostname"`
	User     string   `json:"user,omitempty"`
	Tags     []string `json:"tags,omitempty"`
}

// Record is one line of the flow log: one flow over one interval. Src is
// the end that opened the flow (for TCP, the sender of the SYN; otherwise
// whichever end's packet the log saw first), Dst the other end.
type Record struct {
	Start time.Time `json:"start"`
	End   time.Time `json:"end"`
	Proto string    `json:"proto"`
	// Src and Dst are tailnet addresses, with ports for TCP, UDP and SCTP.
	Src     string `json:"src"`
	Dst     string `json:"dst"`
	SrcNode *Node  `json:"src_node,omitempty"`
	DstNode *Node  `json:"dst_node,omitempty"`
	// Direction is "out" when this node opened the flow, "in" when a peer
	// did.
	Direction string `json:"direction"`
	// Tx is what Src sent to Dst, Rx what Dst sent back: whole IP
	// packets, headers included.
	TxPackets uint64 `json:"tx_packets"`
	TxBytes   uint64 `json:"tx_bytes"`
	RxPackets uint64 `json:"rx_packets"`
	RxBytes   uint64 `json:"rx_bytes"`
	// Verdict is "accept" or "drop"; Reason is the filter's drop reason
	// (no_rule, not_local, malformed, fragment).
	Verdict string `json:"verdict"`
	Reason  string `json:"reason,omitempty"`
	// Rule is the policy rule (file:line) that let in a flow a peer
	// opened, as the rules in force at the end of the interval say.
	Rule string `json:"rule,omitempty"`
}

// Options configure a Logger.
type Options struct {
	// Sink receives one JSON line per Write. Required.
	Sink io.Writer
	// Interval is how long flows are aggregated (DefaultInterval if 0).
	Interval time.Duration
	// Queue bounds the records waiting for the sink (DefaultQueue if 0).
	Queue int
	// Identify names the node holding a tailnet address; nil or a nil
	// answer leaves the record without it.
	Identify func(netip.Addr) *Node
	// Rules returns the packet filter's rules in force, to name the rule
	// that let a flow in; nil: no rule names.
	Rules func() *filter.Rules
	// Logger receives sink errors (rate-limited to one per interval).
	Logger *slog.Logger
}

// Logger drains a Table every interval and writes its flows to a sink.
type Logger struct {
	t    *Table
	opts Options
	q    chan *Record

	written atomic.Uint64
	dropped atomic.Uint64
	errs    atomic.Uint64

	buf []Flow // the drain's reused buffer; drain goroutine only
	// What the last warning reported; drain goroutine only.
	warnedDropped, warnedOverflow uint64
}

// NewLogger returns a Logger for t. Run starts it.
func NewLogger(t *Table, opts Options) (*Logger, error) {
	if opts.Sink == nil {
		return nil, fmt.Errorf("flow log: no sink")
	}
	if opts.Interval < 0 || opts.Queue < 0 {
		return nil, fmt.Errorf("flow log: negative interval %v or queue %d", opts.Interval, opts.Queue)
	}
	if opts.Interval == 0 {
		opts.Interval = DefaultInterval
	}
	if opts.Queue == 0 {
		opts.Queue = DefaultQueue
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &Logger{t: t, opts: opts, q: make(chan *Record, opts.Queue)}, nil
}

// Stats are a Logger's counters.
type Stats struct {
	// Written is how many records reached the sink.
	Written uint64
	// Dropped is how many records were discarded because the sink did
	// not keep up (the queue was full).
	Dropped uint64
	// Overflow is how many packets were not counted because the flow
	// table was full.
	Overflow uint64
	// SinkErrors is how many writes to the sink failed.
	SinkErrors uint64
}

// Stats returns the Logger's counters. Safe for concurrent use; metrics
// collectors read it at scrape time.
func (l *Logger) Stats() Stats {
	return Stats{Written: l.written.Load(), Dropped: l.dropped.Load(), Overflow: l.t.Overflow(), SinkErrors: l.errs.Load()}
}

// Run drains the table every interval until ctx ends, then drains it a
// last time and gives the sink up to a second to take what is queued.
func (l *Logger) Run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Add(1)
	writerDone := make(chan struct{})
	go func() {
		defer wg.Done()
		defer close(writerDone)
		l.write()
	}()
	tick := time.NewTicker(l.opts.Interval)
	defer tick.Stop()
loop:
	for {
		select {
		case <-tick.C:
			l.flush()
		case <-ctx.Done():
			break loop
		}
	}
	l.flush()
	close(l.q)
	// A sink that blocks forever must not hold the daemon's exit.
	t := time.NewTimer(time.Second)
	defer t.Stop()
	select {
	case <-writerDone:
	case <-t.C:
		l.opts.Logger.Warn("flow log: sink still blocked at exit; unwritten records are lost", "queued", len(l.q))
	}
}

// flush drains the table and queues its flows for the sink, dropping
// (and counting) those that do not fit. Only Run's goroutine calls it.
func (l *Logger) flush() {
	l.buf = l.t.Drain(l.buf[:0])
	var rules *filter.Rules
	if l.opts.Rules != nil {
		rules = l.opts.Rules()
	}
	for i := range l.buf {
		r := l.record(&l.buf[i], rules)
		select {
		case l.q <- r:
		default:
			l.dropped.Add(1)
		}
	}
	// Say in the daemon's log, once an interval at most, that the flow
	// log is incomplete: a reader of the file alone could not tell.
	dropped, overflow := l.dropped.Load(), l.t.Overflow()
	if dropped != l.warnedDropped || overflow != l.warnedOverflow {
		l.opts.Logger.Warn("flow log incomplete", "records_dropped", dropped-l.warnedDropped, "packets_not_counted", overflow-l.warnedOverflow,
			"why", "records are dropped when the sink does not keep up; packets are not counted when the flow table is full (--flow-log-max-flows)")
		l.warnedDropped, l.warnedOverflow = dropped, overflow
	}
}

func (l *Logger) record(f *Flow, rules *filter.Rules) *Record {
	local, remote := f.Local.Netip(), f.Remote.Netip()
	r := &Record{
		Start: f.First.UTC(), End: f.Last.UTC(), Proto: protoName(f.Proto),
		Verdict: "accept", Direction: "out",
	}
	src, dst := netip.AddrPortFrom(local, f.LPort), netip.AddrPortFrom(remote, f.RPort)
	r.TxPackets, r.TxBytes, r.RxPackets, r.RxBytes = f.OutPackets, f.OutBytes, f.InPackets, f.InBytes
	if f.RemoteOpened {
		r.Direction = "in"
		src, dst = dst, src
		r.TxPackets, r.TxBytes, r.RxPackets, r.RxBytes = f.InPackets, f.InBytes, f.OutPackets, f.OutBytes
	}
	r.Src, r.Dst = addrString(src, f.Proto), addrString(dst, f.Proto)
	if l.opts.Identify != nil {
		if src.Addr().IsValid() {
			r.SrcNode = l.opts.Identify(src.Addr())
		}
		if dst.Addr().IsValid() {
			r.DstNode = l.opts.Identify(dst.Addr())
		}
	}
	if f.Verdict != filter.Accept {
		r.Verdict, r.Reason = "drop", f.Verdict.String()
	} else if f.RemoteOpened && rules != nil {
		if origin, ok := rules.Match(f.Proto, remote, local, f.LPort); ok {
			r.Rule = origin
		}
	}
	return r
}

// addrString is the address with its port for protocols that have ports.
func addrString(ap netip.AddrPort, proto uint8) string {
	if !ap.Addr().IsValid() {
		return ""
	}
	switch proto {
	case packet.ProtoTCP, packet.ProtoUDP, packet.ProtoSCTP:
		return ap.String()
	}
	return ap.Addr().String()
}

func protoName(p uint8) string {
	switch p {
	case packet.ProtoTCP:
		return "tcp"
	case packet.ProtoUDP:
		return "udp"
	case packet.ProtoICMPv4:
		return "icmp"
	case packet.ProtoICMPv6:
		return "icmpv6"
	case packet.ProtoSCTP:
		return "sctp"
	}
	return strconv.Itoa(int(p))
}

// write is the writer goroutine: it encodes each record as one line and
// writes it with one Write call, so that a rotating sink rotates between
// lines.
func (l *Logger) write() {
	var lastErr time.Time
	for r := range l.q {
		b, err := json.Marshal(r)
		if err == nil {
			b = append(b, '\n')
			_, err = l.opts.Sink.Write(b)
		}
		if err != nil {
			l.errs.Add(1)
			if now := time.Now(); now.Sub(lastErr) >= l.opts.Interval {
				lastErr = now
				l.opts.Logger.Warn("flow log: write failed", "err", err)
			}
			continue
		}
		l.written.Add(1)
	}
}
