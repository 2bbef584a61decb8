package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"sync"

	"meshd.dev/meshd/control"
	"meshd.dev/meshd/derp"
	"meshd.dev/meshd/derp/derpmetrics"
	"meshd.dev/meshd/nat/stun"
	"meshd.dev/meshd/netmap"
)

// coordDERPFlags are the coordinator's relay flags: either a DERP map file,
// or the embedded relay and STUN server (the default).
type coordDERPFlags struct {
	fs                                        *flag.FlagSet
	derpMap, derpListen, stunListen, derpHost *string
}

func registerCoordDERPFlags(fs *flag.FlagSet) *coordDERPFlags {
	return &coordDERPFlags{
		fs:         fs,
		derpMap:    fs.String("derp-map", "", "DERP map `file` (huJSON) to hand out; without it the coordinator runs an embedded relay and STUN server and hands out a one-region map pointing at itself"),
		derpListen: fs.String("derp-listen", "", "TCP `address` for the embedded relay (TLS, coordinator's certificate); empty: /derp on the --listen port"),
		stunListen: fs.String("stun-listen", "", "UDP `address` for the embedded STUN server; empty: the --listen address on UDP; \"off\" disables it"),
		derpHost:   fs.String("derp-host", "", "`host` name or IP nodes use to reach the embedded relay (default: the --listen host; required when that is 0.0.0.0 or ::)"),
	}
}

func (f *coordDERPFlags) set(name string) bool {
	set := false
	f.fs.Visit(func(fl *flag.Flag) { set = set || fl.Name == name })
	return set
}

// loadMap returns the --derp-map file's map, nil when the embedded relay
// is to be used.
func (f *coordDERPFlags) loadMap() (*netmap.DERPMap, error) {
	if *f.derpMap == "" {
		return nil, nil
	}
	for _, n := range []string{"derp-listen", "stun-listen", "derp-host"} {
		if f.set(n) {
			return nil, fmt.Errorf("--%s configures the embedded relay, which --derp-map replaces: drop one of them", n)
		}
	}
	m, err := control.LoadDERPMap(*f.derpMap)
	if err != nil {
		return nil, err
	}
	return m, nil
}

// advertisedHost is the host nodes dial: --derp-host, or the --listen host
// as typed (a name stays a name) when it names one address. A wildcard
// listen is an error rather than a guess: on a multi-homed machine picking
// an interface address would hand nodes an unreachable relay.
func (f *coordDERPFlags) advertisedHost(listen string) (string, error) {
	if *f.derpHost != "" {
		return *f.derpHost, nil
	}
	h, _, err := net.SplitHostPort(listen)
	if err != nil {
		return "", fmt.Errorf("--listen %q: %w", listen, err)
	}
	if ip, perr := net.ParseIP(h), h == ""; perr || (ip != nil && ip.IsUnspecified()) {
		return "", fmt.Errorf("--listen %q accepts on every address, so the embedded relay's address for nodes is unknown: pass --derp-host HOST (the name or IP nodes reach this machine by), or --derp-map FILE", listen)
	}
	return h, nil
}

// startCoordDERP runs the embedded relay and STUN server unless a DERP map
// was given, sets the one-region map on s, and returns a function that
// stops them. ln is the coordinator's listener.
func (c *cli) startCoordDERP(ctx context.Context, s *control.Server, listen string, ln net.Listener, f *coordDERPFlags, stateDir string) (stop func(), err error) {
	tokPath, err := s.EnableRelayVerify()
	if err != nil {
		return nil, err
	}
	if tokPath == "" {
		fmt.Fprintln(c.stdout, "relay token: the tailnet's, made by the replica that first enabled it (its state dir's relay.token, for meshd derp --coordinator-token-file); this replica holds no copy")
	} else {
		fmt.Fprintf(c.stdout, "relay token: %s (for meshd derp --coordinator-token-file)\n", tokPath)
	}
	if *f.derpMap != "" {
		fmt.Fprintf(c.stdout, "derp: map from %s (%d regions)\n", *f.derpMap, len(s.DERPMap().Regions))
		return func() {}, nil
	}
	host, err := f.advertisedHost(listen)
	if err != nil {
		return nil, err
	}
	key, err := derp.LoadOrCreateServerKey(stateDir)
	if err != nil {
		return nil, err
	}
	ds, err := derp.NewServer(derp.ServerOptions{PrivateKey: key, Verify: s.VerifyNodeKey, Logger: c.log})
	if err != nil {
		return nil, err
	}
	if err := s.AddMetrics(derpmetrics.New(ds)); err != nil {
		ds.Close()
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	stop = func() {
		cancel()
		ds.Close() // hijacked relay connections outlive the HTTP servers
		wg.Wait()
	}
	fail := func(err error) (func(), error) { stop(); return nil, err }
	// A node deleted, expired or re-keyed loses its relay connection at
	// once, not when it next reconnects.
	wg.Add(1)
	go func() { defer wg.Done(); s.EnforceRevocations(ctx, ds) }()

	derpAddr := ln.Addr().(*net.TCPAddr)
	if *f.derpListen == "" {
		s.Handle("/derp", ds)
	} else {
		dln, err := net.Listen("tcp", *f.derpListen)
		if err != nil {
			return fail(fmt.Errorf("--derp-listen: %w", err))
		}
		derpAddr = dln.Addr().(*net.TCPAddr)
		cert := s.TLSConfig().Certificates
		lim := s.ConnLimits()
		hs := lim.Server(ds)
		hs.ErrorLog = slog.NewLogLogger(c.log.Handler(), slog.LevelDebug)
		hs.TLSConfig = &tls.Config{Certificates: cert, NextProtos: []string{"http/1.1"}, MinVersion: tls.VersionTLS12}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := hs.ServeTLS(lim.Listener(dln), "", ""); !errors.Is(err, http.ErrServerClosed) {
				c.log.Error("embedded relay stopped serving", "err", err)
			}
		}()
		context.AfterFunc(ctx, func() { hs.Close() })
	}

	stunPort := -1 // disabled, explicitly: some readers take 0 as "the default port"
	if *f.stunListen != "off" {
		addr := *f.stunListen
		if addr == "" {
			h, _, _ := net.SplitHostPort(ln.Addr().String())
			addr = net.JoinHostPort(h, strconv.Itoa(ln.Addr().(*net.TCPAddr).Port))
		}
		st, err := stun.Listen(addr, c.log)
		if err != nil {
			return fail(fmt.Errorf("embedded STUN server (--stun-listen, \"off\" to disable): %w", err))
		}
		stunPort = int(st.AddrPort().Port())
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := st.Serve(ctx); err != nil && ctx.Err() == nil {
				c.log.Error("embedded STUN server stopped", "err", err)
			}
		}()
	}
	m := control.EmbeddedDERPMap(host, derpAddr.Port, stunPort, s.Fingerprint())
	if err := s.SetEmbeddedDERPMap(m); err != nil {
		return fail(err)
	}
	stunDesc := "off"
	if stunPort > 0 {
		stunDesc = "udp port " + strconv.Itoa(stunPort)
	}
	fmt.Fprintf(c.stdout, "derp: embedded relay on https://%s/derp (region %d, advertised as %s), STUN %s\n",
		derpAddr, control.EmbeddedDERPRegionID, net.JoinHostPort(host, strconv.Itoa(derpAddr.Port)), stunDesc)
	if s.Replicated() {
		fmt.Fprintln(c.stdout, "derp: the embedded relay forms one region with the other replicas' relays; nodes use the oldest live replica's relay (docs/ha.md)")
	}
	return stop, nil
}
