package agent

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/netmap"
)

// Health thresholds (docs/health.md).
const (
	// maxClockSkew is how far the node's clock may drift from the
	// coordinator's before status warns: key expiry and the tailnet CA's
	// certificates are judged on the coordinator's clock.
	maxClockSkew = 30 * time.Second
	// keyExpiryWarning is how long before its node key expires a node
	// warns, so an operator has time to re-enrol it.
	keyExpiryWarning = 7 * 24 * time.Hour
)

// clockSkewer is implemented by control clients that read the
// coordinator's clock (controlclient.Client).
type clockSkewer interface {
	ClockSkew() (skew time.Duration, at time.Time, ok bool)
}

// healthInputs is what the health checks look at, gathered under a.mu.
type healthInputs struct {
	running      bool // the control session runs and the data plane is up
	ctlState     string
	ctlReachErr  error
	skew         clockSkewer
	self         *netmap.Node
	hasDERPMap   bool
	relays       int // relay connections the bind has
	relaysUp     int // of which connected
	mtuProblems  []string
	relayStarted time.Time // when the data plane came up
}

// relayGrace is how long a new data plane may take to connect its relay
// before "no relay" is a warning rather than start-up.
const relayGrace = 10 * time.Second

// health returns the warnings for in, in localapi.HealthCodes order.
func health(in healthInputs, now time.Time) []localapi.HealthWarning {
	if !in.running {
		return nil
	}
	var ws []localapi.HealthWarning
	switch {
	case in.ctlState != "connected":
		ws = append(ws, localapi.HealthWarning{Code: localapi.HealthCoordinatorUnreachable,
			Message: "coordinator not connected (" + in.ctlState + "): running on the last network map; new peers and policy changes do not arrive"})
	case in.ctlReachErr != nil:
		ws = append(ws, localapi.HealthWarning{Code: localapi.HealthCoordinatorUnreachable,
			Message: "coordinator unreachable, running on the last network map: " + in.ctlReachErr.Error()})
	}
	if in.hasDERPMap && in.relaysUp == 0 && now.Sub(in.relayStarted) > relayGrace {
		ws = append(ws, localapi.HealthWarning{Code: localapi.HealthNoRelay,
			Message: fmt.Sprintf("no DERP relay connected (%d tried): peers behind NATs without a direct path are unreachable; check outbound TCP to the relays (meshd netcheck)", in.relays)})
	}
	if len(in.mtuProblems) > 0 {
		ws = append(ws, localapi.HealthWarning{Code: localapi.HealthMTUProblem,
			Message: "direct path drops full-size packets to " + strings.Join(in.mtuProblems, ", ") + ": lower --mtu or let ICMP fragmentation-needed through (meshd status lists the path MTU)"})
	}
	if in.skew != nil {
		if skew, _, ok := in.skew.ClockSkew(); ok && (skew > maxClockSkew || skew < -maxClockSkew) {
			ws = append(ws, localapi.HealthWarning{Code: localapi.HealthClockSkew,
				Message: fmt.Sprintf("this node's clock is %v %s the coordinator's: key expiry and certificates are judged on the coordinator's clock; fix time sync (NTP)",
					skew.Abs().Round(time.Second), map[bool]string{true: "behind", false: "ahead of"}[skew > 0])})
		}
	}
	if in.self != nil && !in.self.KeyExpiry.IsZero() {
		if left := in.self.KeyExpiry.Sub(now); left < keyExpiryWarning {
			msg := fmt.Sprintf("node key expires in %v (%s): re-enrol with meshd up --authkey KEY, or ask an admin to extend it", left.Round(time.Minute), in.self.KeyExpiry.UTC().Format(time.RFC3339))
			if left <= 0 {
				msg = "node key expired at " + in.self.KeyExpiry.UTC().Format(time.RFC3339) + ": re-enrol with meshd up --authkey KEY"
			}
			ws = append(ws, localapi.HealthWarning{Code: localapi.HealthKeyExpiring, Message: msg})
		}
	}
	return ws
}

// healthInputsLocked gathers the health inputs; a.mu held. mtuProblems
// are the peers whose direct path drops full-size packets, which the
// caller knows from the per-peer paths it has just read.
func (a *Agent) healthInputsLocked(mtuProblems []string) healthInputs {
	in := healthInputs{
		running:     a.sess != nil && a.eng != nil,
		ctlState:    a.ctlState,
		ctlReachErr: a.ctlReachErr,
		skew:        a.skew,
		mtuProblems: mtuProblems,
	}
	if a.nm != nil {
		in.self = &a.nm.Self
	}
	if a.eng != nil {
		in.hasDERPMap = a.eng.bind.HasDERPMap()
		in.relays, in.relaysUp = a.eng.bind.RelaysConnected()
		in.relayStarted = a.eng.started
	}
	slices.Sort(in.mtuProblems)
	return in
}
