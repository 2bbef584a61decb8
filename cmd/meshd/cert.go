package main

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"

	"meshd.dev/meshd/agent/certs"
	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/internal/atomicfile"
)

func (c *cli) certCmd() *ffcli.Command {
	fs := flag.NewFlagSet("cert", flag.ContinueOnError)
	socket := fs.String("socket", localapi.DefaultSocket, "local API unix socket of the daemon")
	certFile := fs.String("cert-file", "", "`path` to write the certificate to (PEM; default NAME.crt in the current directory)")
	keyFile := fs.String("key-file", "", "`path` to write the private key to (PEM, mode 0600; default NAME.key in the current directory)")
	caFile := fs.String("ca-file", "", "write the tailnet CA certificate (PEM) to this `path`, for --cacert and trust stores")
	installCA := fs.Bool("install-ca", false, "make this host trust the tailnet CA: install it into the Debian/Ubuntu trust store (/usr/local/share/ca-certificates, then update-ca-certificates)")
	trustRoot := fs.String("trust-root", "/", "with --install-ca: the root `directory` of the file system whose trust store to change (a container image or chroot being built)")
	return &ffcli.Command{
		Name:       "cert",
		ShortUsage: "meshd cert [--cert-file PATH] [--key-file PATH] [--ca-file PATH] [--install-ca [--trust-root DIR]] [DOMAIN]",
		ShortHelp:  "write this node's TLS certificate for its DNS name, or the tailnet CA",
		LongHelp: `Writes this node's TLS certificate and private key for its MagicDNS name
(NAME.crt and NAME.key in the current directory, or --cert-file and
--key-file), for a web server on the node. DOMAIN, if given, must be the
node's own name: a node gets a certificate for nothing else. The daemon makes
the key, has the coordinator's tailnet CA sign it (valid 14 days), keeps it
in its state dir and renews it when a third of its lifetime is left; run
meshd cert again (from cron, say) to refresh the files: it exits 1 when they
already hold the current certificate, so ` + "`meshd cert && systemctl reload nginx`" + `
reloads only on a change.

Clients trust these certificates through the tailnet CA, which is
constrained to the tailnet's DNS suffix and addresses. --ca-file PATH writes
it (for curl --cacert); --install-ca adds it to this host's trust store (run
as root). With only --ca-file or --install-ca, no certificate is written.
A command that changes nothing says so and exits 1.`,
		FlagSet: fs,
		Options: envOptions,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) > 1 {
				return &exitError{2, fmt.Sprintf("cert: at most one DOMAIN, got %q", args)}
			}
			given := map[string]bool{}
			fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
			if given["trust-root"] && !*installCA {
				return &exitError{2, "cert: --trust-root applies only with --install-ca"}
			}
			domain := ""
			if len(args) == 1 {
				domain = args[0]
			}
			wantPair := domain != "" || *certFile != "" || *keyFile != "" || (*caFile == "" && !*installCA)
			lc := localapi.NewClient(*socket)
			var changed, unchanged []string
			if wantPair {
				p, err := lc.CertPair(ctx, domain)
				if err != nil {
					return noDaemonHint(err, *socket)
				}
				cf, kf := *certFile, *keyFile
				if cf == "" {
					cf = p.Name + ".crt"
				}
				if kf == "" {
					kf = p.Name + ".key"
				}
				// The key first: a certificate without its key is of no use.
				kc, err := writeIfChanged(kf, []byte(p.KeyPEM), 0o600)
				if err != nil {
					return fmt.Errorf("cert: %w", err)
				}
				cc, err := writeIfChanged(cf, []byte(p.CertPEM), 0o644)
				if err != nil {
					return fmt.Errorf("cert: %w", err)
				}
				what := fmt.Sprintf("certificate for %s in %s and its key in %s (valid until %s)", p.Name, cf, kf, p.NotAfter.UTC().Format(time.RFC3339))
				if kc || cc {
					changed = append(changed, "wrote the "+what)
				} else {
					unchanged = append(unchanged, "the "+what+" are current")
				}
			}
			if *caFile != "" || *installCA {
				ca, err := lc.TailnetCA(ctx)
				if err != nil {
					return noDaemonHint(err, *socket)
				}
				if *caFile != "" {
					ch, err := writeIfChanged(*caFile, []byte(ca.CertPEM), 0o644)
					if err != nil {
						return fmt.Errorf("cert: %w", err)
					}
					if ch {
						changed = append(changed, fmt.Sprintf("wrote the tailnet CA (%s) to %s", ca.Suffix, *caFile))
					} else {
						unchanged = append(unchanged, fmt.Sprintf("%s already holds the tailnet CA", *caFile))
					}
				}
				if *installCA {
					msg, ch, err := installTailnetCA(ctx, ca, *trustRoot)
					if err != nil {
						return fmt.Errorf("cert: %w", err)
					}
					if ch {
						changed = append(changed, msg)
					} else {
						unchanged = append(unchanged, msg)
					}
				}
			}
			for _, m := range changed {
				fmt.Fprintln(c.stdout, "meshd: "+m)
			}
			for _, m := range unchanged {
				fmt.Fprintln(c.stdout, "meshd: "+m)
			}
			if len(changed) == 0 {
				return &exitError{1, "cert: nothing changed"}
			}
			return nil
		},
	}
}

// writeIfChanged writes data to path with mode perm unless path holds it
// already (with that mode), and reports whether it wrote.
func writeIfChanged(path string, data []byte, perm os.FileMode) (bool, error) {
	if fi, err := os.Stat(path); err == nil && fi.Mode().Perm() == perm {
		if have, err := os.ReadFile(path); err == nil && bytes.Equal(have, data) {
			return false, nil
		}
	} else if err != nil && !errors.Is(err, os.ErrNotExist) {
		return false, err
	}
	if err := atomicfile.Write(path, data, perm); err != nil {
		return false, err
	}
	return true, nil
}

// installTailnetCA adds ca to the trust store under root and says what it
// did.
func installTailnetCA(ctx context.Context, ca *localapi.TailnetCA, root string) (string, bool, error) {
	block, _ := pem.Decode([]byte(ca.CertPEM))
	if block == nil {
		return "", false, errors.New("the daemon sent no tailnet CA certificate")
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return "", false, fmt.Errorf("the daemon's tailnet CA: %w", err)
	}
	// The daemon checked it already; checked again here, because this is
	// what puts it into the host's trust.
	if _, err := certs.CheckCA(cert.Raw, ca.Suffix); err != nil {
		return "", false, fmt.Errorf("refusing to install the tailnet CA: %w", err)
	}
	path, changed, out, err := certs.TrustStore{Root: root}.Install(ctx, cert, ca.Suffix)
	if err != nil {
		return "", false, err
	}
	if !changed {
		return fmt.Sprintf("the tailnet CA (%s) is already installed in %s", ca.Suffix, path), false, nil
	}
	return fmt.Sprintf("installed the tailnet CA (%s, names under %s only) as %s: %s", cert.Subject.CommonName, ca.Suffix, path, lastLine(out)), true, nil
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}
