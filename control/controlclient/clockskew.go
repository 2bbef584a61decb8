package controlclient

import (
	"net/http"
	"sync"
	"time"
)

// skewTransport notes the coordinator's clock from the Date header of its
// answers (every HTTP server sends one, with one-second resolution), so a
// node can warn when its clock and the coordinator's disagree: key expiry
// and the tailnet CA's certificates are judged on the coordinator's clock.
type skewTransport struct {
	rt http.RoundTripper
	r  *skewReading
}

// skewReading is the last reading of the coordinator's clock.
type skewReading struct {
	mu   sync.Mutex
	skew time.Duration // coordinator's clock minus ours
	at   time.Time     // when skew was measured; zero: never
}

func (t *skewTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	sent := time.Now()
	resp, err := t.rt.RoundTrip(req)
	if err != nil {
		return resp, err
	}
	got := time.Now()
	if d, perr := http.ParseTime(resp.Header.Get("Date")); perr == nil {
		t.r.note(d, sent, got)
	}
	return resp, nil
}

// note records the coordinator's clock reading d of an answer to a request
// sent at sent and answered at got. The reading was taken somewhere in
// between and truncated to the second, so only the part of the difference
// beyond that uncertainty counts as skew.
func (t *skewReading) note(d, sent, got time.Time) {
	var skew time.Duration
	switch {
	case d.Add(time.Second).Before(sent):
		skew = d.Add(time.Second).Sub(sent) // coordinator behind
	case d.After(got):
		skew = d.Sub(got) // coordinator ahead
	}
	t.mu.Lock()
	t.skew, t.at = skew, got
	t.mu.Unlock()
}

// ClockSkew reports how far the coordinator's clock was ahead of this
// node's (negative: behind) at the last answer, beyond what the Date
// header's resolution and the round trip hide, and when that was measured;
// ok is false before any answer.
func (c *Client) ClockSkew() (skew time.Duration, at time.Time, ok bool) {
	c.clock.mu.Lock()
	defer c.clock.mu.Unlock()
	return c.clock.skew, c.clock.at, !c.clock.at.IsZero()
}
