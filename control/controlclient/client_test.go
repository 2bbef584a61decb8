package controlclient

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"meshd.dev/meshd/internal/tlspin"
	"meshd.dev/meshd/netmap"
)

// TestFollowDetectsSilentStream serves a map stream that sends one full map
// and then goes silent without closing: the client must notice from the
// keep-alive interval it was told, and reconnect.
func TestFollowDetectsSilentStream(t *testing.T) {
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	cert, err := tlspin.SelfSigned(key, "silent", nil)
	if err != nil {
		t.Fatal(err)
	}
	addrs := []netip.Prefix{netip.MustParsePrefix("100.64.0.1/32"), netip.MustParsePrefix("fd5e:5a1e:d::6440:1/128")}
	self := &netmap.Node{ID: 1, Hostname: "n1", NodeKey: netmap.NewNodePrivate().Public(), Addresses: addrs, AllowedIPs: addrs}
	full, _ := EncodeFrame(&netmap.MapResponse{Epoch: "e", Version: 1, Full: true, Self: self})
	var streams atomic.Int32
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		streams.Add(1)
		w.Header().Set(KeepAliveHeader, "25")
		w.Write(full)
		w.(http.Flusher).Flush()
		<-r.Context().Done() // silent, never closes by itself
	}))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequestClientCert}
	srv.EnableHTTP2 = true
	srv.StartTLS()
	defer srv.Close()

	_, mk, _ := ed25519.GenerateKey(rand.Reader)
	c, err := NewClient(ClientOptions{URL: srv.URL, MachineKey: mk, ServerPin: tlspin.Fingerprint(cert.Leaf), MinBackoff: 10 * time.Millisecond, MaxBackoff: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	maps := make(chan struct{}, 16)
	go func() {
		done <- c.Follow(ctx, netmap.MapRequest{NodeKey: self.NodeKey}, func(*netmap.NetworkMap) {
			select {
			case maps <- struct{}{}:
			default:
			}
		})
	}()
	waitFor(t, "a second stream after the first went silent", func() bool { return streams.Load() >= 2 })
	cancel()
	if err := <-done; err != context.Canceled {
		t.Errorf("Follow returned %v; want context.Canceled", err)
	}
	if len(maps) == 0 {
		t.Error("no map delivered")
	}
}

func TestParseURL(t *testing.T) {
	tests := []struct {
		in, want string
		ok       bool
	}{
		{"127.0.0.1:8443", "https://127.0.0.1:8443", true},
		{"https://coord.example:8443/", "https://coord.example:8443", true},
		{" https://[::1]:1 ", "https://[::1]:1", true},
		{"http://coord:80", "", false},
		{"", "", false},
		{"https://", "", false},
	}
	for _, tt := range tests {
		u, err := ParseURL(tt.in)
		if (err == nil) != tt.ok || err == nil && u.String() != tt.want {
			t.Errorf("ParseURL(%q) = %v, %v; want %q ok=%v", tt.in, u, err, tt.want, tt.ok)
		}
	}
}

func TestMergeState(t *testing.T) {
	k1, k2 := netmap.NewNodePrivate().Public(), netmap.NewNodePrivate().Public()
	ep := []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:1")}
	s := mergeState(nil, &netmap.MapRequest{NodeKey: k1, Endpoints: ep, HomeDERP: 2})
	s = mergeState(s, &netmap.MapRequest{NodeKey: k2})
	if s.NodeKey != k2 || len(s.Endpoints) != 1 || s.HomeDERP != 2 {
		t.Fatalf("merged state %+v", s)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestStreamOnItsOwnHTTP1Connection: the map stream is HTTP/1.1 on a
// connection of its own, while requests (here an Update sent during the
// stream) keep sharing one HTTP/2 connection, and the stream's Date header
// counts as a clock reading as the requests' do.
func TestStreamOnItsOwnHTTP1Connection(t *testing.T) {
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	cert, err := tlspin.SelfSigned(key, "protos", nil)
	if err != nil {
		t.Fatal(err)
	}
	addrs := []netip.Prefix{netip.MustParsePrefix("100.64.0.1/32")}
	self := &netmap.Node{ID: 1, Hostname: "n1", NodeKey: netmap.NewNodePrivate().Public(), Addresses: addrs, AllowedIPs: addrs}
	full, _ := EncodeFrame(&netmap.MapResponse{Epoch: "e", Version: 1, Full: true, Self: self})
	type seen struct {
		path   string
		proto  int
		remote string
	}
	reqs := make(chan seen, 16)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req netmap.MapRequest
		json.NewDecoder(r.Body).Decode(&req)
		reqs <- seen{path: r.URL.Path, proto: r.ProtoMajor, remote: r.RemoteAddr}
		if !req.Stream {
			w.Write([]byte("{}"))
			return
		}
		w.Header().Set(KeepAliveHeader, "60000")
		w.Write(full)
		w.(http.Flusher).Flush()
		<-r.Context().Done()
	}))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequestClientCert}
	srv.EnableHTTP2 = true
	srv.StartTLS()
	defer srv.Close()

	_, mk, _ := ed25519.GenerateKey(rand.Reader)
	c, err := NewClient(ClientOptions{URL: srv.URL, MachineKey: mk, ServerPin: tlspin.Fingerprint(cert.Leaf)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	maps := make(chan struct{}, 1)
	go c.Follow(ctx, netmap.MapRequest{NodeKey: self.NodeKey}, func(*netmap.NetworkMap) {
		select {
		case maps <- struct{}{}:
		default:
		}
	})
	next := func(what string) seen {
		t.Helper()
		select {
		case r := <-reqs:
			return r
		case <-time.After(10 * time.Second):
			t.Fatalf("no %s reached the server", what)
			return seen{}
		}
	}
	stream := next("map stream")
	select {
	case <-maps:
	case <-time.After(10 * time.Second):
		t.Fatal("no map over the stream")
	}
	if _, _, ok := c.ClockSkew(); !ok {
		t.Error("the stream's Date header was not read as a clock reading")
	}
	for range 2 {
		if err := c.Update(ctx, netmap.MapRequest{NodeKey: self.NodeKey}); err != nil {
			t.Fatal(err)
		}
	}
	up1, up2 := next("update"), next("second update")
	if stream.path != "/machine/map" || stream.proto != 1 {
		t.Errorf("map stream: %s over HTTP/%d; want /machine/map over HTTP/1.1", stream.path, stream.proto)
	}
	for _, u := range []seen{up1, up2} {
		if u.proto != 2 {
			t.Errorf("update over HTTP/%d; want HTTP/2", u.proto)
		}
		if u.remote == stream.remote {
			t.Errorf("update sent on the stream's connection %s", u.remote)
		}
	}
	if up1.remote != up2.remote {
		t.Errorf("two updates on two connections (%s, %s); want one shared HTTP/2 connection", up1.remote, up2.remote)
	}
}
