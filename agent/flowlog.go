package agent

import (
	"net/netip"
	"strconv"

	"meshd.dev/meshd/flowlog"
)

// newFlowLog builds the flow table the data path counts into and the
// logger that writes it, when Options.FlowLog is set.
func (a *Agent) newFlowLog() error {
	if a.opts.FlowLog == nil {
		return nil
	}
	t := flowlog.NewTable(a.opts.FlowLogMaxFlows)
	l, err := flowlog.NewLogger(t, flowlog.Options{
		Sink: a.opts.FlowLog, Interval: a.opts.FlowLogInterval,
		Identify: a.identifyFlow, Rules: a.pf.f.Rules, Logger: a.log,
	})
	if err != nil {
		return err
	}
	a.flows, a.flowLog = t, l
	return nil
}

// identifyFlow names the node holding ip for the flow log, from the
// current map's whois index.
func (a *Agent) identifyFlow(ip netip.Addr) *flowlog.Node {
	r, ok := a.whois.Lookup(ip)
	if !ok {
		return nil
	}
	return &flowlog.Node{ID: strconv.FormatUint(uint64(r.Node.ID), 10), Hostname: r.Node.Hostname, User: r.User, Tags: r.Node.Tags}
}

// FlowLogStats returns the flow log's counters (records written, records
// dropped because the sink was slow, packets the full table could not
// count); ok is false when the daemon runs without --flow-log.
func (a *Agent) FlowLogStats() (s flowlog.Stats, ok bool) {
	if a.flowLog == nil {
		return s, false
	}
	return a.flowLog.Stats(), true
}
