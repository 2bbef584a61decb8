package netlab

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
)

// Ping sends ICMP echo requests from h to dst every 200ms until one is
// answered or ctx ends. It needs no ping binary: the socket is opened in
// h's namespace with Do.
func (h *Host) Ping(ctx context.Context, dst netip.Addr) error {
	network, laddr, proto := "ip4:icmp", "0.0.0.0", 1
	var typ, replyTyp icmp.Type = ipv4.ICMPTypeEcho, ipv4.ICMPTypeEchoReply
	if dst.Is6() {
		network, laddr, proto = "ip6:ipv6-icmp", "::", 58
		typ, replyTyp = ipv6.ICMPTypeEchoRequest, ipv6.ICMPTypeEchoReply
	}
	var c *icmp.PacketConn
	if err := h.Do(func() (err error) {
		c, err = icmp.ListenPacket(network, laddr)
		return err
	}); err != nil {
		return fmt.Errorf("ping from %s: %w", h.Name, err)
	}
	defer c.Close()
	id := os.Getpid() & 0xffff
	buf := make([]byte, 1500)
	for seq := 1; ; seq++ {
		msg := icmp.Message{Type: typ, Body: &icmp.Echo{ID: id, Seq: seq, Data: []byte("netlab")}}
		wb, err := msg.Marshal(nil)
		if err != nil {
			return err
		}
		if _, err := c.WriteTo(wb, &net.IPAddr{IP: dst.AsSlice()}); err != nil {
			return fmt.Errorf("ping %v from %s: %w", dst, h.Name, err)
		}
		deadline := time.Now().Add(200 * time.Millisecond)
		c.SetReadDeadline(deadline)
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				break // timeout: send the next request
			}
			m, err := icmp.ParseMessage(proto, buf[:n])
			if err != nil || m.Type != replyTyp {
				continue
			}
			if e, ok := m.Body.(*icmp.Echo); ok && e.ID == id && from.(*net.IPAddr).IP.Equal(dst.AsSlice()) {
				return nil
			}
		}
		if ctx.Err() != nil {
			return fmt.Errorf("ping %v from %s: no reply: %w", dst, h.Name, ctx.Err())
		}
	}
}
