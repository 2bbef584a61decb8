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
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"

	"meshd.dev/meshd/agent"
	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/control"
	"meshd.dev/meshd/policy"
)

// demoNode is one node of the demo tailnet.
type demoNode struct {
	name string
	key  control.AuthKeyOptions
	a    *agent.Agent
}

// demoFlow is one connection the demo makes and what should happen.
type demoFlow struct {
	from, to string
	port     uint16
	what     string
	wantOK   bool // false: the connection must fail
	// history: print the path history the sender's status showed since
	// the peer joined (relay first, then direct, or direct at once when
	// hole punching wins the race). A node whose direct path stays
	// unusable cannot be made in one unprivileged process (every node
	// reaches every other over UDP on loopback), so this is what the demo
	// shows of the relay; the NAT lab tests (internal/e2e) assert it.
	history bool
	// denied: the policy denies the flow, and the destination's packet
	// filter must show the drop (wantOK is false).
	denied bool
	check  func(ctx context.Context, conn net.Conn) error
}

// demoPolicyFile is the name the demo's policy is stored and reported under.
const demoPolicyFile = "demo-policy.hujson"

// demoPolicy is the policy the demo runs under, the seed's shape: ML
// engineers, inference servers and a training cluster. With
// openCheckpoints, engineers may also pull checkpoints (tcp:9000) from the
// training cluster: the live change the demo makes.
func demoPolicy(openCheckpoints bool) string {
	checkpoints, verdict := "", "deny"
	if openCheckpoints {
		checkpoints = `
		// Engineers pull checkpoints from the training cluster.
		{"src": ["group:ml-engineers"], "dst": ["tag:training-cluster"], "ip": ["tcp:9000"]},`
		verdict = "accept"
	}
	return `// The policy of meshd demo: engineers, inference servers, a training cluster.
{
	"groups": {"group:ml-engineers": ["alice@example.com"]},
	"tagOwners": {
		"tag:inference-server": ["group:ml-engineers"],
		"tag:training-cluster": ["group:ml-engineers"],
	},
	"grants": [
		// Engineers query the model API, and reach the training cluster over SSH only.
		{"src": ["group:ml-engineers"], "dst": ["tag:inference-server"], "ip": ["tcp:8000"]},
		{"src": ["group:ml-engineers"], "dst": ["tag:training-cluster"], "ip": ["tcp:22"]},` + checkpoints + `
		// Training pushes to inference; inference syncs checkpoints from training
		// and hands batches to other inference servers.
		{"src": ["tag:training-cluster"], "dst": ["tag:inference-server"], "ip": ["tcp:8000"]},
		{"src": ["tag:inference-server"], "dst": ["tag:training-cluster"], "ip": ["tcp:9000"]},
		{"src": ["tag:inference-server"], "dst": ["tag:inference-server"], "ip": ["tcp:9100"]},
	],
	"tests": [
		{"src": "alice@example.com", "accept": ["tag:inference-server:8000", "tag:training-cluster:22"]},
		{"src": "alice@example.com", "` + verdict + `": ["tag:training-cluster:9000"]},
		{"src": "tag:training-cluster", "accept": ["tag:inference-server:8000"], "deny": ["tag:inference-server:22"]},
	],
}
`
}

