package control

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
)

// DERPMapPath serves the coordinator's DERP map to anyone, as Tailscale's
// control serves its map at /derpmap/default: `meshd netcheck
// --coordinator` measures against it before (or without) joining. It is
// public because it holds nothing secret (relay addresses and their
// certificate fingerprints; relays admit only registered nodes), and the
// reader authenticates it by pinning the coordinator's key, as every meshd
// client of the coordinator does.
const DERPMapPath = "/derpmap/default"

func (s *Server) handleDERPMap(w http.ResponseWriter, r *http.Request) {
	m := s.DERPMap()
	if m == nil || len(m.Regions) == 0 {
		s.writeError(w, r, fmt.Errorf("%w: this coordinator hands out no DERP map (it was started with neither an embedded relay nor --derp-map)", controlclient.ErrNotFound))
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Write(FormatDERPMap(m))
}

// FetchDERPMap gets the DERP map the coordinator at rawURL hands out,
// accepting only the coordinator whose key has the given fingerprint (hex
// SHA-256 of its public key, as printed at its start and carried by every
// auth key). The map is checked as a --derp-map file would be.
func FetchDERPMap(ctx context.Context, rawURL, fingerprint string) (*netmap.DERPMap, error) {
	u, err := controlclient.ParseURL(rawURL)
	if err != nil {
		return nil, err
	}
	if len(fingerprint) != controlclient.FingerprintLen || !controlclient.IsHex(fingerprint) {
		return nil, fmt.Errorf("coordinator fingerprint %q: want %d hex digits, as printed by `meshd coordinator` at start", fingerprint, controlclient.FingerprintLen)
	}
	tr := controlclient.PinnedTransport(fingerprint)
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	u = u.JoinPath(DERPMapPath)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("fetch DERP map: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("fetch DERP map: %w", controlclient.ReadAPIError(resp))
	}
	data, err := io.ReadAll(io.LimitReader(resp.Body, MaxDERPMapSize+1))
	if err != nil {
		return nil, fmt.Errorf("fetch DERP map: %w", err)
	}
	m, err := ParseDERPMap(u.String(), data)
	if err != nil {
		return nil, fmt.Errorf("coordinator sent a DERP map meshd cannot use: %w", err)
	}
	return m, nil
}
