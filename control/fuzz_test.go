package control

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/internal/tlspin"
	"meshd.dev/meshd/netmap"
)

// Machine endpoints FuzzMachineRequest picks from (op modulo their number).
const (
	opRegister uint8 = iota
	opMap
	opChallenge
	opCert
	opSSHAuthorize
	opSSHWait
	opSSHSession
	opLogout
)

func ptr[T any](v T) *T { return &v }

// streamRecorder is a ResponseRecorder that ends the request at its first
// flush: a map stream has answered then, and ending it there rather than
// at a timeout keeps the fuzzer from waiting for the clock.
type streamRecorder struct {
	*httptest.ResponseRecorder
	end context.CancelFunc
}

func (r *streamRecorder) Flush() {
	r.ResponseRecorder.Flush()
	r.end()
}

// FuzzMachineRequest sends arbitrary bodies to the machine endpoints
// (register, map, challenge, cert, ssh, logout) of a real coordinator (SQLite store
// included), authenticated as one machine. Every answer must be a success
// or a 4xx JSON error with a code; nothing may panic or answer 500.
func FuzzMachineRequest(f *testing.F) {
	dir := f.TempDir()
	s, err := NewServer(context.Background(), ServerOptions{StateDir: dir, KeepAliveInterval: time.Hour})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { s.Close() })
	key, _, err := s.CreateAuthKey(context.Background(), AuthKeyOptions{Tags: []string{"tag:fuzz"}, Reusable: true})
	if err != nil {
		f.Fatal(err)
	}
	_, mk, _ := ed25519.GenerateKey(rand.Reader)
	cert, err := tlspin.SelfSigned(mk, "fuzz", nil)
	if err != nil {
		f.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(cert.Certificate[0])
	h := s.Handler()
	nkPriv := netmap.NewNodePrivate()
	nk := nkPriv.Public()
	mkPub, _ := netmap.MachinePublicFromEd25519(mk.Public().(ed25519.PublicKey))
	proof, err := controlclient.SealNodeKeyProof(nkPriv, mkPub, ptr(s.chal.issue(mkPub, time.Now().Add(time.Hour))))
	if err != nil {
		f.Fatal(err)
	}
	reg, _ := json.Marshal(netmap.RegisterRequest{Version: netmap.ProtocolVersion, NodeKey: nk, Hostname: "fuzz", AuthKey: key, NodeKeyProof: proof})
	mreq, _ := json.Marshal(netmap.MapRequest{Version: netmap.ProtocolVersion, NodeKey: nk, Endpoints: nil, HomeDERP: 1})
	rot, _ := json.Marshal(netmap.MapRequest{Version: netmap.ProtocolVersion, NodeKey: netmap.NewNodePrivate().Public(), NodeKeyProof: proof})
	f.Add(opRegister, reg)
	f.Add(opMap, mreq)
	f.Add(opMap, rot)
	f.Add(opMap, []byte(`{"version":1,"node_key":"`+nk.String()+`","stream":true,"since":3,"epoch":"x"}`))
	f.Add(opRegister, []byte(`{"version":2,"node_key":"`+nk.String()+`","auth_key":"mskey-000000000000-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-00"}`))
	f.Add(opMap, []byte(`{"version":1,"endpoints":["1.2.3.4:0"]}`))
	f.Add(opRegister, []byte(`[`))
	f.Add(opChallenge, []byte(`{"version":2}`))
	f.Add(opChallenge, []byte(`{"version":-1}`))
	f.Add(opChallenge, []byte(``))
	f.Add(opCert, []byte(`{"version":2,"csr":"MAMCAQA="}`))
	f.Add(opCert, []byte(`{"version":2}`))
	f.Add(opSSHAuthorize, []byte(`{"version":2,"caller_addr":"100.64.0.1","local_user":"root"}`))
	f.Add(opSSHAuthorize, []byte(`{"version":2,"caller_addr":"::ffff:1.2.3.4","local_user":"-oProxyCommand=x"}`))
	f.Add(opSSHWait, []byte(`{"version":2,"check_id":"0000000000000000"}`))
	f.Add(opSSHSession, []byte(`{"version":2,"session_id":"s1","check_id":"0000000000000000","caller":{"node_id":1,"hostname":"a"},"local_user":"root","kind":"shell","duration_ns":1000000000,"exit_status":0}`))
	f.Add(opSSHSession, []byte(`{"version":2,"session_id":"s1","local_user":"root","kind":"exec","duration_ns":-1,"exit_status":-7}`))
	f.Add(opLogout, []byte(`{"version":5,"node_key":"`+nk.String()+`"}`))
	f.Add(opLogout, []byte(`{"version":5,"node_key":"`+netmap.NewNodePrivate().Public().String()+`"}`))
	f.Add(opLogout, []byte(`{"version":5,"node_key":""}`))
	f.Fuzz(func(t *testing.T, op uint8, body []byte) {
		paths := []string{"/machine/register", "/machine/map", controlclient.ChallengePath, controlclient.CertPath,
			controlclient.SSHAuthorizePath, controlclient.SSHWaitPath, controlclient.SSHSessionPath, controlclient.LogoutPath}
		path := paths[int(op)%len(paths)]
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		req := httptest.NewRequestWithContext(ctx, http.MethodPost, path, bytes.NewReader(body))
		req.TLS = &tls.ConnectionState{PeerCertificates: []*x509.Certificate{leaf}}
		rec := &streamRecorder{ResponseRecorder: httptest.NewRecorder(), end: cancel}
		h.ServeHTTP(rec, req)
		if rec.Code == http.StatusOK {
			return
		}
		var eb controlclient.ErrorBody
		raw, _ := io.ReadAll(rec.Body)
		if err := json.Unmarshal(raw, &eb); err != nil || eb.Code == "" || eb.Error == "" {
			t.Fatalf("status %d with body %q: want a JSON error with a code", rec.Code, raw)
		}
		if rec.Code >= 500 {
			t.Fatalf("status %d for a client's bad input: %s", rec.Code, raw)
		}
	})
}

