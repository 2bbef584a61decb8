package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"

	"meshd.dev/meshd/agent"
	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/control"
)

// demoNode is one node of the demo tailnet.
type demoNode struct {
	name string
	key  control.AuthKeyOptions
	a    *agent.Agent
}

// demoFlow is one connection the demo makes and what should happen. Later
// issues (policy, DERP) add flows that must be refused or relayed.
type demoFlow struct {
	from, to string
	port     uint16
	what     string
	wantOK   bool // false: the connection must fail
	check    func(ctx context.Context, conn net.Conn) error
}

func (c *cli) demoCmd() *ffcli.Command {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	verbose := fs.Bool("verbose", false, "show the agents' and coordinator's logs")
	keep := fs.Bool("keep", false, "keep the temporary state directory")
	return &ffcli.Command{
		Name:       "demo",
		ShortUsage: "meshd demo [--verbose]",
		ShortHelp:  "run a coordinator and three nodes in this process (no root) and check real connections between them",
		FlagSet:    fs,
		Options:    envOptions,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return fmt.Errorf("demo: unexpected arguments %q", args)
			}
			return c.runDemo(ctx, *verbose, *keep)
		},
	}
}

func (c *cli) runDemo(ctx context.Context, verbose, keep bool) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	level := slog.LevelError + 4 // silent unless --verbose
	if verbose {
		level = slog.LevelInfo
	}
	log := slog.New(slog.NewTextHandler(c.stderr, &slog.HandlerOptions{Level: level}))
	out := c.stdout
	step := func(format string, args ...any) { fmt.Fprintf(out, "==> "+format+"\n", args...) }

	dir, err := os.MkdirTemp("", "meshd-demo-")
	if err != nil {
		return fmt.Errorf("demo: temp dir: %w", err)
	}
	if keep {
		step("state kept in %s", dir)
	} else {
		defer os.RemoveAll(dir)
	}

	step("starting a coordinator on 127.0.0.1 (state in a temp dir)")
	srv, err := control.NewServer(ctx, control.ServerOptions{StateDir: filepath.Join(dir, "coordinator"), Logger: log.With("c", "coordinator")})
	if err != nil {
		return fmt.Errorf("demo: coordinator: %w", err)
	}
	defer srv.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("demo: listen: %w", err)
	}
	go srv.Serve(ln)
	url := "https://" + ln.Addr().String()
	fmt.Fprintf(out, "    coordinator %s, key fingerprint %s\n", url, short(srv.Fingerprint()))

	nodes := []*demoNode{
		{name: "inference-1", key: control.AuthKeyOptions{Tags: []string{"tag:inference-server"}, Preauthorized: true}},
		{name: "training-1", key: control.AuthKeyOptions{Tags: []string{"tag:training-cluster"}, Preauthorized: true}},
		{name: "alice-laptop", key: control.AuthKeyOptions{User: "alice@example.com", Preauthorized: true}},
	}
	runCtx, stopAgents := context.WithCancel(ctx)
	var running []chan error
	defer func() {
		stopAgents()
		for _, done := range running {
			<-done
		}
		for _, n := range nodes {
			if n.a != nil {
				n.a.Close()
			}
		}
	}()
	for _, n := range nodes {
		secret, _, err := srv.CreateAuthKey(ctx, n.key)
		if err != nil {
			return fmt.Errorf("demo: auth key for %s: %w", n.name, err)
		}
		n.a, err = agent.New(agent.Options{
			StateDir: filepath.Join(dir, n.name), TUN: agent.TUNUserspace, Port: 0,
			LoopbackOnly: true, EndpointInterval: 2 * time.Second, Logger: log.With("node", n.name),
		})
		if err != nil {
			return fmt.Errorf("demo: %s: %w", n.name, err)
		}
		done := make(chan error, 1)
		running = append(running, done)
		go func() { done <- n.a.Run(runCtx) }()
		st, err := n.a.Up(ctx, localapi.UpRequest{AuthKey: secret, Coordinator: url, Hostname: n.name})
		if err != nil {
			return fmt.Errorf("demo: %s up: %w", n.name, err)
		}
		fmt.Fprintf(out, "==> %s joined with a %s key: %s, node %d, %s\n", n.name, keyKind(n.key), strings.Join(ipStrings(st.Self.IPs), " "), st.Self.ID, owner(st.Self))
	}

	step("waiting until every node has the other two as peers")
	if err := waitMesh(ctx, nodes); err != nil {
		return fmt.Errorf("demo: %w", err)
	}

	// Services on the nodes' tailnet addresses, inside their netstacks.
	byName := map[string]*demoNode{}
	for _, n := range nodes {
		byName[n.name] = n
	}
	if err := serveModelAPI(runCtx, byName["inference-1"].a, 8000); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	if err := serveEcho(runCtx, byName["training-1"].a, 9000); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	step("inference-1 serves an HTTP model API on :8000; training-1 a checkpoint-sync echo service on :9000")

	flows := []demoFlow{
		{from: "alice-laptop", to: "inference-1", port: 8000, what: "engineer queries the model API", wantOK: true, check: httpGetCheck("inference-1")},
		{from: "training-1", to: "inference-1", port: 8000, what: "training node pushes to the inference server", wantOK: true, check: httpGetCheck("inference-1")},
		{from: "inference-1", to: "training-1", port: 9000, what: "inference server syncs a checkpoint (1 MiB echo)", wantOK: true, check: echoCheck(1 << 20)},
		{from: "alice-laptop", to: "training-1", port: 9001, what: "nothing listens on :9001", wantOK: false},
	}
	failed := 0
	for _, f := range flows {
		err := runFlow(ctx, byName[f.from].a, f)
		ok := (err == nil) == f.wantOK
		verdict := "ok"
		if !ok {
			verdict = "UNEXPECTED"
			failed++
		}
		result := "connected"
		if err != nil {
			result = "failed: " + err.Error()
		}
		fmt.Fprintf(out, "    [%s] %s -> %s:%d (%s): %s\n", verdict, f.from, f.to, f.port, f.what, result)
	}

	step("status as seen by alice-laptop")
	st, err := byName["alice-laptop"].a.Status(ctx)
	if err != nil {
		return fmt.Errorf("demo: status: %w", err)
	}
	writeStatus(out, st, time.Now())

	if failed > 0 {
		return &exitError{code: 1, msg: fmt.Sprintf("demo: %d of %d flows did not behave as expected", failed, len(flows))}
	}
	fmt.Fprintf(out, "==> all %d flows behaved as expected\n", len(flows))
	return nil
}

