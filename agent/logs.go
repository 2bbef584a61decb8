package agent

import "meshd.dev/meshd/agent/localapi"

// RecentLogs returns the daemon's recent log lines (secrets masked), if
// it keeps them (Options.LogRing).
func (a *Agent) RecentLogs() (*localapi.Logs, bool) {
	if a.opts.LogRing == nil {
		return nil, false
	}
	lines, dropped := a.opts.LogRing.Lines()
	return &localapi.Logs{Lines: lines, Dropped: dropped}, true
}
