package control

import (
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strings"

	"github.com/tailscale/hujson"

	"meshd.dev/meshd/netmap"
)

// MaxDERPMapSize bounds a DERP map file; real ones are a few kilobytes.
const MaxDERPMapSize = 1 << 20

// DERPMapError lists every problem found in a DERP map file, each as
// FILE:LINE:COL: message.
type DERPMapError struct {
	Problems []string
}

func (e *DERPMapError) Error() string {
	if len(e.Problems) == 1 {
		return e.Problems[0]
	}
	return fmt.Sprintf("%d problems in DERP map:\n%s", len(e.Problems), strings.Join(e.Problems, "\n"))
}

// LoadDERPMap reads and parses a DERP map file (see ParseDERPMap).
func LoadDERPMap(file string) (*netmap.DERPMap, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, fmt.Errorf("derp map: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxDERPMapSize+1))
	if err != nil {
		return nil, fmt.Errorf("derp map: read %s: %w", file, err)
	}
	return ParseDERPMap(file, data)
}

// ParseDERPMap parses a DERP map in huJSON (JSON with comments and trailing
// commas):
//
//	{"regions": [{"id": 1, "code": "lab", "nodes": [
//	    {"name": "1a", "host": "198.18.1.2", "derp_port": 443, "stun_port": 3478,
//	     "cert_fingerprint": "…64 hex digits, for self-signed relays"}]}]}
//
// Field names are those of netmap.DERPMap. Unknown fields are errors (a
// misspelt "stun_port" would otherwise silently disable STUN), and so is
// anything netmap's Validate refuses. Errors are a *DERPMapError whose
// problems carry file:line:col positions.
func ParseDERPMap(file string, data []byte) (*netmap.DERPMap, error) {
	p := &derpMapParser{file: file, lineStarts: []int{0}}
	for i, b := range data {
		if b == '\n' {
			p.lineStarts = append(p.lineStarts, i+1)
		}
	}
	if len(data) > MaxDERPMapSize {
		return nil, &DERPMapError{[]string{fmt.Sprintf("%s:1:1: DERP map is larger than the %d byte limit", file, MaxDERPMapSize)}}
	}
	root, err := hujson.Parse(data)
	if err != nil {
		msg := err.Error()
		if m := hujsonPosRE.FindStringSubmatch(msg); m != nil {
			return nil, &DERPMapError{[]string{fmt.Sprintf("%s:%s:%s: syntax error: %s", file, m[1], m[2], m[3])}}
		}
		return nil, &DERPMapError{[]string{fmt.Sprintf("%s:1:1: syntax error: %s", file, msg)}}
	}
	m := p.derpMap(&root)
	if len(p.probs) > 0 {
		return nil, &DERPMapError{p.probs}
	}
	// The checks above locate problems; Validate is the contract the
	// coordinator enforces, so a map it would refuse never gets this far.
	if err := m.Validate(); err != nil {
		return nil, &DERPMapError{[]string{fmt.Sprintf("%s:1:1: %v", file, err)}}
	}
	return m, nil
}

var hujsonPosRE = regexp.MustCompile(`^hujson: line (\d+), column (\d+): (.*)$`)

type derpMapParser struct {
	file       string
	lineStarts []int
	probs      []string
}

func (p *derpMapParser) errorf(v *hujson.Value, format string, args ...any) {
	off := v.StartOffset
	lo, hi := 0, len(p.lineStarts)-1
	for lo < hi {
		mid := (lo + hi + 1) / 2
		if p.lineStarts[mid] <= off {
			lo = mid
		} else {
			hi = mid - 1
		}
	}
	p.probs = append(p.probs, fmt.Sprintf("%s:%d:%d: %s", p.file, lo+1, off-p.lineStarts[lo]+1, fmt.Sprintf(format, args...)))
}

// field is one known member of an object: where to decode it and what it
// is, for messages.
type field struct {
	dst  any
	want string
	// val is set to the member's value once seen, for later positions.
	val *hujson.Value
}

// object decodes v's members into fields, reporting unknown, duplicate and
// mistyped members. It returns false if v is not an object.
func (p *derpMapParser) object(v *hujson.Value, what string, fields map[string]*field) bool {
	obj, ok := v.Value.(*hujson.Object)
	if !ok {
		p.errorf(v, "%s must be an object", what)
		return false
	}
	for i := range obj.Members {
		mem := &obj.Members[i]
		lit, _ := mem.Name.Value.(hujson.Literal)
		name := lit.String()
		f, ok := fields[name]
		if !ok {
			p.errorf(&mem.Name, "%s: unknown field %q (known: %s)", what, name, knownFields(fields))
			continue
		}
		if f.val != nil {
			p.errorf(&mem.Name, "%s: field %q given twice", what, name)
			continue
		}
		f.val = &mem.Value
		if f.dst == nil {
			continue // the caller walks it
		}
		// Decoding the packed standard JSON of just this value keeps the
		// error attributable to its position.
		val := mem.Value.Clone()
		val.Standardize()
		if err := json.Unmarshal(val.Pack(), f.dst); err != nil {
			p.errorf(&mem.Value, "%s: %q must be %s", what, name, f.want)
		}
	}
	return true
}

func knownFields(fields map[string]*field) string {
	return strings.Join(slices.Sorted(maps.Keys(fields)), ", ")
}

func (p *derpMapParser) array(v *hujson.Value, what string) []hujson.Value {
	arr, ok := v.Value.(*hujson.Array)
	if !ok {
		p.errorf(v, "%s must be an array", what)
		return nil
	}
	return arr.Elements
}

func (p *derpMapParser) derpMap(root *hujson.Value) *netmap.DERPMap {
	m := &netmap.DERPMap{}
	regions := &field{}
	if !p.object(root, "DERP map", map[string]*field{"regions": regions}) {
		return m
	}
	if regions.val == nil {
		p.errorf(root, `DERP map has no "regions": list at least one region`)
		return m
	}
	elems := p.array(regions.val, `"regions"`)
	if regions.val != nil && len(elems) == 0 && len(p.probs) == 0 {
		p.errorf(regions.val, `"regions" is empty: list at least one region`)
	}
	ids := map[int]bool{}
	names := map[string]bool{}
	for i := range elems {
		if r, ok := p.region(&elems[i], i, ids, names); ok {
			m.Regions = append(m.Regions, r)
		}
	}
	return m
}

func (p *derpMapParser) region(v *hujson.Value, i int, ids map[int]bool, names map[string]bool) (netmap.DERPRegion, bool) {
	var r netmap.DERPRegion
	what := fmt.Sprintf("region %d", i+1)
	id := &field{dst: &r.ID, want: "a whole number"}
	code := &field{dst: &r.Code, want: "a string"}
	nodes := &field{}
	fields := map[string]*field{"id": id, "code": code, "name": {dst: &r.Name, want: "a string"}, "nodes": nodes}
	before := len(p.probs)
	if !p.object(v, what, fields) {
		return r, false
	}
	switch {
	case id.val == nil:
		p.errorf(v, "%s has no \"id\" (a positive number nodes publish as their home region)", what)
	case r.ID <= 0:
		p.errorf(id.val, "%s: id must be positive, got %d", what, r.ID)
	case ids[r.ID]:
		p.errorf(id.val, "%s: region id %d listed twice", what, r.ID)
	default:
		ids[r.ID] = true
		what = fmt.Sprintf("region %d", r.ID)
	}
	if r.Code == "" {
		p.errorf(v, "%s has no \"code\" (a short name such as \"lab\")", what)
	}
	if nodes.val == nil {
		p.errorf(v, "%s has no \"nodes\": list at least one relay", what)
		return r, false
	}
	elems := p.array(nodes.val, what+` "nodes"`)
	if nodes.val.Value.Kind() == '[' && len(elems) == 0 {
		p.errorf(nodes.val, "%s: \"nodes\" is empty: list at least one relay", what)
	}
	for j := range elems {
		if n, ok := p.node(&elems[j], what, j, names); ok {
			r.Nodes = append(r.Nodes, n)
		}
	}
	return r, len(p.probs) == before
}

func (p *derpMapParser) node(v *hujson.Value, region string, j int, names map[string]bool) (netmap.DERPNode, bool) {
	var n netmap.DERPNode
	what := fmt.Sprintf("%s node %d", region, j+1)
	name := &field{dst: &n.Name, want: "a string"}
	host := &field{dst: &n.Host, want: "a string (host name or IP address, no port)"}
	derpPort := &field{dst: &n.DERPPort, want: "a whole number"}
	stunPort := &field{dst: &n.STUNPort, want: "a whole number"}
	fp := &field{dst: &n.CertFingerprint, want: "a string of 64 hex digits"}
	before := len(p.probs)
	if !p.object(v, what, map[string]*field{
		"name": name, "host": host, "derp_port": derpPort, "stun_port": stunPort,
		"stun_only": {dst: &n.STUNOnly, want: "true or false"}, "cert_fingerprint": fp,
	}) {
		return n, false
	}
	if len(p.probs) > before {
		return n, false
	}
	switch {
	case n.Name == "":
		p.errorf(v, "%s has no \"name\" (unique across the map, such as \"1a\")", what)
	case names[n.Name]:
		p.errorf(name.val, "%s: node name %q used twice; names are unique across the map", what, n.Name)
	default:
		names[n.Name] = true
	}
	switch {
	case n.Host == "":
		p.errorf(v, "%s has no \"host\"", what)
	case strings.ContainsAny(n.Host, ":/ ") && !isIP(n.Host):
		p.errorf(host.val, "%s: host %q must be a host name or IP address, without scheme or port (ports are derp_port and stun_port)", what, n.Host)
	}
	if derpPort.val != nil && (n.DERPPort < 0 || n.DERPPort > 65535) {
		p.errorf(derpPort.val, "%s: derp_port %d out of range 1-65535", what, n.DERPPort)
	} else if !n.STUNOnly && n.DERPPort == 0 {
		p.errorf(v, "%s needs a \"derp_port\" (1-65535) unless it is \"stun_only\"", what)
	}
	if stunPort.val != nil && (n.STUNPort < -1 || n.STUNPort > 65535) {
		p.errorf(stunPort.val, "%s: stun_port %d out of range (-1 disables STUN, 0 or absent: none)", what, n.STUNPort)
	}
	if n.STUNOnly && n.STUNPort <= 0 {
		p.errorf(v, "%s is stun_only but has no stun_port", what)
	}
	if fp.val != nil {
		if b, err := hex.DecodeString(n.CertFingerprint); err != nil || len(b) != 32 {
			p.errorf(fp.val, "%s: cert_fingerprint must be 64 hex digits (the SHA-256 `meshd derp` prints as fingerprint)", what)
		}
	}
	return n, len(p.probs) == before
}

func isIP(s string) bool {
	_, err := netip.ParseAddr(s)
	return err == nil
}

// FormatDERPMap encodes a DERP map as indented JSON, which ParseDERPMap
// reads back.
func FormatDERPMap(m *netmap.DERPMap) []byte {
	b, _ := json.MarshalIndent(m, "", "  ") // plain structs always encode
	return append(b, '\n')
}