func (c *cli) demoCmd() *ffcli.Command {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	verbose := fs.Bool("verbose", false, "show the agents' and coordinator's logs")
	keep := fs.Bool("keep", false, "keep the temporary state directory")
	return &ffcli.Command{
		Name:       "demo",
		ShortUsage: "meshd demo [--verbose] [--keep]",
		ShortHelp:  "run a coordinator with its embedded DERP relay and four nodes under a policy in this process (no root): allowed and denied connections, the path each took, and a live policy change",
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
	url := "https://" + ln.Addr().String()
	fmt.Fprintf(out, "    coordinator %s, key fingerprint %s\n", url, short(srv.Fingerprint()))

	// The embedded relay and STUN server, set up exactly as `meshd
	// coordinator` does without --derp-map. Its chatter (the relay token
	// path) is not for the demo's reader, so only the relay line is shown.
	var derpOut strings.Builder
	dc := &cli{stdout: &derpOut, stderr: c.stderr, log: log.With("c", "derp")}
	noDERPFlags := ""
	stopDERP, err := dc.startCoordDERP(ctx, srv, ln.Addr().String(), ln,
		&coordDERPFlags{derpMap: &noDERPFlags, derpListen: &noDERPFlags, stunListen: &noDERPFlags, derpHost: &noDERPFlags},
		filepath.Join(dir, "coordinator"))
	if err != nil {
		ln.Close()
		return fmt.Errorf("demo: embedded relay: %w", err)
	}
	defer stopDERP()
	for _, l := range strings.Split(strings.TrimSpace(derpOut.String()), "\n") {
		if strings.HasPrefix(l, "derp:") {
			fmt.Fprintf(out, "    %s\n", l)
		}
	}
	go srv.Serve(ln)

	policyPath := filepath.Join(dir, demoPolicyFile)
	if err := os.WriteFile(policyPath, []byte(demoPolicy(false)), 0o600); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	if _, err := srv.ApplyPolicy(ctx, demoPolicyFile, []byte(demoPolicy(false))); err != nil {
		return fmt.Errorf("demo: policy: %w", err)
	}
	step("policy in force (%s): engineers reach inference servers on :8000 and the training cluster on SSH only", demoPolicyFile)

	nodes := []*demoNode{
		{name: "inference-1", key: control.AuthKeyOptions{Tags: []string{"tag:inference-server"}, Preauthorized: true}},
		{name: "training-1", key: control.AuthKeyOptions{Tags: []string{"tag:training-cluster"}, Preauthorized: true}},
		{name: "alice-laptop", key: control.AuthKeyOptions{User: "alice@example.com", Preauthorized: true}},
	}
	runCtx, stopAgents := context.WithCancel(ctx)
	var running []chan error
	paths := newPathRecorder()
	recDone := make(chan struct{})
	go func() { defer close(recDone); paths.run(runCtx, 5*time.Millisecond) }()
	defer func() {
		stopAgents()
		<-recDone
		for _, done := range running {
			<-done
		}
		for _, n := range nodes {
			if n.a != nil {
				n.a.Close()
			}
		}
	}()
	join := func(n *demoNode) error {
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
		paths.add(n.name, n.a)
		st, err := n.a.Up(ctx, localapi.UpRequest{AuthKey: secret, Coordinator: url, Hostname: n.name})
		if err != nil {
			return fmt.Errorf("demo: %s up: %w", n.name, err)
		}
		fmt.Fprintf(out, "==> %s joined with a %s key: %s, node %d, %s\n", n.name, keyKind(n.key), strings.Join(ipStrings(st.Self.IPs), " "), st.Self.ID, owner(st.Self))
		return nil
	}
	for _, n := range nodes {
		if err := join(n); err != nil {
			return err
		}
	}

	step("waiting until every node has a path to the other two")
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
		{from: "alice-laptop", to: "training-1", port: 9000, what: "engineer pulls a checkpoint: the policy gives engineers SSH only", wantOK: false, denied: true},
	}
	failed := 0
	do := func(f demoFlow, joined time.Duration) {
		from := byName[f.from].a
		before, err := peerPathOf(ctx, from, f.to)
		if err != nil {
			before = localapi.Peer{Path: "none"}
		}
		start := time.Now()
		flowErr := runFlow(ctx, from, f)
		ok := (flowErr == nil) == f.wantOK
		var problems, notes []string
		if f.denied {
			// The reason comes from the destination's packet filter, not
			// from the failed dial: a denied flow and a dead service look
			// the same to the sender.
			drop, err := demoDrop(ctx, from, byName[f.to].a, f.port)
			if err != nil {
				ok = false
				problems = append(problems, err.Error())
			} else {
				notes = append(notes, fmt.Sprintf("denied by %s's packet filter: %s, %s %s -> %s (%d packets dropped)",
					f.to, drop.Reason, protoName(drop.Proto, true), hostPort(drop.Src, drop.SrcPort), hostPort(drop.Dst, drop.DstPort), drop.count))
			}
		}
		after := before
		if f.wantOK {
			// The first pong makes a path direct; on loopback that takes
			// milliseconds, but it races the flow itself, so poll.
			if after, err = waitDirect(ctx, from, f.to, 5*time.Second); err != nil {
				ok = false
				problems = append(problems, err.Error())
			}
		}
		took := time.Since(start)
		pathLine := describeTransition(before, after, took)
		if f.history {
			pathLine, _ = describeHistory(paths.history(f.from, f.to), joined)
		}
		verdict := "ok"
		if !ok {
			verdict = "UNEXPECTED"
			failed++
		}
		result := "connected"
		switch {
		case flowErr != nil && f.denied:
			result = "denied"
		case flowErr != nil:
			result = "failed: " + flowErr.Error()
		}
		fmt.Fprintf(out, "    [%s] %s -> %s:%d (%s): %s\n", verdict, f.from, f.to, f.port, f.what, result)
		fmt.Fprintf(out, "         path: %s\n", pathLine)
		for _, n := range notes {
			fmt.Fprintf(out, "         %s\n", n)
		}
		for _, p := range problems {
			fmt.Fprintf(out, "         problem: %s\n", p)
		}
	}
	for _, f := range flows {
		do(f, 0)
	}

	// A node joining a running tailnet: the others learn of it from the
	// coordinator and handshake at once (persistent keepalive), before any
	// disco pong has confirmed a direct path, so their first packets to it
	// are relayed. The recorder's status polls show that, then the switch.
	late := &demoNode{name: "gpu-spot-1", key: control.AuthKeyOptions{Tags: []string{"tag:inference-server"}, Preauthorized: true}}
	step("%s joins the running tailnet: traffic to it can start on DERP(coord) and moves to a direct path once a disco pong confirms one", late.name)
	joinedAt := paths.since()
	nodes = append(nodes, late)
	if err := join(late); err != nil {
		return err
	}
	byName[late.name] = late
	if err := waitMesh(ctx, nodes); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	if err := serveEcho(runCtx, late.a, 9100); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	// No traffic has gone to the new node yet, so no node has configured
	// it in WireGuard or looked for a path to it: the flow's first packets
	// go through the relay while disco pings look for a direct path.
	relayFrom := nodes[0].name
	relayFlow := demoFlow{from: relayFrom, to: late.name, port: 9100, what: "hands a batch to the new node (64 KiB echo)", wantOK: true, history: true, check: echoCheck(64 << 10)}
	flows = append(flows, relayFlow)
	do(relayFlow, joinedAt)

	// The policy changes live: the coordinator sends training-1 its new
	// filter, and the flow denied above opens without restarting anything.
	step("changing the policy live: engineers may pull checkpoints (tcp:9000) from the training cluster")
	oldPol, err := policy.Parse(demoPolicyFile, []byte(demoPolicy(false)))
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	newPol, err := policy.Parse(demoPolicyFile, []byte(demoPolicy(true)))
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	for _, fl := range policy.Diff(oldPol, newPol).Opened {
		fmt.Fprintf(out, "    + %s\n", fl)
	}
	changed := time.Now()
	if _, err := srv.ApplyPolicy(ctx, demoPolicyFile, []byte(demoPolicy(true))); err != nil {
		return fmt.Errorf("demo: policy change: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "demo-policy-new.hujson"), []byte(demoPolicy(true)), 0o600); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	rule, err := waitAllowedNow(ctx, byName["alice-laptop"].a, byName["training-1"].a, 9000, 10*time.Second)
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	fmt.Fprintf(out, "    training-1's filter allows the dropped flow now (rule %s), %v after the change\n", rule, time.Since(changed).Round(time.Millisecond))
	reopened := demoFlow{from: "alice-laptop", to: "training-1", port: 9000, what: "the same checkpoint pull, after the change (64 KiB echo)", wantOK: true, check: echoCheck(64 << 10)}
	flows = append(flows, reopened)
	do(reopened, 0)

	step("status as seen by alice-laptop")
	st, err := byName["alice-laptop"].a.Status(ctx)
	if err != nil {
		return fmt.Errorf("demo: status: %w", err)
	}
	writeStatus(out, st)

	if failed > 0 {
		return &exitError{code: 1, msg: fmt.Sprintf("demo: %d of %d flows did not behave as expected", failed, len(flows))}
	}
	fmt.Fprintf(out, "==> all %d flows behaved as expected\n", len(flows))
	where := "DIR"
	fmt.Fprintln(out, "==> try next")
	if keep {
		where = dir
	} else {
		fmt.Fprintln(out, "    meshd demo --keep    # keeps DIR, with the policy before and after the change")
	}
	before, after := filepath.Join(where, demoPolicyFile), filepath.Join(where, "demo-policy-new.hujson")
	fmt.Fprintf(out, "    meshd policy explain %s --src alice@example.com --dst tag:training-cluster:9000    # denied, and why\n", before)
	fmt.Fprintf(out, "    meshd policy diff %s %s    # what the change opens\n", before, after)
	fmt.Fprintln(out, "    meshd policy check --strict YOUR-POLICY.hujson    # a Tailscale policy file loads as it is")
	fmt.Fprintln(out, "    README.md, \"Five minutes: two nodes under a policy\": the same on real TUN devices, where")
	fmt.Fprintln(out, "    meshd debug drops on a node shows what its filter dropped, and why")
	return nil
}

// demoDropRecord is a drop with the number of packets like it.
type demoDropRecord struct {
	localapi.Drop
	count int
}

// demoDrop returns the last inbound packet to's filter dropped from one of
// from's addresses to port, with the number of such drops.
func demoDrop(ctx context.Context, from, to *agent.Agent, port uint16) (demoDropRecord, error) {
	st, err := from.Status(ctx)
	if err != nil {
		return demoDropRecord{}, err
	}
	drops, err := to.Drops(ctx)
	if err != nil {
		return demoDropRecord{}, err
	}
	var out demoDropRecord
	for _, d := range drops.Drops {
		if d.Dir == "in" && d.DstPort == port && st.Self != nil && slices.Contains(st.Self.IPs, d.Src) {
			out.Drop = d
			out.count++
		}
	}
	if out.count == 0 {
		return out, fmt.Errorf("the flow failed, but the destination's packet filter recorded no drop from the sender to port %d", port)
	}
	return out, nil
}

// waitAllowedNow polls to's recorded drops from from to port until the
// rules in force allow them (the new policy reached to's filter), and
// returns the origin of the allowing rule.
func waitAllowedNow(ctx context.Context, from, to *agent.Agent, port uint16, d time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		drop, err := demoDrop(ctx, from, to, port)
		if err == nil && drop.AllowedNowBy != "" {
			return drop.AllowedNowBy, nil
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("the new policy did not reach the destination's packet filter within %v", d)
		case <-t.C:
		}
	}
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

// waitMesh polls until every node lists all others as peers and has a
// path to each, relayed or direct.
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
				continue
			}
			for _, p := range st.Peers {
				if p.Path == "none" {
					missing = fmt.Sprintf("%s has no path to %s yet", n.name, p.Hostname)
				}
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
	timeout := 10 * time.Second
	if f.denied {
		// A denied SYN is dropped silently: the dial can only time out.
		// Five seconds cover the netstack's first retransmissions (1 s,
		// 3 s), so the destination's filter has seen the flow even when
		// the first SYN waited for a WireGuard handshake.
		timeout = 5 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
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

// peerPathOf is the path from's status reports towards the peer named to.
func peerPathOf(ctx context.Context, from *agent.Agent, to string) (localapi.Peer, error) {
	st, err := from.Status(ctx)
	if err != nil {
		return localapi.Peer{}, err
	}
	for _, p := range st.Peers {
		if strings.EqualFold(p.Hostname, to) {
			return p, nil
		}
	}
	return localapi.Peer{}, fmt.Errorf("%s is not a peer in status", to)
}

// waitDirect polls from's status until the path to the peer named to is
// direct, and returns that peer; after d it returns the last one seen and
// an error.
func waitDirect(ctx context.Context, from *agent.Agent, to string, d time.Duration) (localapi.Peer, error) {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		p, err := peerPathOf(ctx, from, to)
		if err != nil {
			return p, err
		}
		if p.Path == "direct" {
			return p, nil
		}
		select {
		case <-ctx.Done():
			return p, fmt.Errorf("path to %s still %s after %v, not direct", to, describePath(p), d)
		case <-t.C:
		}
	}
}

// describePath names a status path as the demo prints it: "via DERP(coord)"
// or "direct 127.0.0.1:port".
func describePath(p localapi.Peer) string {
	switch p.Path {
	case "derp":
		return fmt.Sprintf("via DERP(%s)", strings.TrimPrefix(p.Endpoint, "derp:"))
	case "direct":
		return "direct " + p.Endpoint
	}
	return p.Path
}

// describeHistory tells the recorded paths relative to joined (when the
// peer joined), and whether a relayed path preceded a direct one.
func describeHistory(h []pathEvent, joined time.Duration) (line string, relayedFirst bool) {
	if len(h) == 0 {
		return "no path recorded", false
	}
	var parts []string
	sawRelay := false
	for _, e := range h {
		parts = append(parts, fmt.Sprintf("%s from +%v", describePath(e.peer), (e.at-joined).Round(time.Millisecond)))
		switch e.peer.Path {
		case "derp":
			sawRelay = true
		case "direct":
			relayedFirst = relayedFirst || sawRelay
		}
	}
	return strings.Join(parts, ", then ") + " after it joined", relayedFirst
}

func describeTransition(before, after localapi.Peer, took time.Duration) string {
	if before.Path == after.Path && before.Endpoint == after.Endpoint {
		return describePath(after)
	}
	return fmt.Sprintf("%s, then %s (within %v of the first packet)", describePath(before), describePath(after), took.Round(time.Millisecond))
}

// pathRecorder polls the agents' status from before they join and keeps,
// per (node, peer), each path the status reported and when: the only
// in-process way to see the relayed first packets, since every peer
// handshakes (persistent keepalive) as soon as it is configured.
type pathRecorder struct {
	start  time.Time
	mu     sync.Mutex
	agents []namedAgent
	seen   map[[2]string][]pathEvent
}

type namedAgent struct {
	name string
	a    *agent.Agent
}

type pathEvent struct {
	peer localapi.Peer
	at   time.Duration
}

func newPathRecorder() *pathRecorder {
	return &pathRecorder{start: time.Now(), seen: map[[2]string][]pathEvent{}}
}

func (r *pathRecorder) add(name string, a *agent.Agent) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.agents = append(r.agents, namedAgent{name, a})
}

func (r *pathRecorder) run(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		r.mu.Lock()
		agents := slices.Clone(r.agents)
		r.mu.Unlock()
		for _, na := range agents {
			st, err := na.a.Status(ctx)
			if err != nil {
				continue // stopping; the next tick or ctx ends the loop
			}
			at := time.Since(r.start)
			r.mu.Lock()
			for _, p := range st.Peers {
				k := [2]string{na.name, p.Hostname}
				ev := r.seen[k]
				if p.Path != "none" && (len(ev) == 0 || ev[len(ev)-1].peer.Path != p.Path || ev[len(ev)-1].peer.Endpoint != p.Endpoint) {
					r.seen[k] = append(ev, pathEvent{peer: p, at: at})
				}
			}
			r.mu.Unlock()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// since is the time since the recorder started, the origin of its events.
func (r *pathRecorder) since() time.Duration { return time.Since(r.start) }

// history is the paths from's status reported towards to, in order.
func (r *pathRecorder) history(from, to string) []pathEvent {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.seen[[2]string{from, to}])
}
