package controlclient

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"meshd.dev/meshd/internal/tlspin"
)

// TestSessionResumedOnAnyReplica: replicas share the coordinator key and
// their ticket keys, so a session one issued resumes on another whatever
// its address; a server of another tailnet (another key, other ticket
// keys) cannot resume it and fails the pin as before; and a server that
// refuses resumption gets a full, pinned handshake. The session is
// checked to carry the coordinator's certificate, which the pin is
// checked against on a resumed connection too.
func TestSessionResumedOnAnyReplica(t *testing.T) {
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	cert, err := tlspin.SelfSigned(key, "coordinator", nil)
	if err != nil {
		t.Fatal(err)
	}
	_, otherKey, _ := ed25519.GenerateKey(rand.Reader)
	otherCert, err := tlspin.SelfSigned(otherKey, "another tailnet", nil)
	if err != nil {
		t.Fatal(err)
	}
	serve := func(cert tls.Certificate, ticketKey byte, tickets bool) *httptest.Server {
		srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Write([]byte("ok"))
		}))
		srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequestClientCert, SessionTicketsDisabled: !tickets}
		srv.TLS.SetSessionTicketKeys([][32]byte{{ticketKey}})
		srv.StartTLS()
		t.Cleanup(srv.Close)
		return srv
	}
	a, b := serve(cert, 1, true), serve(cert, 1, true)
	other := serve(otherCert, 2, true)
	noTickets := serve(cert, 1, false)

	_, mk, _ := ed25519.GenerateKey(rand.Reader)
	clientCert, err := tlspin.SelfSigned(mk, "machine", nil)
	if err != nil {
		t.Fatal(err)
	}
	tr := pinnedTransport(func() string { return tlspin.Fingerprint(cert.Leaf) }, nil, &clientCert)
	tr.DisableKeepAlives = true // a connection, and so a handshake, per request
	hc := &http.Client{Transport: tr}
	get := func(srv *httptest.Server) (*tls.ConnectionState, error) {
		u := srv.URL
		if srv == b {
			// Another name for the replica, as in a real fleet: a
			// session cache keyed by server name would miss.
			u = strings.Replace(u, "127.0.0.1", "localhost", 1)
		}
		resp, err := hc.Get(u)
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		return resp.TLS, nil
	}
	for _, step := range []struct {
		name    string
		srv     *httptest.Server
		resumed bool
		pinErr  bool
	}{
		{"first connection, to A", a, false, false},
		{"B resumes A's session", b, true, false},
		{"A resumes B's", a, true, false},
		{"another tailnet's server", other, false, true},
		{"a replica that issues no tickets", noTickets, false, false},
		// The refused session was dropped: a full handshake, and a
		// new ticket from it.
		{"A again", a, false, false},
		{"B resumes it", b, true, false},
	} {
		cs, err := get(step.srv)
		switch {
		case step.pinErr:
			if err == nil {
				t.Fatalf("%s: connected; want the pin refused", step.name)
			}
			var me *tlspin.MismatchError
			if !errors.As(err, &me) && !errors.Is(err, ErrPinMismatch) {
				t.Fatalf("%s: %v; want a pin mismatch", step.name, err)
			}
		case err != nil:
			t.Fatalf("%s: %v", step.name, err)
		case cs.DidResume != step.resumed:
			t.Fatalf("%s: resumed %v, want %v", step.name, cs.DidResume, step.resumed)
		case len(cs.PeerCertificates) == 0 || tlspin.Fingerprint(cs.PeerCertificates[0]) != tlspin.Fingerprint(cert.Leaf):
			t.Fatalf("%s: the session's server certificate is not the coordinator's", step.name)
		}
	}
}
