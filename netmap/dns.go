package netmap

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
)

// DefaultDNSSuffix is the MagicDNS suffix a coordinator uses unless told
// otherwise. ".internal" is reserved by ICANN for private use (2024), so a
// tailnet name can never shadow or be shadowed by a public one.
const DefaultDNSSuffix = "meshd.internal"

// The in-tailnet resolver's addresses. 100.100.100.100 is what Tailscale
// users know as MagicDNS (the coordinator never hands it out); the IPv6 one
// sits in the tailnet's own ULA /48 at an address the pool never assigns
// (node addresses embed a 100.64.0.0/10 IPv4 in their low 32 bits).
var (
	ResolverIPv4 = netip.MustParseAddr("100.100.100.100")
	ResolverIPv6 = netip.MustParseAddr("fd5e:5a1e:d::53")
)

// DNSConfig is the tailnet's name service as the coordinator configures it
// for every node.
type DNSConfig struct {
	// Suffix is the MagicDNS domain without the trailing dot
	// ("meshd.internal"): each node is HOSTNAME.Suffix.
	Suffix string `json:"suffix"`
	// SearchDomains are appended to single-label names by the node's
	// resolver configuration; the Suffix first.
	SearchDomains []string `json:"search_domains,omitempty"`
	// Routes is split DNS: queries for names under a key (a domain without
	// the trailing dot) go to its resolvers instead of the host's.
	Routes map[string][]netip.AddrPort `json:"routes,omitempty"`
}

// DNSName is a node's fully qualified MagicDNS name, with the trailing dot.
// It is empty when either part is.
func DNSName(hostname, suffix string) string {
	if hostname == "" || suffix == "" {
		return ""
	}
	return hostname + "." + suffix + "."
}

// CheckDomain reports whether d (no trailing dot) is a DNS name of
// lowercase LDH labels that meshd can serve or route: at most 253 bytes,
// labels of 1-63 bytes that neither start nor end with '-'.
func CheckDomain(d string) error {
	if d == "" {
		return errors.New("empty domain")
	}
	if len(d) > 253 {
		return fmt.Errorf("domain %.20q...: longer than 253 bytes", d)
	}
	for label := range strings.SplitSeq(d, ".") {
		if label == "" || len(label) > 63 {
			return fmt.Errorf("domain %q: labels must be 1-63 bytes", d)
		}
		if label[0] == '-' || label[len(label)-1] == '-' {
			return fmt.Errorf("domain %q: label %q starts or ends with '-'", d, label)
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
				return fmt.Errorf("domain %q: use lowercase letters, digits and '-' only", d)
			}
		}
	}
	return nil
}

// Validate checks the invariants a resolver relies on.
func (c *DNSConfig) Validate() error {
	if err := CheckDomain(c.Suffix); err != nil {
		return fmt.Errorf("dns suffix: %w", err)
	}
	for _, d := range c.SearchDomains {
		if err := CheckDomain(d); err != nil {
			return fmt.Errorf("dns search domain: %w", err)
		}
	}
	for d, rs := range c.Routes {
		if err := CheckDomain(d); err != nil {
			return fmt.Errorf("dns route: %w", err)
		}
		if len(rs) == 0 {
			return fmt.Errorf("dns route %q: no resolvers", d)
		}
		for _, r := range rs {
			if !r.IsValid() || r.Port() == 0 {
				return fmt.Errorf("dns route %q: resolver %v is not an IP:port", d, r)
			}
		}
	}
	return nil
}
