package serve

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
)

// Proto is how a served port speaks to its callers.
type Proto string

// The protocols an entry can serve.
const (
	// HTTP is a reverse proxy that adds the caller's identity headers.
	HTTP Proto = "http"
	// HTTPS is HTTP over TLS, with a certificate from Options.GetCertificate.
	HTTPS Proto = "https"
	// TCP relays the byte stream to a local address, without identity.
	TCP Proto = "tcp"
)

// ParseProto accepts "http", "https" or "tcp".
func ParseProto(s string) (Proto, error) {
	switch p := Proto(s); p {
	case HTTP, HTTPS, TCP:
		return p, nil
	}
	return "", fmt.Errorf("serve: protocol %q: want http, https or tcp", s)
}

// Entry is one served tailnet port: what callers speak to it and where it
// goes on this machine.
type Entry struct {
	Proto Proto  `json:"proto"`
	Port  uint16 `json:"port"`
	// Target is an http:// or https:// URL on a loopback host for HTTP and
	// HTTPS, and a loopback host:port for TCP, in the form NewEntry makes.
	Target string `json:"target"`
}

func (e Entry) String() string { return fmt.Sprintf("%s %d -> %s", e.Proto, e.Port, e.Target) }

// NewEntry checks and normalises an entry from what a user typed: PORT is
// a tailnet TCP port, to a local target.
//
// For http and https, to is an http:// or https:// URL (optionally with a
// path) on localhost, 127.0.0.0/8 or [::1], a bare host:port on one of
// those (meaning http://), or a bare port (http://127.0.0.1:PORT). For tcp
// it is host:port on one of those hosts, with or without tcp://, or a bare
// port (127.0.0.1:PORT).
//
// Only loopback targets are allowed: a tailnet peer that may reach a
// served port would otherwise reach, through the daemon (root, on the
// host's network), any address the host can: its LAN, a cloud metadata
// service, other tailnets' nodes. A service elsewhere gets its own node or
// a proxy on the host that the operator configures on purpose.
func NewEntry(proto Proto, port uint16, to string) (Entry, error) {
	if _, err := ParseProto(string(proto)); err != nil {
		return Entry{}, err
	}
	if port == 0 {
		return Entry{}, errors.New("serve: tailnet port 0: want 1-65535")
	}
	var (
		target string
		err    error
	)
	if proto == TCP {
		target, err = tcpTarget(to)
	} else {
		var u *url.URL
		if u, err = httpTarget(to); err == nil {
			target = u.String()
		}
	}
	if err != nil {
		return Entry{}, err
	}
	return Entry{Proto: proto, Port: port, Target: target}, nil
}

// loopbackHost reports whether host (without brackets or port) is one the
// daemon may connect to: "localhost" or a loopback IP literal.
func loopbackHost(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.Zone() == "" && ip.Unmap().IsLoopback()
}

const errNotLoopback = "serve only proxies to this machine: the host must be localhost, 127.0.0.1 (any of 127.0.0.0/8) or [::1]"

func isPort(s string) (uint16, bool) {
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || n == 0 || strings.TrimLeft(s, "0123456789") != "" {
		return 0, false
	}
	return uint16(n), true
}

