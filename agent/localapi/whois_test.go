package localapi

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"meshd.dev/meshd/agent/whois"
)

type whoisBackend struct {
	fakeBackend
	asked []netip.Addr
}

func (w *whoisBackend) WhoIs(ip netip.Addr) (*whois.Response, bool) {
	w.asked = append(w.asked, ip)
	if ip == netip.MustParseAddr("100.64.0.2") {
		return &whois.Response{Node: whois.Node{ID: 2, Hostname: "gpu-2"}, User: "alice@example.com"}, true
	}
	return nil, false
}

func TestWhoIsAPI(t *testing.T) {
	b := &whoisBackend{}
	c := serve(t, b)
	tests := []struct {
		addr    string
		wantErr error
		errText string
	}{
		{"100.64.0.2", nil, ""},
		{"100.64.0.2:8080", nil, ""},
		{"[::ffff:100.64.0.2]:80", nil, ""},
		{"100.64.0.3", ErrNoSuchNode, ""},
		{"gpu-2", nil, "want IP or IP:PORT"},
		{"", nil, "want IP or IP:PORT"},
	}
	for _, tt := range tests {
		res, err := c.WhoIs(t.Context(), tt.addr)
		switch {
		case tt.wantErr != nil:
			if !errors.Is(err, tt.wantErr) {
				t.Errorf("whois %q: err %v, want %v", tt.addr, err, tt.wantErr)
			}
		case tt.errText != "":
			if err == nil || !strings.Contains(err.Error(), tt.errText) {
				t.Errorf("whois %q: err %v, want %q", tt.addr, err, tt.errText)
			}
		case err != nil || res.User != "alice@example.com" || res.Node.Hostname != "gpu-2":
			t.Errorf("whois %q: %+v, %v", tt.addr, res, err)
		}
	}
	for _, ip := range b.asked {
		if ip.Is4In6() {
			t.Errorf("backend asked with an unmapped-able address %v", ip)
		}
	}
}
