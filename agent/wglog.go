package agent

import (
	"context"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"

	"meshd.dev/meshd/internal/wireguard/device"
)

// wgLogger sends wireguard-go's logs to slog.
//
// Its errors go out at Warn: they are rare in normal operation (the magic
// bind always gives every peer an endpoint) and say something is wrong
// (a TUN or socket failing, a peer sending garbage). They are rate limited,
// because a broken socket or a hostile peer can produce one per packet.
//
// Its verbose lines, several per handshake and peer event, are wanted only
// when debugging: unless log accepts Debug (decided once, at engine
// creation, as the level is fixed at start-up) they go to DiscardLogf, so
// wireguard-go does not even format them.
func wgLogger(log *slog.Logger) *device.Logger {
	we := &wgErrors{log: log, lim: rate.NewLimiter(rate.Every(time.Second), 10)}
	l := &device.Logger{Verbosef: device.DiscardLogf, Errorf: we.errorf}
	if log.Enabled(context.Background(), slog.LevelDebug) {
		l.Verbosef = func(format string, args ...any) { log.Debug("wireguard: " + fmt.Sprintf(format, args...)) }
	}
	return l
}

// wgErrors logs wireguard-go's errors at Warn, at most lim allows, and says
// how many were dropped in between.
type wgErrors struct {
	log        *slog.Logger
	lim        *rate.Limiter
	suppressed atomic.Int64
}

func (w *wgErrors) errorf(format string, args ...any) {
	if !w.lim.Allow() {
		w.suppressed.Add(1)
		return
	}
	msg := "wireguard: " + fmt.Sprintf(format, args...)
	if n := w.suppressed.Swap(0); n > 0 {
		w.log.Warn(msg, "suppressed_since_last", n)
		return
	}
	w.log.Warn(msg)
}
