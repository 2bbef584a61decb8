package tunwrap

import (
	"bytes"
	"testing"

	"golang.org/x/sys/unix"

	"meshd.dev/meshd/filter/filtertest"
	"meshd.dev/meshd/packet"
)

// TestRedirect: a peer's SYN to selfIP:22, which the filter judges as
// port 22, reaches the host on the redirect's port; the host's replies
// from that port leave as port 22, and the filter lets the flow go on.
// Other ports and addresses are untouched, and packets to 22 the filter
// denies are not redirected into the host.
func TestRedirect(t *testing.T) {
	dev, kfd := newPipeTUN(t)
	f := newTestFilter(t, allowTCP(22))
	w := New(dev, Config{Filter: f})
	w.SetRedirect(&Redirect{From: 22, Targets: []RedirectTarget{{Addr: selfIP, To: 40022}}})

	syn := withChecksum(tcp(peerIP, selfIP, 50000, 22, filtertest.SYN))
	denied := tcp(otherIP, selfIP, 50001, 22, filtertest.SYN)
	if n, err := w.Write(batch(syn, denied), wgOffset); err != nil || n != 1 {
		t.Fatalf("Write = %d, %v; want the allowed SYN only", n, err)
	}
	got := kernelRecv(t, kfd)
	var p packet.Parsed
	if len(got) != 1 || !p.Decode(got[0]) || p.DstPort != 40022 || p.SrcPort != 50000 || !validTCP(got[0]) {
		t.Fatalf("the host got %d packets, first %+v", len(got), p)
	}

	// The host answers from 40022 (the SYN-ACK) and from another port.
	synAck := withChecksum(filtertest.Packet{Src: selfIP, Dst: peerIP, Proto: 6, SrcPort: 40022, DstPort: 50000, TCPFlags: filtertest.SYN | filtertest.ACK}.Build())
	other := filtertest.Packet{Src: selfIP, Dst: peerIP, Proto: 6, SrcPort: 40023, DstPort: 50000, TCPFlags: filtertest.ACK}.Build()
	for _, b := range [][]byte{synAck, other} {
		if _, err := unix.Write(kfd, b); err != nil {
			t.Fatal(err)
		}
	}
	bufs := [][]byte{make([]byte, wgOffset+2048), make([]byte, wgOffset+2048)}
	sizes := make([]int, 2)
	n, err := w.Read(bufs, sizes, wgOffset)
	if err != nil || n != 2 {
		t.Fatalf("Read = %d, %v", n, err)
	}
	out := bufs[0][wgOffset : wgOffset+sizes[0]]
	if !p.Decode(out) || p.SrcPort != 22 || p.DstPort != 50000 || !validTCP(out) {
		t.Fatalf("the reply left as %+v", p)
	}
	if b := bufs[1][wgOffset : wgOffset+sizes[1]]; !bytes.Equal(b, other) {
		t.Fatal("a packet from another port was altered")
	}
	// The peer's ACK continues the flow, again redirected.
	ack := tcp(peerIP, selfIP, 50000, 22, filtertest.ACK)
	if n, err := w.Write(batch(ack), wgOffset); err != nil || n != 1 {
		t.Fatalf("ACK: %d, %v", n, err)
	}
	if got := kernelRecv(t, kfd); len(got) != 1 || !p.Decode(got[0]) || p.DstPort != 40022 {
		t.Fatalf("ACK reached the host as %+v", p)
	}

	// Redirecting allocates nothing.
	ackBatch := batch(ack)
	if a := testing.AllocsPerRun(100, func() {
		ackBatch[0] = append(ackBatch[0][:wgOffset], ack...)
		w.Write(ackBatch, wgOffset)
	}); a != 0 {
		t.Fatalf("%v allocations per redirected packet", a)
	}
	kernelRecv(t, kfd)

	w.SetRedirect(nil)
	if _, err := w.Write(batch(tcp(peerIP, selfIP, 50002, 22, filtertest.SYN)), wgOffset); err != nil {
		t.Fatal(err)
	}
	if got := kernelRecv(t, kfd); len(got) != 1 || !p.Decode(got[0]) || p.DstPort != 22 {
		t.Fatalf("without a redirect: %+v", p)
	}
}

// validTCP checks b's TCP checksum from scratch.
func validTCP(b []byte) bool { return tcpSum4(b) == 0xffff }

// withChecksum sets the TCP checksum of b (IPv4), which filtertest leaves
// zero.
func withChecksum(b []byte) []byte {
	hl := int(b[0]&0xf) * 4
	b[hl+16], b[hl+17] = 0, 0
	c := ^uint16(tcpSum4(b))
	b[hl+16], b[hl+17] = byte(c>>8), byte(c)
	return b
}

// tcpSum4 is the folded one's-complement sum over the pseudo-header and
// the segment of b (IPv4).
func tcpSum4(b []byte) uint32 {
	hl := int(b[0]&0xf) * 4
	seg := b[hl:]
	var sum uint32
	add := func(x []byte) {
		for i := 0; i+1 < len(x); i += 2 {
			sum += uint32(x[i])<<8 | uint32(x[i+1])
		}
		if len(x)%2 == 1 {
			sum += uint32(x[len(x)-1]) << 8
		}
	}
	add(b[12:20])
	sum += 6 + uint32(len(seg))
	add(seg)
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return sum
}
