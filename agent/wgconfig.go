package agent

import (
	"bufio"
	"encoding/hex"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"meshd.dev/meshd/netmap"
)

// keepaliveSeconds is WireGuard's persistent keepalive for online peers.
const keepaliveSeconds = 25

// wgPeer is the part of a peer's configuration the agent sets on the
// WireGuard device.
type wgPeer struct {
	Key        netmap.NodePublic
	Endpoint   netip.AddrPort // zero: none known yet
	AllowedIPs []netip.Prefix // sorted
	// BindEndpoint, when set, is the endpoint string given to WireGuard
	// instead of Endpoint: the magic bind's per-peer endpoint.
	BindEndpoint string
	// Keepalive is set for peers the coordinator reports online. An
	// offline peer gets none: WireGuard would otherwise retry a handshake
	// to it every 5 s forever and hold buffers for it, which is most of an
	// idle node's CPU and memory in a large tailnet.
	Keepalive bool
}

func (p wgPeer) keepaliveSeconds() int {
	if p.Keepalive {
		return keepaliveSeconds
	}
	return 0
}

// endpointText is what goes after UAPI "endpoint=", "" for none.
func (p wgPeer) endpointText() string {
	if p.BindEndpoint != "" {
		return p.BindEndpoint
	}
	if p.Endpoint.IsValid() {
		return p.Endpoint.String()
	}
	return ""
}

func (p wgPeer) equalIPs(o wgPeer) bool { return slices.Equal(p.AllowedIPs, o.AllowedIPs) }

// wgPeersFromMap derives the desired WireGuard peers from a network map.
// pick chooses the endpoint among a peer's candidates.
func wgPeersFromMap(nm *netmap.NetworkMap, pick func([]netip.AddrPort) netip.AddrPort) map[netmap.NodePublic]wgPeer {
	out := make(map[netmap.NodePublic]wgPeer, len(nm.Peers))
	for _, n := range nm.Peers {
		if n.NodeKey.IsZero() || n.NodeKey == nm.Self.NodeKey {
			continue
		}
		ips := slices.Clone(n.AllowedIPs)
		if len(ips) == 0 {
			ips = slices.Clone(n.Addresses)
		}
		slices.SortFunc(ips, netmap.ComparePrefix)
		ips = slices.Compact(ips)
		out[n.NodeKey] = wgPeer{Key: n.NodeKey, Endpoint: pick(n.Endpoints), AllowedIPs: ips, Keepalive: n.Online}
	}
	return out
}

// uapiDiff returns the UAPI "set" text that turns the device's peers from old
// into want, touching only peers that changed: an unchanged peer keeps its
// session, and a peer whose endpoint we do not change keeps whatever
// endpoint WireGuard roamed to. It returns "" when nothing changed.
func uapiDiff(old, want map[netmap.NodePublic]wgPeer) string {
	var b strings.Builder
	keys := make([]netmap.NodePublic, 0, len(old)+len(want))
	for k := range old {
		keys = append(keys, k)
	}
	for k := range want {
		if _, ok := old[k]; !ok {
			keys = append(keys, k)
		}
	}
	// Sorted so that the output (and tests) are deterministic.
	slices.SortFunc(keys, func(a, b netmap.NodePublic) int { return strings.Compare(string(a[:]), string(b[:])) })
	for _, k := range keys {
		o, had := old[k]
		w, keep := want[k]
		switch {
		case had && !keep:
			fmt.Fprintf(&b, "public_key=%s\nremove=true\n", hex.EncodeToString(k[:]))
		case !had && keep:
			// A persistent keepalive makes a (re)started node handshake
			// with every online peer at once, so a peer holding a stale
			// session after our restart recovers immediately instead of
			// after WireGuard's 15 s timeout; it also keeps NAT mappings
			// warm.
			fmt.Fprintf(&b, "public_key=%s\npersistent_keepalive_interval=%d\n", hex.EncodeToString(k[:]), w.keepaliveSeconds())
			if ep := w.endpointText(); ep != "" {
				fmt.Fprintf(&b, "endpoint=%s\n", ep)
			}
			for _, p := range w.AllowedIPs {
				fmt.Fprintf(&b, "allowed_ip=%s\n", p)
			}
		default:
			epChanged := w.endpointText() != "" && w.endpointText() != o.endpointText()
			ipsChanged := !w.equalIPs(o)
			kaChanged := w.Keepalive != o.Keepalive
			if !epChanged && !ipsChanged && !kaChanged {
				continue
			}
			fmt.Fprintf(&b, "public_key=%s\nupdate_only=true\n", hex.EncodeToString(k[:]))
			if kaChanged {
				// Turning it on sends a keepalive at once: a peer that
				// just came online gets a handshake without waiting for
				// traffic.
				fmt.Fprintf(&b, "persistent_keepalive_interval=%d\n", w.keepaliveSeconds())
			}
			if epChanged {
				fmt.Fprintf(&b, "endpoint=%s\n", w.endpointText())
			}
			if ipsChanged {
				b.WriteString("replace_allowed_ips=true\n")
				for _, p := range w.AllowedIPs {
					fmt.Fprintf(&b, "allowed_ip=%s\n", p)
				}
			}
		}
	}
	return b.String()
}

