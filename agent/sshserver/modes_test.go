package sshserver

import (
	"testing"

	"golang.org/x/crypto/ssh"
	"golang.org/x/sys/unix"
)

func TestParseModes(t *testing.T) {
	enc := func(m ssh.TerminalModes) []byte {
		// As x/crypto/ssh's client encodes them in a pty-req.
		var b []byte
		for op, v := range m {
			b = append(b, op, byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
		}
		return append(b, 0)
	}
	modes, err := parseModes(enc(ssh.TerminalModes{ssh.ECHO: 0, ssh.ICRNL: 1, ssh.VINTR: 3, ssh.TTY_OP_ISPEED: 38400}))
	if err != nil || len(modes) != 4 {
		t.Fatalf("parseModes: %v, %v", modes, err)
	}
	tio := unix.Termios{Lflag: unix.ECHO | unix.ICANON}
	applyModes(&tio, modes)
	if tio.Lflag&unix.ECHO != 0 || tio.Lflag&unix.ICANON == 0 || tio.Iflag&unix.ICRNL == 0 || tio.Cc[unix.VINTR] != 3 {
		t.Fatalf("termios %+v", tio)
	}
	for _, tc := range []struct {
		in   []byte
		n    int
		fail bool
	}{
		{nil, 0, false},
		{[]byte{0, 53, 0, 0, 0, 0}, 0, false}, // TTY_OP_END stops
		{[]byte{53, 0, 0}, 0, true},           // truncated
		{[]byte{53, 0, 0, 0, 1, 160, 1}, 1, false},
	} {
		m, err := parseModes(tc.in)
		if (err != nil) != tc.fail || len(m) != tc.n {
			t.Errorf("% x: %v, %v", tc.in, m, err)
		}
	}
}

func FuzzParseModes(f *testing.F) {
	f.Add([]byte{53, 0, 0, 0, 0, 128, 0, 0, 150, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		modes, err := parseModes(b)
		if err != nil {
			return
		}
		if len(modes)*5 > len(b) {
			t.Fatalf("%d modes from %d bytes", len(modes), len(b))
		}
		var tio unix.Termios
		applyModes(&tio, modes)
	})
}
