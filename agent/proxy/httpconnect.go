package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"time"
)

// ServeHTTPConnect serves an HTTP proxy that supports only the CONNECT
// method on ln until ctx ends or ln fails. Plain proxied GETs are refused
// with 405: CONNECT carries any TCP protocol and keeps the proxy small.
func (s *Server) ServeHTTPConnect(ctx context.Context, ln net.Listener) error {
	return serve(ctx, ln, func(c net.Conn) { s.handleHTTPConnect(ctx, c) })
}

func (s *Server) handleHTTPConnect(ctx context.Context, c net.Conn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(handshakeTimeout))
	br := bufio.NewReader(c)
	req, err := http.ReadRequest(br)
	if err != nil {
		s.logf("http proxy request from %v: %v", c.RemoteAddr(), err)
		writeHTTPStatus(c, http.StatusBadRequest, "malformed request")
		return
	}
	if req.Method != http.MethodConnect {
		writeHTTPStatus(c, http.StatusMethodNotAllowed, "only CONNECT is supported")
		return
	}
	host, port, err := net.SplitHostPort(req.Host)
	if err != nil || host == "" {
		writeHTTPStatus(c, http.StatusBadRequest, "CONNECT target must be host:port")
		return
	}
	if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 {
		writeHTTPStatus(c, http.StatusBadRequest, "bad port in CONNECT target")
		return
	}
	dctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	out, err := s.Dial(dctx, "tcp", req.Host)
	cancel()
	if err != nil {
		code := http.StatusBadGateway
		if errors.Is(err, ErrNoRoute) {
			code = http.StatusNotFound
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			code = http.StatusGatewayTimeout
		}
		writeHTTPStatus(c, code, err.Error())
		s.logf("http connect %s: %v", req.Host, err)
		return
	}
	defer out.Close()
	if _, err := fmt.Fprint(c, "HTTP/1.1 200 Connection established\r\n\r\n"); err != nil {
		return
	}
	c.SetDeadline(time.Time{})
	Relay(c, br, out)
}

func writeHTTPStatus(c net.Conn, code int, msg string) {
	fmt.Fprintf(c, "HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s\n",
		code, http.StatusText(code), len(msg)+1, msg)
}