// wgPeerStats is one peer's live counters from the device.
type wgPeerStats struct {
	Endpoint      netip.AddrPort
	LastHandshake time.Time // zero: never
	RxBytes       uint64
	TxBytes       uint64
}

// wgDeviceStats is the parsed output of a UAPI "get".
type wgDeviceStats struct {
	ListenPort uint16
	Peers      map[netmap.NodePublic]wgPeerStats
}

// parseUAPIGet parses wireguard-go's IpcGet output. Unknown keys are ignored
// so that a newer wireguard-go does not break status.
func parseUAPIGet(text string) (*wgDeviceStats, error) {
	st := &wgDeviceStats{Peers: map[netmap.NodePublic]wgPeerStats{}}
	var (
		cur     *netmap.NodePublic
		ps      wgPeerStats
		sec     int64
		nsec    int64
		lineNum int
	)
	flush := func() {
		if cur == nil {
			return
		}
		if sec != 0 || nsec != 0 {
			ps.LastHandshake = time.Unix(sec, nsec)
		}
		st.Peers[*cur] = ps
	}
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		lineNum++
		line := sc.Text()
		if line == "" {
			continue
		}
		key, val, ok := strings.Cut(line, "=")
		if !ok {
			return nil, fmt.Errorf("uapi line %d: no '=' in %q", lineNum, truncateString(line, 40))
		}
		var err error
		switch key {
		case "listen_port":
			var p uint64
			p, err = strconv.ParseUint(val, 10, 16)
			st.ListenPort = uint16(p)
		case "public_key":
			flush()
			var raw []byte
			raw, err = hex.DecodeString(val)
			if err == nil && len(raw) != 32 {
				err = fmt.Errorf("want 32 bytes, got %d", len(raw))
			}
			if err == nil {
				var k netmap.NodePublic
				copy(k[:], raw)
				cur, ps, sec, nsec = &k, wgPeerStats{}, 0, 0
			}
		case "endpoint", "last_handshake_time_sec", "last_handshake_time_nsec", "rx_bytes", "tx_bytes":
			if cur == nil {
				return nil, fmt.Errorf("uapi line %d: %s before any public_key", lineNum, key)
			}
			switch key {
			case "endpoint":
				ps.Endpoint, err = netip.ParseAddrPort(val)
			case "last_handshake_time_sec":
				sec, err = strconv.ParseInt(val, 10, 64)
			case "last_handshake_time_nsec":
				nsec, err = strconv.ParseInt(val, 10, 64)
			case "rx_bytes":
				ps.RxBytes, err = strconv.ParseUint(val, 10, 64)
			case "tx_bytes":
				ps.TxBytes, err = strconv.ParseUint(val, 10, 64)
			}
		}
		if err != nil {
			return nil, fmt.Errorf("uapi line %d (%s): %w", lineNum, key, err)
		}
	}
	flush()
	return st, nil
}

func truncateString(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