func keyKind(o control.AuthKeyOptions) string {
	if len(o.Tags) > 0 {
		return strings.Join(o.Tags, ",")
	}
	return o.User
}

func short(s string) string {
	if len(s) > 16 {
		return s[:16] + "..."
	}
	return s
}

func ipStrings[T fmt.Stringer](ips []T) []string {
	out := make([]string, 0, len(ips))
	for _, ip := range ips {
		out = append(out, ip.String())
	}
	return out
}

// waitMesh polls until every node lists all others as peers.
func waitMesh(ctx context.Context, nodes []*demoNode) error {
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		missing := ""
		for _, n := range nodes {
			st, err := n.a.Status(ctx)
			if err != nil {
				return err
			}
			if len(st.Peers) != len(nodes)-1 {
				missing = fmt.Sprintf("%s sees %d peers", n.name, len(st.Peers))
			}
		}
		if missing == "" {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("mesh did not form: %s", missing)
		case <-t.C:
		}
	}
}

func serveModelAPI(ctx context.Context, a *agent.Agent, port uint16) error {
	ln, err := a.Listen("tcp4", port)
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/models", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, `{"served_by":"inference-1","client":%q,"models":["llama-70b"]}`, r.RemoteAddr)
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	context.AfterFunc(ctx, func() { srv.Close() })
	return nil
}

func serveEcho(ctx context.Context, a *agent.Agent, port uint16) error {
	ln, err := a.Listen("tcp4", port)
	if err != nil {
		return err
	}
	context.AfterFunc(ctx, func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	return nil
}

func runFlow(ctx context.Context, from *agent.Agent, f demoFlow) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, err := from.Dial(ctx, "tcp", net.JoinHostPort(f.to, fmt.Sprint(f.port)))
	if err != nil {
		return err
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	if f.check == nil {
		return nil
	}
	return f.check(ctx, conn)
}

func httpGetCheck(want string) func(context.Context, net.Conn) error {
	return func(ctx context.Context, conn net.Conn) error {
		fmt.Fprintf(conn, "GET /v1/models HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", want)
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			return err
		}
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), `"served_by":"`+want+`"`) {
			return fmt.Errorf("unexpected answer %s %q", resp.Status, body)
		}
		return nil
	}
}

func echoCheck(n int) func(context.Context, net.Conn) error {
	return func(ctx context.Context, conn net.Conn) error {
		data := make([]byte, n)
		for i := range data {
			data[i] = byte(i*31 + i>>8)
		}
		errc := make(chan error, 1)
		go func() {
			_, err := conn.Write(data)
			if cw, ok := conn.(interface{ CloseWrite() error }); ok && err == nil {
				err = cw.CloseWrite()
			}
			errc <- err
		}()
		got, err := io.ReadAll(conn)
		if werr := <-errc; werr != nil {
			return werr
		}
		if err != nil {
			return err
		}
		if len(got) != n {
			return fmt.Errorf("echoed %d of %d bytes", len(got), n)
		}
		for i := range got {
			if got[i] != data[i] {
				return errors.New("echoed data differs")
			}
		}
		return nil
	}
}
