package serve

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"meshd.dev/meshd/agent/whois"
)

var (
	lo1 = netip.MustParseAddr("127.0.0.1")
	lo2 = netip.MustParseAddr("127.0.0.2")
)

// peerAlice answers every address with alice's laptop.
func peerAlice(netip.Addr) (*whois.Response, bool) { return alice, true }

// saver records what a Server saves and can be told to fail.
type saver struct {
	saved []Config
	fail  error
}

func (s *saver) save(c Config) error {
	if s.fail != nil {
		return s.fail
	}
	s.saved = append(s.saved, c)
	return nil
}

// refused reports whether nothing accepts TCP connections on addr.
func refused(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err == nil {
		c.Close()
		return false
	}
	return errors.Is(err, syscall.ECONNREFUSED)
}

// get fetches http://addr/ and returns what the echo backend saw.
func get(t *testing.T, client *http.Client, url string) echoed {
	t.Helper()
	resp, err := client.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("GET %s: %s: %s", url, resp.Status, b)
	}
	var e echoed
	if err := json.NewDecoder(resp.Body).Decode(&e); err != nil {
		t.Fatal(err)
	}
	return e
}

// TestServerEdits: adding starts listeners on every tailnet address and
// saves; a taken port, a reserved port, an identical entry and a failed
// save or listen change nothing; removing and resetting stop the
// listeners after saving.
func TestServerEdits(t *testing.T) {
	backend, _ := echoBackend(t)
	sv := &saver{}
	s := New(Options{WhoIs: peerAlice, Reserved: map[uint16]string{8000: "--forward 8000=127.0.0.1:8000"}}, Config{})
	s.Attach(loopbackListen, []netip.Addr{lo1, lo2})
	defer s.Detach()

	p1, p2 := freePort(t), freePort(t)
	web, _ := NewEntry(HTTP, p1, "http://"+backend)
	if err := s.Add(web, sv.save); err != nil {
		t.Fatal(err)
	}
	for _, a := range []netip.Addr{lo1, lo2} {
		if e := get(t, http.DefaultClient, fmt.Sprintf("http://%v:%d/", a, p1)); e.Header.Get(HeaderUserLogin) != "alice@example.com" {
			t.Fatalf("on %v the backend saw %v", a, e.Header)
		}
	}
	if len(sv.saved) != 1 || !slices.Equal(sv.saved[0].Entries, []Entry{web}) {
		t.Fatalf("saved %v", sv.saved)
	}
	st := s.Status()
	if len(st) != 1 || !slices.Equal(st[0].Listening, []netip.AddrPort{netip.AddrPortFrom(lo1, p1), netip.AddrPortFrom(lo2, p1)}) {
		t.Fatalf("status %+v", st)
	}

	refusals := []struct {
		name string
		e    Entry
		sv   *saver
		want string
	}{
		{"identical", web, sv, "already serves"},
		{"port taken", Entry{TCP, p1, "127.0.0.1:22"}, sv, fmt.Sprintf("tailnet port %d is already served (http to http://%s)", p1, backend)},
		{"reserved", Entry{TCP, 8000, "127.0.0.1:22"}, sv, "taken by --forward 8000=127.0.0.1:8000"},
		{"https without a CA", Entry{HTTPS, p2, "http://" + backend}, sv, "HTTPS needs a certificate from the tailnet CA"},
		{"save fails", Entry{TCP, p2, "127.0.0.1:22"}, &saver{fail: errors.New("disk full")}, "disk full"},
		{"not normalised", Entry{TCP, p2, "22"}, sv, "normal form"},
	}
	for _, r := range refusals {
		before := len(sv.saved)
		err := s.Add(r.e, r.sv.save)
		if err == nil || !strings.Contains(err.Error(), r.want) {
			t.Errorf("%s: Add: %v, want %q", r.name, err, r.want)
		}
		if r.name == "identical" && !errors.Is(err, ErrUnchanged) {
			t.Errorf("identical: %v is not ErrUnchanged", err)
		}
		if len(sv.saved) != before || len(s.Config().Entries) != 1 {
			t.Errorf("%s: the refused edit changed something: saved %d, config %v", r.name, len(sv.saved)-before, s.Config())
		}
	}
	// The failed save left no listener behind.
	if !refused(fmt.Sprintf("127.0.0.1:%d", p2)) {
		t.Error("a listener of the entry whose save failed is open")
	}
	// A port something else holds on a tailnet address: the listen error.
	busy, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	bp := uint16(busy.Addr().(*net.TCPAddr).Port)
	if err := s.Add(Entry{TCP, bp, "127.0.0.1:22"}, sv.save); err == nil || !strings.Contains(err.Error(), "127.0.0.2") {
		t.Errorf("Add on a port in use: %v", err)
	}
	if !refused(fmt.Sprintf("127.0.0.1:%d", bp)) || len(s.Config().Entries) != 1 {
		t.Error("the entry that could not listen on one address listens on another, or was kept")
	}

	if err := s.Remove(TCP, p1, sv.save); err == nil || !strings.Contains(err.Error(), "served as http, not tcp") {
		t.Errorf("Remove with the wrong protocol: %v", err)
	}
	if err := s.Remove(HTTP, p2, sv.save); !errors.Is(err, ErrUnchanged) {
		t.Errorf("Remove of a port not served: %v", err)
	}
	if err := s.Remove(HTTP, p1, (&saver{fail: errors.New("disk full")}).save); err == nil {
		t.Error("Remove with a failing save succeeded")
	}
	if refused(fmt.Sprintf("127.0.0.1:%d", p1)) {
		t.Fatal("a Remove whose save failed stopped the listener")
	}
	if err := s.Remove(HTTP, p1, sv.save); err != nil {
		t.Fatal(err)
	}
	if !refused(fmt.Sprintf("127.0.0.1:%d", p1)) || !refused(fmt.Sprintf("127.0.0.2:%d", p1)) {
		t.Fatal("listeners open after Remove")
	}
	if last := sv.saved[len(sv.saved)-1]; len(last.Entries) != 0 {
		t.Fatalf("saved after Remove: %v", last)
	}

	tcp, _ := NewEntry(TCP, p2, "22")
	if err := s.Add(tcp, sv.save); err != nil {
		t.Fatal(err)
	}
	if err := s.Reset(sv.save); err != nil {
		t.Fatal(err)
	}
	if !refused(fmt.Sprintf("127.0.0.1:%d", p2)) {
		t.Fatal("listener open after Reset")
	}
	if err := s.Reset(sv.save); !errors.Is(err, ErrUnchanged) {
		t.Fatalf("second Reset: %v", err)
	}
}

