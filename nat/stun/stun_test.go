package stun

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	pion "github.com/pion/stun/v3"
)

func startServer(t *testing.T, network, addr string) *Server {
	t.Helper()
	pc, err := net.ListenPacket(network, addr)
	if err != nil {
		t.Skipf("cannot listen on %s %s: %v", network, addr, err)
	}
	s := NewServer(pc, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	return s
}

func TestRequestAgainstServer(t *testing.T) {
	for _, tt := range []struct{ network, addr string }{
		{"udp4", "127.0.0.1:0"},
		{"udp6", "[::1]:0"},
	} {
		t.Run(tt.network, func(t *testing.T) {
			s := startServer(t, tt.network, tt.addr)
			pc, err := net.ListenPacket(tt.network, tt.addr)
			if err != nil {
				t.Fatal(err)
			}
			defer pc.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			mapped, rtt, err := Request(ctx, pc, s.AddrPort())
			if err != nil {
				t.Fatal(err)
			}
			want := pc.LocalAddr().(*net.UDPAddr).AddrPort()
			if mapped != want {
				t.Fatalf("mapped %v, want our socket %v", mapped, want)
			}
			if rtt <= 0 || rtt > 5*time.Second {
				t.Fatalf("rtt %v", rtt)
			}
		})
	}
}

func TestServerIgnoresNonRequests(t *testing.T) {
	s := startServer(t, "udp4", "127.0.0.1:0")
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	dst := net.UDPAddrFromAddrPort(s.AddrPort())
	success := pion.MustBuild(pion.TransactionID, pion.BindingSuccess,
		&pion.XORMappedAddress{IP: net.IPv4(1, 2, 3, 4), Port: 5})
	badFP := pion.MustBuild(pion.TransactionID, pion.BindingRequest, pion.Fingerprint)
	badFP.Raw[len(badFP.Raw)-1] ^= 0xff
	for _, junk := range [][]byte{
		[]byte("not stun at all"),
		success.Raw,                   // a response must not be answered
		badFP.Raw,                     // corrupted fingerprint
		make([]byte, maxMessageLen+1), // oversized
	} {
		pc.WriteTo(junk, dst)
	}
	tx, req := NewRequest()
	pc.WriteTo(req, dst)
	pc.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 2048)
	n, _, err := pc.ReadFrom(buf)
	if err != nil {
		t.Fatal(err)
	}
	got, _, err := ParseResponse(buf[:n])
	if err != nil || got != tx {
		t.Fatalf("first reply is not for our request (tx %x, err %v): junk was answered", got, err)
	}
}

func TestResponseParseRoundTrip(t *testing.T) {
	for _, src := range []netip.AddrPort{
		netip.MustParseAddrPort("198.51.100.7:41641"),
		netip.MustParseAddrPort("[2001:db8::1]:3478"),
		netip.MustParseAddrPort("[::ffff:192.0.2.1]:1"), // unmapped in the answer
	} {
		tx, req := NewRequest()
		resp, err := Response(req, src)
		if err != nil {
			t.Fatal(err)
		}
		gotTx, mapped, err := ParseResponse(resp)
		if err != nil {
			t.Fatal(err)
		}
		want := netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
		if gotTx != tx || mapped != want {
			t.Fatalf("round trip of %v: tx %x/%x mapped %v", src, gotTx, tx, mapped)
		}
	}
	// Legacy MAPPED-ADDRESS only.
	legacy := pion.MustBuild(pion.TransactionID, pion.BindingSuccess,
		&pion.MappedAddress{IP: net.IPv4(203, 0, 113, 9), Port: 999})
	if _, mapped, err := ParseResponse(legacy.Raw); err != nil || mapped != netip.MustParseAddrPort("203.0.113.9:999") {
		t.Fatalf("legacy mapped address: %v %v", mapped, err)
	}
	for name, b := range map[string][]byte{
		"empty":      nil,
		"request":    func() []byte { _, r := NewRequest(); return r }(),
		"no address": pion.MustBuild(pion.TransactionID, pion.BindingSuccess).Raw,
	} {
		if _, _, err := ParseResponse(b); err == nil {
			t.Errorf("%s: parsed without error", name)
		}
	}
}

func TestRequestTimesOut(t *testing.T) {
	// A socket that never answers stands in for a blackholed STUN server.
	silent, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, _, err := Request(ctx, pc, silent.LocalAddr().(*net.UDPAddr).AddrPort()); err == nil {
		t.Fatal("request to a silent server succeeded")
	}
}

func FuzzResponse(f *testing.F) {
	_, req := NewRequest()
	f.Add(req)
	f.Add(pion.MustBuild(pion.TransactionID, pion.BindingRequest).Raw)
	f.Add([]byte{0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42})
	src := netip.MustParseAddrPort("192.0.2.10:4242")
	f.Fuzz(func(t *testing.T, data []byte) {
		resp, err := Response(data, src)
		if err != nil {
			return
		}
		m := &pion.Message{Raw: data}
		if m.Decode() != nil {
			t.Fatal("answered a message pion cannot decode")
		}
		tx, mapped, err := ParseResponse(resp)
		if err != nil {
			t.Fatalf("own response does not parse: %v", err)
		}
		if tx != TxID(m.TransactionID) || mapped != src {
			t.Fatalf("response tx %x mapped %v", tx, mapped)
		}
	})
}

func FuzzParseResponse(f *testing.F) {
	_, req := NewRequest()
	resp, _ := Response(req, netip.MustParseAddrPort("192.0.2.10:4242"))
	f.Add(resp)
	f.Add(req)
	f.Fuzz(func(t *testing.T, data []byte) {
		_, mapped, err := ParseResponse(data)
		if err == nil && (!mapped.IsValid() || mapped.Port() == 0) {
			t.Fatalf("accepted invalid mapped address %v", mapped)
		}
	})
}