// FuzzAdminRequest sends arbitrary ids and bodies to the mutating admin
// endpoints of a real coordinator with a valid token.
func FuzzAdminRequest(f *testing.F) {
	s, err := NewServer(context.Background(), ServerOptions{StateDir: f.TempDir()})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { s.Close() })
	tok, err := os.ReadFile(s.AdminTokenPath())
	if err != nil {
		f.Fatal(err)
	}
	h := s.Handler()
	f.Add(uint8(0), "", []byte(`{"tags":["tag:a"],"reusable":true,"expiry":"1h"}`))
	f.Add(uint8(0), "", []byte(`{"user":"alice@example.com","expiry":"-5m"}`))
	f.Add(uint8(0), "", []byte(`{"user":"a","tags":["tag:x"],"expiry":"soon"}`))
	f.Add(uint8(1), "0123456789ab", []byte(nil))
	f.Add(uint8(2), "1", []byte(`{"tags":["tag:ok","bad tag"]}`))
	f.Add(uint8(3), "18446744073709551616", []byte(nil))
	f.Add(uint8(4), "-1", []byte(nil))
	f.Add(uint8(5), "1", []byte(`{`))
	routes := []struct{ method, path string }{
		{http.MethodPost, "/admin/v1/keys"},
		{http.MethodPost, "/admin/v1/keys/%s/revoke"},
		{http.MethodPost, "/admin/v1/nodes/%s/tags"},
		{http.MethodDelete, "/admin/v1/nodes/%s"},
		{http.MethodPost, "/admin/v1/nodes/%s/expire"},
		{http.MethodPost, "/admin/v1/nodes/%s/approve"},
	}
	f.Fuzz(func(t *testing.T, op uint8, id string, body []byte) {
		rt := routes[int(op)%len(routes)]
		path := strings.Replace(rt.path, "%s", url.PathEscape(id), 1)
		req := httptest.NewRequest(rt.method, path, bytes.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(tok)))
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code == http.StatusOK {
			return
		}
		raw, _ := io.ReadAll(rec.Body)
		if rec.Code >= 500 {
			t.Fatalf("%s %s: status %d body %q", rt.method, path, rec.Code, raw)
		}
		switch rec.Code {
		case http.StatusTemporaryRedirect, http.StatusMovedPermanently, http.StatusNotFound, http.StatusMethodNotAllowed:
			// The mux's own answers for paths that clean to another route
			// or match none; our handlers never ran.
			if !strings.HasPrefix(rec.Header().Get("Content-Type"), "application/json") {
				return
			}
		}
		var eb controlclient.ErrorBody
		if err := json.Unmarshal(raw, &eb); err != nil || eb.Code == "" || eb.Error == "" {
			t.Fatalf("%s %s: status %d body %q: want a JSON error with a code", rt.method, path, rec.Code, raw)
		}
	})
}