// TestServerFollowsDataPlane: listeners exist only while attached, move
// to new addresses on a new Attach, and an entry added while detached
// starts at the next Attach. An entry that cannot listen is reported and
// does not stop the others.
func TestServerFollowsDataPlane(t *testing.T) {
	backend, _ := echoBackend(t)
	sv := &saver{}
	p1, p2 := freePort(t), freePort(t)
	web, _ := NewEntry(HTTP, p1, "http://"+backend)
	s := New(Options{WhoIs: peerAlice}, Config{Entries: []Entry{web}})
	if !refused(fmt.Sprintf("127.0.0.1:%d", p1)) {
		t.Fatal("listening before Attach")
	}
	s.Attach(loopbackListen, []netip.Addr{lo1})
	get(t, http.DefaultClient, fmt.Sprintf("http://127.0.0.1:%d/", p1))
	s.Detach()
	if !refused(fmt.Sprintf("127.0.0.1:%d", p1)) {
		t.Fatal("listening after Detach")
	}
	tcp, _ := NewEntry(TCP, p2, "22")
	if err := s.Add(tcp, sv.save); err != nil {
		t.Fatal(err)
	}
	if st := s.Status(); len(st) != 2 || len(st[0].Listening)+len(st[1].Listening) != 0 {
		t.Fatalf("status while detached: %+v", st)
	}
	// The data plane comes back on another address; something holds p2
	// there.
	busy, err := net.Listen("tcp", fmt.Sprintf("127.0.0.2:%d", p2))
	if err != nil {
		t.Fatal(err)
	}
	s.Attach(loopbackListen, []netip.Addr{lo2})
	get(t, http.DefaultClient, fmt.Sprintf("http://127.0.0.2:%d/", p1))
	if !refused(fmt.Sprintf("127.0.0.1:%d", p1)) {
		t.Fatal("still listening on the old address")
	}
	statusOf := func(port uint16) EntryStatus {
		st := s.Status()
		i := slices.IndexFunc(st, func(e EntryStatus) bool { return e.Port == port })
		if i < 0 {
			t.Fatalf("no status for port %d: %+v", port, st)
		}
		return st[i]
	}
	if st := statusOf(p2); !strings.Contains(st.Error, "address already in use") || len(st.Listening) != 0 {
		t.Fatalf("the entry whose port is taken: %+v", st)
	}
	if st := statusOf(p1); st.Error != "" || len(st.Listening) != 1 {
		t.Fatalf("the other entry: %+v", st)
	}
	busy.Close()
	s.Attach(loopbackListen, []netip.Addr{lo2})
	if st := statusOf(p2); st.Error != "" || len(st.Listening) != 1 {
		t.Fatalf("after attaching again with the port free: %+v", st)
	}
	s.Detach()
}

