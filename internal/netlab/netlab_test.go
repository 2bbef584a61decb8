package netlab

import (
	"context"
	"io"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"
)

func TestSegmentPingAndTCP(t *testing.T) {
	l := New(t)
	seg := l.NewSegment("lan", netip.MustParsePrefix("198.18.0.0/24"))
	a, b := l.NewHost("a"), l.NewHost("b")
	aa, ba := a.Attach(seg), b.Attach(seg)
	if aa.String() != "198.18.0.1" || ba.String() != "198.18.0.2" {
		t.Fatalf("addresses %v %v", aa, ba)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := a.Ping(ctx, ba); err != nil {
		t.Fatal(err)
	}
	var ln net.Listener
	if err := b.Do(func() (err error) { ln, err = net.Listen("tcp", netip.AddrPortFrom(ba, 7000).String()); return }); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			io.WriteString(c, "hello from b")
			c.Close()
		}
	}()
	var c net.Conn
	if err := a.Do(func() (err error) { c, err = net.Dial("tcp", netip.AddrPortFrom(ba, 7000).String()); return }); err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(c)
	c.Close()
	if string(got) != "hello from b" {
		t.Fatalf("got %q", got)
	}
	// The root namespace must not see the lab's addresses.
	if out, _ := exec.Command("ip", "-o", "addr").Output(); strings.Contains(string(out), "198.18.0.") {
		t.Fatalf("lab address leaked into the root namespace:\n%s", out)
	}
}

func TestSiteNATAndTeardown(t *testing.T) {
	var names []string
	t.Run("lab", func(t *testing.T) {
		l := New(t)
		inet := l.NewSegment("inet", netip.MustParsePrefix("198.18.0.0/24"))
		server := l.NewHost("server")
		sa := server.Attach(inet)
		site := l.NewSite("home", inet, netip.MustParsePrefix("198.19.1.0/24"), EasyNAT)
		client := l.NewHost("client")
		client.AttachToSite(site)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := client.Ping(ctx, sa); err != nil {
			t.Fatal(err)
		}
		// The server sees the router's address, not the client's: NAT works.
		var ln net.Listener
		if err := server.Do(func() (err error) { ln, err = net.Listen("tcp", netip.AddrPortFrom(sa, 7001).String()); return }); err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		from := make(chan string, 1)
		go func() {
			c, err := ln.Accept()
			if err != nil {
				from <- err.Error()
				return
			}
			from <- c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().String()
			c.Close()
		}()
		if err := client.Do(func() error {
			c, err := net.Dial("tcp", netip.AddrPortFrom(sa, 7001).String())
			if err == nil {
				c.Close()
			}
			return err
		}); err != nil {
			t.Fatal(err)
		}
		if got := <-from; got != site.WANAddr.String() {
			t.Fatalf("server saw %s, want the router's %v", got, site.WANAddr)
		}
		p := client.Start("sleep", "600")
		_ = p
		for _, h := range []*Host{server, client, site.Router} {
			names = append(names, h.Namespace())
		}
	})
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		if strings.Contains(string(out), n) {
			t.Errorf("namespace %s survived teardown", n)
		}
	}
}
