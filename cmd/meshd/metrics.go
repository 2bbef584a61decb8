package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"

	"meshd.dev/meshd/agent/localapi"
)

// metricsFlagHelp is the --metrics-listen help of every command that has it.
const metricsFlagHelp = "serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9100); off when empty. Anyone who reaches ADDR can read them: keep it on loopback or a scrape network"

// metricsServer serves h at /metrics on addr until ctx ends. It listens
// before returning, so a port that is taken fails the command at start
// rather than later in a log line. An empty addr serves nothing.
func metricsServer(ctx context.Context, addr string, h http.Handler, log *slog.Logger) (wait func(), err error) {
	if addr == "" {
		return func() {}, nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--metrics-listen %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", h)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 10 * time.Second,
		WriteTimeout: 30 * time.Second, IdleTimeout: 60 * time.Second, MaxHeaderBytes: 8 << 10}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server", "err", err)
		}
	}()
	stop := context.AfterFunc(ctx, func() { srv.Close() })
	log.Info("metrics listening", "addr", "http://"+ln.Addr().String()+"/metrics")
	return func() {
		stop()
		srv.Close()
		<-done
	}, nil
}

func (c *cli) metricsCmd() *ffcli.Command {
	fs := flag.NewFlagSet("metrics", flag.ContinueOnError)
	socket := fs.String("socket", localapi.DefaultSocket, "local API unix socket of the daemon")
	return &ffcli.Command{
		Name:       "metrics",
		ShortUsage: "meshd metrics [--socket PATH]",
		ShortHelp:  "print the daemon's Prometheus metrics (text format), no scraper needed",
		FlagSet:    fs,
		Options:    envOptions,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return fmt.Errorf("metrics: unexpected arguments %q", args)
			}
			if err := localapi.NewClient(*socket).Metrics(ctx, c.stdout); err != nil {
				return noDaemonHint(err, *socket)
			}
			return nil
		},
	}
}