// TestTCPEntry: a TCP entry relays bytes both ways to the local target,
// and closes connections from callers that are not peers without
// connecting to the target.
func TestTCPEntry(t *testing.T) {
	target, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer target.Close()
	accepted := make(chan struct{}, 16)
	go func() {
		for {
			c, err := target.Accept()
			if err != nil {
				return
			}
			accepted <- struct{}{}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	var unknown atomic.Bool
	s := New(Options{WhoIs: func(netip.Addr) (*whois.Response, bool) { return ci, !unknown.Load() }}, Config{})
	s.Attach(loopbackListen, []netip.Addr{lo1})
	defer s.Detach()
	port := freePort(t)
	e, _ := NewEntry(TCP, port, target.Addr().String())
	if err := s.Add(e, (&saver{}).save); err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Fatal(err)
	}
	msg := strings.Repeat("echo through serve ", 1000)
	go io.WriteString(c, msg)
	buf := make([]byte, len(msg))
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
		t.Fatalf("echo: %v", err)
	}
	c.Close()
	<-accepted

	unknown.Store(true)
	c, err = net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if n, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatalf("a caller that is not a peer read %d bytes", n)
	}
	c.Close()
	select {
	case <-accepted:
		t.Fatal("the target got a connection from a caller that is not a peer")
	default:
	}
}

// testCert makes a CA and a certificate it signs for name, as the tailnet
// CA would.
func testCert(t *testing.T, name string) (*tls.Certificate, *x509.CertPool) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test tailnet CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: name}, DNSNames: []string{name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, pool
}

// TestHTTPSEntry: an HTTPS entry presents what GetCertificate returns for
// the name the client asks for, and proxies with the identity headers
// and X-Forwarded-Proto https.
func TestHTTPSEntry(t *testing.T) {
	backend, _ := echoBackend(t)
	cert, pool := testCert(t, "web.tailnet.internal")
	var (
		mu    sync.Mutex
		asked []string
	)
	s := New(Options{WhoIs: peerAlice, GetCertificate: func(hi *tls.ClientHelloInfo) (*tls.Certificate, error) {
		mu.Lock()
		defer mu.Unlock()
		asked = append(asked, hi.ServerName)
		return cert, nil
	}}, Config{})
	s.Attach(loopbackListen, []netip.Addr{lo1})
	defer s.Detach()
	port := freePort(t)
	e, _ := NewEntry(HTTPS, port, "http://"+backend)
	if err := s.Add(e, (&saver{}).save); err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	client := &http.Client{Transport: &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: pool},
		ForceAttemptHTTP2: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", addr)
		},
	}}
	got := get(t, client, fmt.Sprintf("https://web.tailnet.internal:%d/", port))
	if got.Header.Get(HeaderUserLogin) != "alice@example.com" || got.Header.Get("X-Forwarded-Proto") != "https" {
		t.Fatalf("backend saw %v", got.Header)
	}
	mu.Lock()
	if !slices.Contains(asked, "web.tailnet.internal") {
		t.Fatalf("GetCertificate asked for %q", asked)
	}
	mu.Unlock()
	// A client that does not trust the CA fails the handshake.
	untrusting := &http.Client{Transport: &http.Transport{DialContext: client.Transport.(*http.Transport).DialContext}}
	if _, err := untrusting.Get(fmt.Sprintf("https://web.tailnet.internal:%d/", port)); err == nil {
		t.Fatal("a client without the CA accepted the certificate")
	}
}

// TestBackendDown: a backend that does not answer is a 502 to the
// caller, and the backend dialer never leaves loopback.
func TestBackendDown(t *testing.T) {
	s := New(Options{WhoIs: peerAlice}, Config{})
	s.Attach(loopbackListen, []netip.Addr{lo1})
	defer s.Detach()
	port, dead := freePort(t), freePort(t)
	e, _ := NewEntry(HTTP, port, fmt.Sprint(dead))
	if err := s.Add(e, (&saver{}).save); err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/", port))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadGateway {
		t.Fatalf("status %s, want 502", resp.Status)
	}
	for _, addr := range []string{"198.18.0.1:80", "[2001:db8::1]:80", "0.0.0.0:80"} {
		if _, err := loopbackDialer().Dial("tcp", addr); !errors.Is(err, errNotLoopbackDial) {
			t.Errorf("dial %s: %v, want errNotLoopbackDial", addr, err)
		}
	}
}