func httpTarget(to string) (*url.URL, error) {
	if to == "" {
		return nil, errors.New("serve: no target: --to URL, e.g. --to http://127.0.0.1:3000")
	}
	if p, ok := isPort(to); ok {
		return &url.URL{Scheme: "http", Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(int(p)))}, nil
	}
	raw := to
	if !strings.Contains(to, "://") {
		raw = "http://" + to
	}
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("serve: target %q is not a URL: %w", to, err)
	}
	switch {
	case u.Scheme != "http" && u.Scheme != "https":
		return nil, fmt.Errorf("serve: target %q: want an http:// or https:// URL", to)
	case u.Opaque != "" || u.Host == "":
		return nil, fmt.Errorf("serve: target %q: want http://HOST:PORT[/PATH]", to)
	case u.User != nil:
		return nil, fmt.Errorf("serve: target %q: credentials in the URL are not supported", to)
	case u.RawQuery != "" || u.ForceQuery || u.Fragment != "" || strings.Contains(to, "#"):
		return nil, fmt.Errorf("serve: target %q: a query or fragment is not supported, only a path", to)
	case !loopbackHost(u.Hostname()):
		return nil, fmt.Errorf("serve: target %q: %s", to, errNotLoopback)
	}
	if p := u.Port(); p != "" {
		if _, ok := isPort(p); !ok {
			return nil, fmt.Errorf("serve: target %q: port %q: want 1-65535", to, p)
		}
	} else if strings.HasSuffix(u.Host, ":") {
		return nil, fmt.Errorf("serve: target %q: empty port", to)
	}
	host := strings.ToLower(u.Hostname())
	if ip, err := netip.ParseAddr(host); err == nil {
		host = ip.Unmap().String()
	}
	if u.Port() != "" {
		host = net.JoinHostPort(host, u.Port())
	} else if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	return &url.URL{Scheme: u.Scheme, Host: host, Path: u.Path, RawPath: u.RawPath}, nil
}

func tcpTarget(to string) (string, error) {
	if to == "" {
		return "", errors.New("serve: no target: --to HOST:PORT, e.g. --to 127.0.0.1:22")
	}
	addr := strings.TrimPrefix(to, "tcp://")
	if p, ok := isPort(addr); ok {
		return net.JoinHostPort("127.0.0.1", strconv.Itoa(int(p))), nil
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", fmt.Errorf("serve: target %q: want HOST:PORT or a port", to)
	}
	if _, ok := isPort(port); !ok {
		return "", fmt.Errorf("serve: target %q: port %q: want 1-65535", to, port)
	}
	if !loopbackHost(host) {
		return "", fmt.Errorf("serve: target %q: %s", to, errNotLoopback)
	}
	host = strings.ToLower(host)
	if ip, err := netip.ParseAddr(host); err == nil {
		host = ip.Unmap().String()
	}
	return net.JoinHostPort(host, port), nil
}

// Config is the whole serve configuration: at most one entry per tailnet
// port, sorted by port.
type Config struct {
	Entries []Entry `json:"entries"`
}

// UnmarshalJSON refuses fields this version does not know: a newer
// version's field may restrict what is served, and dropping it silently
// would expose more than the operator configured.
func (c *Config) UnmarshalJSON(b []byte) error {
	type plain Config
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var p plain
	if err := dec.Decode(&p); err != nil {
		return fmt.Errorf("serve configuration: %w", err)
	}
	*c = Config(p)
	return nil
}

// Validate checks every entry is what NewEntry would make of it and no
// port appears twice; a file edited by hand or damaged fails here.
func (c Config) Validate() error {
	seen := map[uint16]bool{}
	for _, e := range c.Entries {
		n, err := NewEntry(e.Proto, e.Port, e.Target)
		if err != nil {
			return err
		}
		if n != e {
			return fmt.Errorf("serve: entry %v is not in normal form (want target %q)", e, n.Target)
		}
		if seen[e.Port] {
			return fmt.Errorf("serve: tailnet port %d appears twice", e.Port)
		}
		seen[e.Port] = true
	}
	return nil
}

// Find returns the entry on port, if any.
func (c Config) Find(port uint16) (Entry, bool) {
	i := slices.IndexFunc(c.Entries, func(e Entry) bool { return e.Port == port })
	if i < 0 {
		return Entry{}, false
	}
	return c.Entries[i], true
}

// with returns a copy of c with e added, kept sorted by port.
func (c Config) with(e Entry) Config {
	out := Config{Entries: append(slices.Clone(c.Entries), e)}
	slices.SortFunc(out.Entries, func(a, b Entry) int { return int(a.Port) - int(b.Port) })
	return out
}

// without returns a copy of c without the entry on port.
func (c Config) without(port uint16) Config {
	return Config{Entries: slices.DeleteFunc(slices.Clone(c.Entries), func(e Entry) bool { return e.Port == port })}
}
