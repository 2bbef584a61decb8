package policy

import (
	"net/netip"

	"meshd.dev/meshd/netmap"
)

// BootstrapOrigin is the Origin of the bootstrap default's only rule.
const BootstrapOrigin = "bootstrap default (no policy loaded: every node may reach every node)"

// Bootstrap returns the policy a coordinator uses when none is loaded:
// Tailscale's default, every node may reach every node on every port and
// any tag may be applied. Coordinators should say so at start and in
// `admin policy get`, and set MapResponse.PolicyBootstrap.
func Bootstrap() *Policy {
	all := selector{kind: selAny, raw: "*", pos: Pos{File: BootstrapOrigin}}
	return &Policy{
		file:      BootstrapOrigin,
		bootstrap: true,
		groups:    map[string][]string{},
		groupPos:  map[string]Pos{},
		hosts:     map[string]netip.Prefix{},
		hostPos:   map[string]Pos{},
		tagOwners: map[string][]selector{},
		tagPos:    map[string]Pos{},
		rules: []rule{{
			pos:     Pos{File: BootstrapOrigin},
			src:     []selector{all},
			targets: []target{{dst: all, ports: []netmap.PortRange{netmap.AllPorts}}},
		}},
	}
}

// IsBootstrap reports whether p is the bootstrap default.
func (p *Policy) IsBootstrap() bool { return p.bootstrap }

// File is the name the policy was parsed under.
func (p *Policy) File() string { return p.file }

// NumRules is the number of "acls" and "grants" entries.
func (p *Policy) NumRules() int { return len(p.rules) }

// NumTests is the number of "tests" entries (all of which passed).
func (p *Policy) NumTests() int { return len(p.tests) }
