package sshserver

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"strings"
)

// loginShell reads name's login shell from /etc/passwd (os/user does not
// give it).
func loginShell(name string) (string, error) {
	f, err := os.Open("/etc/passwd")
	if err != nil {
		return "", err
	}
	defer f.Close()
	return passwdShell(f, name)
}

// passwdShell finds name's shell in a passwd(5) file: "" when the entry
// has none, an error when there is no entry.
func passwdShell(r io.Reader, name string) (string, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(nil, 64<<10)
	for sc.Scan() {
		line := sc.Bytes()
		if len(line) == 0 || line[0] == '#' {
			continue
		}
		f := bytes.Split(line, []byte(":"))
		if len(f) != 7 || string(f[0]) != name {
			continue
		}
		sh := strings.TrimSpace(string(f[6]))
		if sh != "" && !strings.HasPrefix(sh, "/") {
			return "", fmt.Errorf("local user %q has a login shell that is not an absolute path: %q", name, sh)
		}
		return sh, nil
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("read passwd: %w", err)
	}
	return "", fmt.Errorf("no passwd entry for %q", name)
}
