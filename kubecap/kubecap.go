// Package kubecap is the Kubernetes app capability: the values that the
// policy's grants attach under tailscale.com/cap/kubernetes (so seed
// policies written for Tailscale work unchanged) or meshd.dev/cap/kubernetes,
// which the Kubernetes API proxy (agent/k8sproxy) turns into impersonation
// and `meshd policy check` validates.
//
// It is a leaf package so that both the policy compiler (coordinator side)
// and the daemon use one schema without the daemon linking the compiler.
package kubecap

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
)

// Names are the capability names the proxy honours, Tailscale's first.
var Names = [...]string{"tailscale.com/cap/kubernetes", "meshd.dev/cap/kubernetes"}

// IsName reports whether name is a Kubernetes capability name.
func IsName(name string) bool {
	return name == Names[0] || name == Names[1]
}

// Rule is one capability value.
type Rule struct {
	// Impersonate says which Kubernetes groups the caller acts as.
	Impersonate *Impersonate `json:"impersonate,omitempty"`
	// Recorder and EnforceRecorder are Tailscale's session recording
	// fields, accepted so its policies parse; meshd has no recorder, so
	// the proxy refuses exec, attach and port-forward sessions a rule
	// with EnforceRecorder asks to record (failing closed).
	Recorder        []string `json:"recorder,omitempty"`
	EnforceRecorder bool     `json:"enforceRecorder,omitempty"`
}

// Impersonate is a rule's "impersonate" object.
type Impersonate struct {
	Groups []string `json:"groups,omitempty"`
}

// Parse decodes one capability value strictly: unknown fields, trailing
// data, empty or blank group names and groups with control characters are
// errors, so that a typo in a policy is refused rather than granting less
// (or more) than its author meant.
func Parse(raw []byte) (Rule, error) {
	var r Rule
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		return Rule{}, fmt.Errorf("kubernetes capability: %w", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return Rule{}, errors.New("kubernetes capability: data after the value")
	}
	if r.Impersonate != nil {
		for _, g := range r.Impersonate.Groups {
			if err := checkName(g); err != nil {
				return Rule{}, fmt.Errorf("kubernetes capability: impersonate.groups: %w", err)
			}
		}
	}
	for _, rec := range r.Recorder {
		if strings.TrimSpace(rec) == "" {
			return Rule{}, errors.New("kubernetes capability: recorder: empty name")
		}
	}
	return r, nil
}

// checkName refuses a group the API server would not read back as given:
// an HTTP header value cannot carry control characters, and a blank name
// is a mistake.
func checkName(g string) error {
	if strings.TrimSpace(g) == "" {
		return fmt.Errorf("%q: empty group name", g)
	}
	for _, c := range g {
		if c < 0x20 || c == 0x7f {
			return fmt.Errorf("%q: control character in a group name", g)
		}
	}
	return nil
}

// Grant is what all of a caller's capability values give together.
type Grant struct {
	// Granted is false when the caller has no Kubernetes capability at all.
	Granted bool
	// Groups is the union of every rule's impersonate.groups, sorted, each
	// once.
	Groups []string
	// EnforceRecorder is true when any rule asks for session recording.
	EnforceRecorder bool
}

// FromCapabilities merges the Kubernetes rules among caps (whois's
// Capabilities: name to values). A value that does not parse is skipped
// and reported in the error, while the rest still apply: the policy check
// refuses such values, so one can only come from an older coordinator.
func FromCapabilities(caps map[string][]json.RawMessage) (Grant, error) {
	var g Grant
	var errs []error
	seen := map[string]bool{}
	for _, name := range Names {
		vals, ok := caps[name]
		if !ok {
			continue
		}
		for _, v := range vals {
			r, err := Parse(v)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", name, err))
				continue
			}
			g.Granted = true
			g.EnforceRecorder = g.EnforceRecorder || r.EnforceRecorder
			if r.Impersonate == nil {
				continue
			}
			for _, grp := range r.Impersonate.Groups {
				if !seen[grp] {
					seen[grp] = true
					g.Groups = append(g.Groups, grp)
				}
			}
		}
	}
	slices.Sort(g.Groups)
	return g, errors.Join(errs...)
}
