package control

import (
	"log/slog"
	"net"
	"time"
)

// DefaultDeadConnTimeout is ServerOptions.DeadConnTimeout's default: with
// the 20 s keep-alives, a vanished node goes offline within about a
// minute.
const DefaultDeadConnTimeout = 40 * time.Second

// deadConnListener sets the dead-connection timeout on the TCP
// connections it accepts.
type deadConnListener struct {
	net.Listener
	timeout time.Duration
	log     *slog.Logger
}

func (l deadConnListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return c, err
	}
	if tc, ok := c.(*net.TCPConn); ok {
		if err := setUserTimeout(tc, l.timeout); err != nil {
			l.log.Debug("dead connection timeout not set", "remote", c.RemoteAddr(), "err", err)
		}
	}
	return c, nil
}
