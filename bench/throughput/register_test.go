package throughput

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"flag"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"meshd.dev/meshd/control/controlclient"
	"meshd.dev/meshd/netmap"
)

// registerMain is the helper the idle-memory measurement runs inside the
// coordinator's namespace: it enrols -n fake machines with real
// registrations (a machine key each, TLS client certificate, auth key) so a
// real daemon then gets them all as peers. It prints "registered N" and
// returns the exit code.
func registerMain(args []string) int {
	fs := flag.NewFlagSet("register", flag.ContinueOnError)
	url := fs.String("coordinator", "", "coordinator URL")
	key := fs.String("authkey", "", "reusable auth key")
	n := fs.Int("n", 0, "machines to register")
	prefix := fs.String("prefix", "fake", "hostname prefix")
	workers := fs.Int("workers", 8, "concurrent registrations")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	var (
		next, done atomic.Int64
		wg         sync.WaitGroup
		errOnce    sync.Once
		firstErr   error
	)
	for range *workers {
		wg.Go(func() {
			for {
				i := next.Add(1) - 1
				if i >= int64(*n) || ctx.Err() != nil {
					return
				}
				if err := registerOne(ctx, *url, *key, fmt.Sprintf("%s-%d", *prefix, i)); err != nil {
					errOnce.Do(func() { firstErr = err; cancel() })
					return
				}
				done.Add(1)
			}
		})
	}
	wg.Wait()
	if firstErr != nil {
		fmt.Fprintf(os.Stderr, "register: %v (after %d)\n", firstErr, done.Load())
		return 1
	}
	fmt.Printf("registered %d\n", done.Load())
	return 0
}

func registerOne(ctx context.Context, url, authKey, hostname string) error {
	_, machine, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return err
	}
	nk := netmap.NewNodePrivate()
	c, err := controlclient.NewClient(controlclient.ClientOptions{URL: url, MachineKey: machine, NodeKey: nk})
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = c.Register(ctx, netmap.RegisterRequest{
		NodeKey:  nk.Public(),
		DiscoKey: netmap.NewDiscoPrivate().Public(),
		Hostname: hostname,
		AuthKey:  authKey,
	})
	if err != nil {
		return fmt.Errorf("register %s: %w", hostname, err)
	}
	return nil
}
