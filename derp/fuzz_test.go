package derp

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net"
	"net/url"
	"testing"
	"time"

	"meshd.dev/meshd/netmap"
)

func frameBytes(t frameType, payload ...[]byte) []byte {
	var b bytes.Buffer
	bw := bufio.NewWriter(&b)
	writeFrame(bw, t, payload...)
	bw.Flush()
	return b.Bytes()
}

func frameSeeds(f *testing.F) {
	key := make([]byte, keyLen)
	f.Add(frameBytes(frameRecvPacket, key, []byte("hello")))
	f.Add(frameBytes(framePeerGone, key, []byte{1}))
	f.Add(frameBytes(framePing, make([]byte, 8)))
	f.Add(append(frameBytes(frameKeepAlive), frameBytes(frameHealth, []byte("mesh down"))...))
	f.Add([]byte{byte(frameSendPacket), 0xff, 0xff, 0xff, 0xff})
	f.Add([]byte{0x7f, 0, 0, 0, 3, 1, 2, 3})
}

// FuzzReadFrame checks the frame reader never accepts more than a type's
// limit and never panics on a truncated or hostile stream.
func FuzzReadFrame(f *testing.F) {
	frameSeeds(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		br := bufio.NewReader(bytes.NewReader(data))
		buf := make([]byte, 0, 64)
		for {
			typ, p, err := readFrame(br, buf)
			if err != nil {
				return
			}
			if uint32(len(p)) > typ.maxLen() {
				t.Fatalf("type 0x%02x: accepted %d bytes over limit %d", byte(typ), len(p), typ.maxLen())
			}
		}
	})
}

// FuzzClientRecv feeds arbitrary server output to a client.
func FuzzClientRecv(f *testing.F) {
	frameSeeds(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		cs, ss := net.Pipe()
		go io.Copy(io.Discard, ss)
		c := &Client{conn: cs, br: bufio.NewReader(bytes.NewReader(data))}
		c.start()
		defer c.Close()
		for {
			m, err := c.Recv()
			if err != nil {
				return
			}
			switch m := m.(type) {
			case ReceivedPacket:
				if len(m.Data) > MaxPacketSize {
					t.Fatalf("packet of %d bytes", len(m.Data))
				}
			case Health:
				if len(m.Problem) > maxInfoLen {
					t.Fatalf("health of %d bytes", len(m.Problem))
				}
			}
		}
	})
}

// FuzzServerConn sends arbitrary frames from an authenticated client and
// checks the server survives and closes or keeps serving cleanly.
func FuzzServerConn(f *testing.F) {
	frameSeeds(f)
	f.Add(frameBytes(frameSendPacket, make([]byte, keyLen), []byte("x")))
	f.Add(frameBytes(frameForwardPacket, make([]byte, 2*keyLen)))
	f.Add(frameBytes(frameWatchConns))
	s, err := NewServer(ServerOptions{PrivateKey: netmap.NewNodePrivate(), KeepAlive: time.Hour})
	if err != nil {
		f.Fatal(err)
	}
	defer s.Close()
	u, _ := url.Parse("http://relay/derp")
	f.Fuzz(func(t *testing.T, data []byte) {
		cs, ss := net.Pipe()
		done := make(chan struct{})
		go func() {
			defer close(done)
			br := bufio.NewReader(ss)
			// Answer the client's upgrade request as ServeHTTP would.
			if _, err := readRequestLine(br); err != nil {
				ss.Close()
				return
			}
			io.WriteString(ss, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: meshd-derp\r\nConnection: Upgrade\r\n\r\n")
			s.ServeConn(ss, br)
		}()
		// Drain whatever the server writes so it never blocks on the pipe.
		cs.SetDeadline(time.Now().Add(10 * time.Second))
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		c, err := newClient(ctx, cs, u, ClientOptions{NodeKey: netmap.NewNodePrivate()})
		cancel()
		if err != nil {
			t.Fatalf("handshake: %v", err)
		}
		go io.Copy(io.Discard, c.br)
		cs.Write(data)
		cs.Close()
		<-done
		if n := s.Stats().Clients; n != 0 {
			t.Fatalf("%d clients still registered after disconnect", n)
		}
	})
}

// readRequestLine consumes an HTTP request head.
func readRequestLine(br *bufio.Reader) (int, error) {
	n := 0
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			return n, err
		}
		n++
		if line == "\r\n" {
			return n, nil
		}
	}
}
