//go:build !linux

package control

import (
	"net"
	"time"
)

// setUserTimeout does nothing where TCP_USER_TIMEOUT does not exist: a
// vanished node's stream then ends when TCP gives up.
func setUserTimeout(*net.TCPConn, time.Duration) error { return nil }
