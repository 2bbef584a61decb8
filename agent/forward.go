package agent

import (
	"fmt"
	"net"
	"strconv"
	"strings"
)

// ParseForwards parses --forward values: comma-separated PORT=LOCALADDR
// items, where LOCALADDR is host:port or a bare port (meaning 127.0.0.1).
func ParseForwards(s string) ([]Forward, error) {
	var out []Forward
	for item := range strings.SplitSeq(s, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		portStr, target, ok := strings.Cut(item, "=")
		if !ok {
			return nil, fmt.Errorf("--forward %q: want PORT=LOCALADDR, e.g. 8000=127.0.0.1:8000", item)
		}
		port, err := strconv.ParseUint(portStr, 10, 16)
		if err != nil || port == 0 {
			return nil, fmt.Errorf("--forward %q: tailnet port %q must be 1-65535", item, portStr)
		}
		if _, err := strconv.ParseUint(target, 10, 16); err == nil {
			target = net.JoinHostPort("127.0.0.1", target)
		}
		host, tport, err := net.SplitHostPort(target)
		if err != nil {
			return nil, fmt.Errorf("--forward %q: local address %q must be host:port", item, target)
		}
		if p, err := strconv.ParseUint(tport, 10, 16); err != nil || p == 0 || host == "" {
			return nil, fmt.Errorf("--forward %q: local address %q must be host:port with a port of 1-65535", item, target)
		}
		for _, f := range out {
			if f.Port == uint16(port) {
				return nil, fmt.Errorf("--forward: tailnet port %d given twice", port)
			}
		}
		out = append(out, Forward{Port: uint16(port), Target: target})
	}
	return out, nil
}
